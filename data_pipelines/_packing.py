"""Packing variable-length examples into fixed-length rows, as a grain `IterDataset` whose state resumes exactly."""

from dataclasses import asdict, dataclass
from typing import Any

import grain
import numpy as np

OVERFLOW_RULES: tuple[str, ...] = ("split", "reject")


@dataclass
class PackStats:
    """What a packer has done: every example is packed (whole or split) or rejected, and counted."""

    examples: int = 0
    tokens: int = 0
    split: int = 0
    rejected: int = 0
    rows: int = 0
    padding: int = 0


@dataclass(frozen=True)
class _Config:
    seq_len: int
    pad_id: int
    keys: tuple[str, ...]
    overflow: str


class PackIterDataset(grain.IterDataset):
    """Greedy packing, in arrival order, of examples (dicts of per-token arrays) into rows of `seq_len`.

    An example goes into the current row when it fits in the free space; otherwise the row is
    emitted, padded, and the example starts the next one. Each row holds the examples' `keys` plus

    - `"segment_ids"`: int32, 1, 2, ... for the examples in the row, 0 on padding;
    - `"positions"`: int32, restarting at 0 in each segment (0 on padding).

    Padding is `pad_id` in `"tokens"` and zero/False elsewhere, so it is never trained. An example
    longer than `seq_len` is, by `overflow`, cut into `seq_len`-long pieces packed as separate
    segments (`"split"`) or dropped (`"reject"`); the iterator's `stats` counts both.

    The iterator's state is its parent's state before the example that starts the next row, plus
    how many of that example's tokens earlier rows took: small, and restored exactly.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        seq_len: int,
        pad_id: int,
        *,
        keys: tuple[str, ...] = ("tokens", "loss_mask", "vision_mask"),
        overflow: str = "split",
    ):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if overflow not in OVERFLOW_RULES:
            raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, got {overflow!r}")
        self._config = _Config(seq_len, pad_id, tuple(keys), overflow)

    def __iter__(self) -> "PackIterator":
        return PackIterator(self._parent.__iter__(), self._config)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._config.seq_len}, overflow={self._config.overflow!r})"


class PackIterator(grain.DatasetIterator):
    """The iterator of a [`PackIterDataset`][data_pipelines.PackIterDataset]; `stats` is a `PackStats`."""

    def __init__(self, parent: grain.DatasetIterator, config: _Config):
        super().__init__(parent)
        self._config = config
        self.stats = PackStats()
        self._example: dict[str, np.ndarray] | None = None  # the example being placed
        self._tokens = 0  # its length
        self._example_state: Any = None  # the parent's state before it
        self._offset = 0  # its tokens already placed in rows
        self._resume_offset: int | None = None  # set by set_state: re-read an example, skip this many tokens

    def _read(self) -> bool:
        """Make the next non-rejected example current; False when the parent is exhausted."""
        cfg = self._config
        while True:
            state = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                return False
            resumed = self._resume_offset is not None
            offset, self._resume_offset = self._resume_offset or 0, None
            n = _length(example, cfg.keys)
            if not resumed:  # counted when first read; a restored state already includes it
                self.stats.examples += 1
                if n > cfg.seq_len and cfg.overflow == "reject":
                    self.stats.rejected += 1
                    continue
                self.stats.tokens += n
                self.stats.split += int(n > cfg.seq_len)
            if n == 0:
                continue
            self._example, self._example_state, self._offset, self._tokens = example, state, offset, n
            return True

    def __next__(self) -> dict[str, np.ndarray]:
        cfg = self._config
        pieces, used = [], 0
        while True:
            if self._example is None and not self._read():
                if pieces:
                    return self._emit(pieces)
                raise StopIteration
            size = min(self._tokens - self._offset, cfg.seq_len)
            if used + size > cfg.seq_len:
                return self._emit(pieces)
            pieces.append({k: np.asarray(self._example[k])[self._offset : self._offset + size] for k in cfg.keys})
            used += size
            self._offset += size
            if self._offset == self._tokens:
                self._example = None

    def _emit(self, pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        cfg = self._config
        row = {k: np.full(cfg.seq_len, cfg.pad_id if k == "tokens" else 0, pieces[0][k].dtype) for k in cfg.keys}
        row["segment_ids"] = np.zeros(cfg.seq_len, np.int32)
        row["positions"] = np.zeros(cfg.seq_len, np.int32)
        at = 0
        for segment, piece in enumerate(pieces, start=1):
            size = len(piece[cfg.keys[0]])
            for k in cfg.keys:
                row[k][at : at + size] = piece[k]
            row["segment_ids"][at : at + size] = segment
            row["positions"][at : at + size] = np.arange(size)
            at += size
        self.stats.rows += 1
        self.stats.padding += cfg.seq_len - at
        return row

    def get_state(self) -> dict[str, Any]:
        current = self._example is not None
        return {
            "parent": self._example_state if current else self._parent.get_state(),
            "offset": self._offset if current else None,
            "stats": asdict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._example, self._example_state, self._offset = None, None, 0
        self._resume_offset = state["offset"]
        self.stats = PackStats(**state["stats"])

    def __str__(self) -> str:
        return f"PackIterator(seq_len={self._config.seq_len})"


def _length(example: dict[str, np.ndarray], keys: tuple[str, ...]) -> int:
    missing = [k for k in keys if k not in example]
    if missing:
        raise KeyError(f"example lacks {missing}; the packer packs {keys}")
    lengths = {k: len(example[k]) for k in keys}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"an example's per-token arrays must have one length, got {lengths}")
    return lengths[keys[0]]


def pack(examples, seq_len: int, pad_id: int, **kwargs) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    """Pack a sequence of examples with a [`PackIterDataset`][data_pipelines.PackIterDataset]: (rows, stats)."""
    iterator = iter(PackIterDataset(grain.MapDataset.source(list(examples)).to_iter_dataset(), seq_len, pad_id,
                                    **kwargs))
    rows = list(iterator)
    return rows, iterator.stats


def packing_stats(iterator: grain.DatasetIterator) -> PackStats:
    """The summed `PackStats` of every packer behind `iterator`, read from its state.

    Works through `mp_prefetch` too: each worker's packer state travels in the iterator's state,
    so rejected and split examples are counted even when packing runs in other processes.
    """
    total = PackStats()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.keys() == {"parent", "offset", "stats"}:
                for name, value in node["stats"].items():
                    setattr(total, name, getattr(total, name) + value)
            else:
                for value in node.values():
                    visit(value)
        elif isinstance(node, list | tuple):
            for value in node:
                visit(value)

    visit(iterator.get_state())
    return total
