"""From a video-caption source to sharded, packed, ring-ordered token batches: the grain recipe."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqx_ring import to_layout

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


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's `[local_batch, seq]` arrays → global `jax.Array`s sharded `P(("dp", "fsdp"), "sp")`.

    Every process passes its own rows (from `video_text_examples` with its process index); the
    global batch is their concatenation in process order.
    """
    sharding = NamedSharding(mesh, P(("dp", "fsdp"), "sp"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
