"""Packing variable-length examples into fixed-length rows with segment ids and restarting positions."""

from dataclasses import dataclass, field

import numpy as np

OVERFLOW_RULES: tuple[str, ...] = ("split", "reject")


@dataclass
class PackStats:
    """What a `Packer` has done: every example is either packed (whole or split) or rejected, and counted."""

    examples: int = 0
    tokens: int = 0
    split: int = 0
    rejected: int = 0
    rows: int = 0
    padding: int = 0


@dataclass
class Packer:
    """Greedy packing in arrival order into rows of `seq_len` tokens.

    An example is placed in the current row when it fits in the free space; otherwise the row is
    emitted (padded) and a new one started. Each row has, besides the examples' own per-token
    arrays (the `keys`):

    - `"segment_ids"`: int32, 1, 2, ... for the examples in the row, 0 on padding;
    - `"positions"`: int32, restarting at 0 in each segment (0 on padding).

    Padding is `pad_id` in `"tokens"` and zero/False in every other key, so padded tokens are never
    trained. An example longer than `seq_len` is, by `overflow`, either cut into `seq_len`-long pieces
    packed as separate segments (`"split"`) or dropped (`"reject"`); both are counted in `stats`.
    """

    seq_len: int
    pad_id: int
    keys: tuple[str, ...] = ("tokens", "loss_mask", "vision_mask")
    overflow: str = "split"
    stats: PackStats = field(default_factory=PackStats)
    _pending: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    _used: int = field(default=0, repr=False)

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.overflow not in OVERFLOW_RULES:
            raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, got {self.overflow!r}")

    def add(self, example: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Pack one example; returns the rows it completed (usually none or one)."""
        missing = [k for k in self.keys if k not in example]
        if missing:
            raise KeyError(f"example lacks {missing}; the packer packs {self.keys}")
        lengths = {k: len(example[k]) for k in self.keys}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"an example's per-token arrays must have one length, got {lengths}")
        n = lengths[self.keys[0]]
        self.stats.examples += 1
        if n > self.seq_len:
            if self.overflow == "reject":
                self.stats.rejected += 1
                return []
            self.stats.split += 1
        self.stats.tokens += n
        rows = []
        for start in range(0, n, self.seq_len):
            piece = {k: np.asarray(example[k])[start : start + self.seq_len] for k in self.keys}
            size = len(piece[self.keys[0]])
            if self._used + size > self.seq_len:
                rows.append(self._emit())
            self._pending.append(piece)
            self._used += size
        return rows

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Emit the partly filled row, if any."""
        return [self._emit()] if self._pending else []

    def _emit(self) -> dict[str, np.ndarray]:
        row = {}
        for k in self.keys:
            fill = self.pad_id if k == "tokens" else 0
            dtype = self._pending[0][k].dtype
            row[k] = np.full(self.seq_len, fill, dtype)
        row["segment_ids"] = np.zeros(self.seq_len, np.int32)
        row["positions"] = np.zeros(self.seq_len, np.int32)
        at = 0
        for segment, piece in enumerate(self._pending, start=1):
            size = len(piece[self.keys[0]])
            for k in self.keys:
                row[k][at : at + size] = piece[k]
            row["segment_ids"][at : at + size] = segment
            row["positions"][at : at + size] = np.arange(size)
            at += size
        self.stats.rows += 1
        self.stats.padding += self.seq_len - at
        self._pending, self._used = [], 0
        return row


def pack(examples, seq_len: int, pad_id: int, **kwargs) -> tuple[list[dict[str, np.ndarray]], PackStats]:
    """Pack an iterable of examples with a fresh [`Packer`][data_pipelines.Packer]; returns (rows, stats)."""
    packer = Packer(seq_len, pad_id, **kwargs)
    rows = [row for ex in examples for row in packer.add(ex)]
    return rows + packer.flush(), packer.stats
