"""From a video-caption source to sharded, packed, ring-ordered token batches: the grain recipe."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqx_ring import to_layout
from eqx_ring.sharding import BATCH_AXES, batch_sharding

from ._lwm import TASKS, lwm_sequence
from ._packing import PackIterDataset
from ._shards import PackedShards
from ._tokenizer import ByteTokenizer, Tokenizer

ROW_KEYS: tuple[str, ...] = (
    "tokens", "loss_mask", "vision_mask", "segment_ids", "positions", "targets", "target_mask", "target_vision_mask",
)


@dataclass(frozen=True)
class PatchQuantizer:
    """A deterministic stand-in video tokenizer: each `patch × patch` block's mean colour, `levels` steps per channel.

    Frames `[T, H, W, 3]` uint8 → codes `[T, (H / patch) · (W / patch)]` in `[0, levels³)`. Good
    enough to test the token layout and to train on `MovingShapes` before a learned VQ exists.
    """

    patch: int = 8
    levels: int = 4

    @property
    def codebook_size(self) -> int:
        return self.levels**3

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        t, h, w, _ = frames.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"frame size {h}x{w} must be divisible by patch={self.patch}")
        means = frames.reshape(t, h // self.patch, self.patch, w // self.patch, self.patch, 3).mean(axis=(2, 4))
        q = np.minimum((means * self.levels / 256).astype(np.int32), self.levels - 1)
        return (q[..., 0] * self.levels**2 + q[..., 1] * self.levels + q[..., 2]).reshape(t, -1)


@dataclass(frozen=True)
class ToLWMSequence:
    """A grain random-map transform: a video-caption record → its LWM token sequence, task drawn per example.

    The video's codes are `video_tokenizer(record["frames"])`, or the record's own `"codes"` when
    `video_tokenizer` is `None` (videos encoded ahead of time, e.g. by a learned VQ on an accelerator).
    """

    video_tokenizer: Callable[[np.ndarray], np.ndarray] | None
    tokenizer: Tokenizer
    tasks: tuple[str, ...]
    weights: tuple[float, ...]

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        task = self.tasks[rng.choice(len(self.tasks), p=self.weights)] if len(self.tasks) > 1 else self.tasks[0]
        if self.video_tokenizer is None:
            codes = np.asarray(record["codes"])
        else:
            codes = self.video_tokenizer(np.asarray(record["frames"]))
        sequence = lwm_sequence(codes, self.tokenizer.encode(record["caption"]), self.tokenizer, task)
        return {**sequence, "task": TASKS.index(task), "index": record.get("index", -1)}


def _task_mixture(tasks: str | Mapping[str, float]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    mixture = {tasks: 1.0} if isinstance(tasks, str) else dict(tasks)
    unknown = set(mixture) - set(TASKS)
    if unknown or not mixture:
        raise ValueError(f"tasks must name some of {TASKS}, got {sorted(mixture)}")
    total = sum(mixture.values())
    if total <= 0 or any(w < 0 for w in mixture.values()):
        raise ValueError(f"task weights must be non-negative with a positive sum, got {mixture}")
    return tuple(mixture), tuple(w / total for w in mixture.values())


def video_text_examples(
    source: grain.sources.RandomAccessDataSource,
    *,
    video_tokenizer: Callable[[np.ndarray], np.ndarray] | None,
    tokenizer: Tokenizer | None = None,
    tasks: str | Mapping[str, float] = "video_to_text",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's examples as LWM token sequences: a grain `MapDataset`, random-access and deterministic.

    The source is split across processes first (`source[process_index::process_count]`, by default
    `jax.process_index()` / `jax.process_count()`), so processes read disjoint examples whose union
    is the source; then shuffled per epoch (`seed`), repeated `num_epochs` times (`None`: forever),
    and turned into sequences by [`ToLWMSequence`][data_pipelines.ToLWMSequence] with the task drawn
    from `tasks` (a task name or `{task: weight}`), deterministically from `(seed, position)`.
    With `video_tokenizer=None` the records carry their `"codes"` already (any sequence of dicts
    is a source, e.g. a list).
    """
    task_names, weights = _task_mixture(tasks)
    ds = _this_process(source, seed, shuffle, num_epochs, process_index, process_count)
    transform = ToLWMSequence(video_tokenizer, tokenizer or ByteTokenizer(), task_names, weights)
    return ds.random_map(transform, seed=seed)


def _this_process(
    source: grain.sources.RandomAccessDataSource, seed: int, shuffle: bool, num_epochs: int | None,
    process_index: int | None, process_count: int | None,
) -> grain.MapDataset:
    """This process's slice of `source`, shuffled per epoch and repeated."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds if num_epochs == 1 else ds.repeat(num_epochs)


@dataclass(frozen=True)
class ToRingLayout:
    """A grain map transform: put every per-token array of a row in an `eqx_ring` layout for `num_shards` devices."""

    layout: str
    num_shards: int

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: to_layout(v, self.layout, self.num_shards, axis=-1) for k, v in row.items()}


def packed_batches(
    examples: grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    overflow: str = "split",
    layout: str | None = None,
    ring_size: int = 1,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Pack sequences into rows of `seq_len`, reorder them for the ring, and batch them.

    Yields dicts of `[batch_size, seq_len]` arrays with the keys of `ROW_KEYS`. With `layout`, every
    array is in that layout for `ring_size` devices on the sequence axis (the model must use the same
    layout). `num_workers > 0` runs the pipeline in that many processes (`mp_prefetch`); each
    worker packs its own slice of the examples, so the batches differ from `num_workers=0` but are
    just as deterministic, and the iterator state covers every worker.
    """
    rows = PackIterDataset(examples.to_iter_dataset(), seq_len, pad_id, overflow=overflow)
    return _batch_rows(rows, batch_size, layout, ring_size, num_workers)


def shard_batches(
    shards: PackedShards,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    layout: str | None = None,
    ring_size: int = 1,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches of pre-packed rows read from ArrayRecord shards: this process's rows, shuffled per epoch.

    Arguments as [`video_text_examples`][data_pipelines.video_text_examples] and
    [`packed_batches`][data_pipelines.packed_batches]. Rows are stored in natural order, so the
    same shards serve any `layout` and `ring_size`.
    """
    rows = _this_process(shards, seed, shuffle, num_epochs, process_index, process_count).to_iter_dataset()
    return _batch_rows(rows, batch_size, layout, ring_size, num_workers)


def with_targets(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add next-token `"targets"`, `"target_mask"` and `"target_vision_mask"` to a packed row, in natural order.

    `targets[t] = tokens[t + 1]`, trained where `loss_mask[t + 1]` is set and `t + 1` is in the same
    (non-padding) segment as `t`; `target_vision_mask[t] = vision_mask[t + 1]` says which targets
    are vision tokens, for per-modality losses. Computed before any ring layout, so a model's loss
    needs no shift (a shift of a layout-ordered or sequence-sharded array would be wrong or would
    move data).
    """
    tokens, segments = row["tokens"], row["segment_ids"]
    targets = np.append(tokens[1:], tokens[-1])  # the last target is never trained
    same = np.append((segments[1:] == segments[:-1]) & (segments[1:] > 0), False)
    return {
        **row,
        "targets": targets,
        "target_mask": same & np.append(row["loss_mask"][1:].astype(bool), False),
        "target_vision_mask": np.append(row["vision_mask"][1:].astype(bool), False),
    }


def _batch_rows(
    rows: grain.IterDataset, batch_size: int, layout: str | None, ring_size: int, num_workers: int
) -> grain.IterDataset:
    rows = rows.map(with_targets)
    if layout is not None:
        rows = rows.map(ToRingLayout(layout, ring_size))
    batches = rows.batch(batch_size, drop_remainder=True)
    if num_workers:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batches


def global_packed_batches(
    examples: grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    rows: Sequence[int] | None = None,
    overflow: str = "split",
    layout: str | None = None,
    ring_size: int = 1,
) -> grain.IterDataset:
    """Packed batches that are the same whatever the number of processes reading them: for elastic restarts.

    Row `r` of every global batch of `batch_size` rows packs its own stream of examples,
    `examples[r::batch_size]`, so a global batch depends on `examples`, `seq_len` and `batch_size`
    only. Every process passes the same `examples` (the whole dataset, e.g. `video_text_examples(...,
    process_index=0, process_count=1)`) and yields `rows` of each global batch: by default an even
    split by `jax.process_index()`; on a mesh, [`process_rows`][data_pipelines.process_rows] (the
    rows the process's devices hold). Rows are as in [`packed_batches`][data_pipelines.packed_batches].

    The iterator's state is `{"rows": {"r": state of row r}}`: the states of several processes merge
    into one by uniting their `"rows"`, and `set_state` takes such a union and picks its own rows.
    So a checkpoint written by N processes resumes on M processes ([`models.train`][models.train]
    does this), continuing exactly as an uninterrupted run would.
    """
    if rows is None:
        index, count = jax.process_index(), jax.process_count()
        if batch_size % count:
            raise ValueError(f"batch_size={batch_size} must be divisible by the process count {count}")
        rows = range(index * batch_size // count, (index + 1) * batch_size // count)
    rows = sorted(rows)
    if not rows or rows[0] < 0 or rows[-1] >= batch_size or len(set(rows)) != len(rows):
        raise ValueError(f"rows must be distinct indices in [0, batch_size={batch_size}), got {rows}")
    streams = {}
    for r in rows:
        stream = PackIterDataset(examples[r::batch_size].to_iter_dataset(), seq_len, pad_id, overflow=overflow)
        stream = stream.map(with_targets)
        streams[r] = stream.map(ToRingLayout(layout, ring_size)) if layout is not None else stream
    return _RowStreams(streams)


class _RowStreams(grain.IterDataset):
    """Batches whose row `r` comes from its own dataset `streams[r]`."""

    def __init__(self, streams: Mapping[int, grain.IterDataset]):
        super().__init__(list(streams.values()))
        self._streams = dict(streams)

    def __iter__(self) -> "_RowStreamsIterator":
        return _RowStreamsIterator({r: iter(s) for r, s in self._streams.items()})

    def __str__(self) -> str:
        return f"RowStreams(rows={list(self._streams)})"


class _RowStreamsIterator(grain.DatasetIterator):
    def __init__(self, iterators: dict[int, grain.DatasetIterator]):
        super().__init__(list(iterators.values()))
        self._iterators = iterators

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(it) for it in self._iterators.values()]
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"rows": {str(r): it.get_state() for r, it in self._iterators.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = [r for r in self._iterators if str(r) not in state["rows"]]
        if missing:
            raise ValueError(f"the data state has no rows {missing}: it was saved for another batch size")
        for r, it in self._iterators.items():
            it.set_state(state["rows"][str(r)])

    def __str__(self) -> str:
        return f"RowStreamsIterator(rows={list(self._iterators)})"


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, ...]:
    """The rows of a global `[batch_size, ...]` batch that this process's devices hold on `mesh`.

    Under the batch sharding `P(("dp", "fsdp"), "sp")`: the rows of the data shards of every local
    device. When `sp` (or `tp`) spans processes, several processes hold the same rows.
    """
    index_map = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((batch_size,))
    return tuple(sorted({r for (rows,) in index_map.values() for r in range(*rows.indices(batch_size))}))


def global_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, *, batch_size: int | None = None
) -> dict[str, jax.Array]:
    """This process's rows → global `[batch, seq]` `jax.Array`s sharded `P(("dp", "fsdp"), "sp")`.

    With `batch_size`, `batch` holds the rows [`process_rows(mesh, batch_size)`][data_pipelines.process_rows]
    of the global batch, in order (as [`global_packed_batches`][data_pipelines.global_packed_batches]
    yields them), and any mesh works. Without, every process passes an equal share (e.g. from
    `video_text_examples` with its process index) and the global batch is their concatenation in
    process order, which needs each process's devices to hold one contiguous block of rows.
    """
    sharding = batch_sharding(mesh)
    if batch_size is None:
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
    rows = process_rows(mesh, batch_size)
    local = {r: i for i, r in enumerate(rows)}

    def make(x: np.ndarray) -> jax.Array:
        if x.shape[0] != len(rows):
            raise ValueError(f"this process holds rows {rows} of the global batch, but was given {x.shape[0]} rows")
        # A device's rows are one contiguous range, so they are contiguous in `x` too.
        def shard(index):
            first, stop, _ = index[0].indices(batch_size)
            return x[(slice(local[first], local[first] + stop - first), *index[1:])]

        return jax.make_array_from_callback((batch_size, *x.shape[1:]), sharding, shard)

    return {k: make(np.asarray(v)) for k, v in batch.items()}
