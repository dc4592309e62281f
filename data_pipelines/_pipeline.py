"""From a video-caption source to sharded, packed, ring-ordered token batches: the grain recipe."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import absl.flags
import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqx_ring import layout_positions, to_layout
from eqx_ring.sharding import BATCH_AXES, batch_sharding

from ._lwm import TASKS, lwm_sequence
from ._packing import PackIterDataset
from ._shards import PackedShards
from ._tokenizer import ByteTokenizer, Tokenizer

ROW_KEYS: tuple[str, ...] = (
    "tokens", "loss_mask", "vision_mask", "segment_ids", "positions", "targets", "target_mask", "target_vision_mask",
)
"""The keys of a packed batch, each a `[batch, seq_len]` array.

Batches of [`packed_batches`][data_pipelines.packed_batches] and
[`global_packed_batches`][data_pipelines.global_packed_batches] have exactly these keys.
`"tokens"`, `"targets"`, `"segment_ids"` and `"positions"` are int32 (the ids as
[`lwm_sequence`][data_pipelines.lwm_sequence] makes them), the masks bool. See
[`PackIterDataset`][data_pipelines.PackIterDataset] (packing) and
[`with_targets`][data_pipelines.with_targets] (the `"target*"` keys).
"""


@dataclass(frozen=True)
class PatchQuantizer:
    """A deterministic stand-in video tokenizer: each `patch × patch` block's mean colour, `levels` steps per channel.

    Frames `[T, H, W, 3]` uint8 → codes `[T, (H / patch) · (W / patch)]` in `[0, levels³)`. Good
    enough to test the token layout and to train on `MovingShapes` before a learned VQ exists.
    Pass it as `video_tokenizer` to [`video_text_examples`][data_pipelines.video_text_examples].
    A frozen dataclass; its fields are its arguments.

    **Arguments:**

    - `patch`: the side of a square patch in pixels, default 8, positive; must divide the frames'
      height and width.
    - `levels`: quantization steps per colour channel, default 4, in `[1, 256]`.

    **Raises:**

    `ValueError` naming the field if `patch < 1` or `levels` is not in `[1, 256]`, or either is not
    an int.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import MovingShapes, PatchQuantizer

    quantizer = PatchQuantizer(patch=8, levels=4)
    frames = MovingShapes(1, num_frames=2, size=16)[0]["frames"]  # [2, 16, 16, 3]
    codes = quantizer(frames)
    assert codes.shape == (2, 4) and codes.dtype == np.int32  # 2 × 2 patches per frame
    assert quantizer.codebook_size == 64 and 0 <= codes.min() and codes.max() < 64
    assert (quantizer(np.zeros((1, 16, 16, 3), np.uint8)) == 0).all()  # black is code 0
    ```
    """

    patch: int = 8
    levels: int = 4

    def __post_init__(self):
        """Check the fields; raises `ValueError` as listed above."""
        if not _is_int(self.patch) or self.patch < 1:
            raise ValueError(f"patch must be a positive int, got {self.patch!r}")
        if not _is_int(self.levels) or not 1 <= self.levels <= 256:
            raise ValueError(f"levels must be an int in [1, 256] (steps per 8-bit channel), got {self.levels!r}")

    @property
    def codebook_size(self) -> int:
        """The number of distinct codes, `levels³`."""
        return self.levels**3

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Quantize each patch's mean colour: code `r · levels² + g · levels + b` of the channel steps.

        **Arguments:**

        - `frames`: uint8 RGB `[T, H, W, 3]`, `H` and `W` divisible by `patch`.

        **Returns:**

        int32 codes `[T, (H / patch) · (W / patch)]` (patches in row-major order) in
        `[0, codebook_size)`.

        **Raises:**

        `ValueError` if `frames` is not `[T, H, W, 3]`, or `H` or `W` is not divisible by `patch`.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must have shape [T, H, W, 3] (RGB), got {frames.shape}")
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
    [`video_text_examples`][data_pipelines.video_text_examples] builds one; a frozen dataclass whose
    fields are its arguments.

    **Arguments:**

    - `video_tokenizer`: frames uint8 `[frames, H, W, 3]` → int codes `[frames, codes_per_frame]`
      (e.g. [`PatchQuantizer`][data_pipelines.PatchQuantizer]), or `None`.
    - `tokenizer`: the text [`Tokenizer`][data_pipelines.Tokenizer] for the caption and special ids.
    - `tasks`: the task names to draw from, each in [`TASKS`][data_pipelines.TASKS].
    - `weights`: the probability of each of `tasks`, same length, summing to 1.
    - `vocab_size`: the model's vocabulary, `tokenizer.vocab_size + codebook_size`; with it every
      sequence's ids are checked to lie in `[0, vocab_size)` (one NumPy `max` per example), so a
      video tokenizer whose codes exceed its codebook fails here, naming the example, instead of
      training on ids the model's embedding silently clamps. Default `None`: not checked.

    **Raises:**

    `ValueError` if `tasks` is empty or names an unknown task, `weights` does not match it, or
    `vocab_size` leaves no room for a vision code (`<= tokenizer.vocab_size`).
    """

    video_tokenizer: Callable[[np.ndarray], np.ndarray] | None
    tokenizer: Tokenizer
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    vocab_size: int | None = None

    def __post_init__(self):
        """Check the fields; raises `ValueError` as listed above."""
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks must name some of {TASKS}, got {self.tasks!r}")
        if len(self.weights) != len(self.tasks) or any(w < 0 for w in self.weights) or not np.isclose(
                sum(self.weights), 1.0):
            raise ValueError(f"weights must be {len(self.tasks)} non-negative probabilities summing to 1 (one per "
                             f"task), got {self.weights!r}")
        if self.vocab_size is not None and (not _is_int(self.vocab_size)
                                            or self.vocab_size <= self.tokenizer.vocab_size):
            raise ValueError(f"vocab_size must be an int > tokenizer.vocab_size={self.tokenizer.vocab_size} (text ids "
                             f"plus the video codebook), got {self.vocab_size!r}")

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Turn one record into its LWM sequence (grain calls this with a per-example `rng`).

        **Arguments:**

        - `record`: a dict with `"caption"` (str) and `"frames"` (uint8 `[frames, H, W, 3]`), or
          `"codes"` (int `[frames, codes_per_frame]`) when `video_tokenizer` is `None`; `"index"` is
          optional.
        - `rng`: draws the task (unused when there is one task).

        **Returns:**

        The dict of [`lwm_sequence`][data_pipelines.lwm_sequence] (`"tokens"` int32, `"vision_mask"`
        and `"loss_mask"` bool, all `[length]`) plus `"task"` (int, the task's index in
        [`TASKS`][data_pipelines.TASKS]) and `"index"` (the record's `"index"`, or -1).

        **Raises:**

        `ValueError` naming the record's `"index"`, the id and `vocab_size` if an id is outside
        `[0, vocab_size)` (with `vocab_size`); the errors of
        [`lwm_sequence`][data_pipelines.lwm_sequence] for bad codes or caption ids.
        """
        task = self.tasks[rng.choice(len(self.tasks), p=self.weights)] if len(self.tasks) > 1 else self.tasks[0]
        if self.video_tokenizer is None:
            codes = np.asarray(record["codes"])
        else:
            codes = self.video_tokenizer(np.asarray(record["frames"]))
        sequence = lwm_sequence(codes, self.tokenizer.encode(record["caption"]), self.tokenizer, task)
        index = record.get("index", -1)
        if self.vocab_size is not None:
            _check_ids(sequence["tokens"], self.vocab_size, f"example {index}", self.tokenizer.vocab_size)
        return {**sequence, "task": TASKS.index(task), "index": index}


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_ids(tokens: np.ndarray, vocab_size: int, what: str, text_vocab_size: int | None = None) -> None:
    """Raise unless every id of `tokens` lies in `[0, vocab_size)`: one min and one max, no copy."""
    if not tokens.size:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab_size:
        return
    bad = low if low < 0 else high
    hint = ""
    if text_vocab_size is not None and bad >= vocab_size:
        hint = (f" (video code {bad - text_vocab_size}: the codebook holds {vocab_size - text_vocab_size} codes after "
                f"the {text_vocab_size} text ids)")
    raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, vocab_size={vocab_size}){hint}")


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_layout_args(seq_len: int | None, layout: str | None, ring_size: int) -> None:
    """Check the row layout up front, so a bad one fails here and not at the first row."""
    _check_positive(ring_size=ring_size)
    if layout is None:
        if ring_size != 1:
            raise ValueError(f"ring_size={ring_size} needs a layout (the rows are reordered for the ring only with "
                             "layout=...), got layout=None")
        return
    layout_positions(0 if seq_len is None else seq_len, layout, ring_size)


@dataclass(frozen=True)
class _CheckVocab:
    """Map with index: raise naming the example if one of its token ids is outside `[0, vocab_size)`."""

    vocab_size: int

    def __call__(self, position: int, example: Mapping[str, Any]) -> Mapping[str, Any]:
        where = f"example {position}" + (f" (index {example['index']})" if "index" in example else "")
        _check_ids(np.asarray(example["tokens"]), self.vocab_size, where)
        return example


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
    vocab_size: int | None = None,
) -> grain.MapDataset:
    """This process's examples as LWM token sequences: a grain `MapDataset`, random-access and deterministic.

    The source is split across processes first (`source[process_index::process_count]`, by default
    `jax.process_index()` / `jax.process_count()`), so processes read disjoint examples whose union
    is the source; then shuffled per epoch (`seed`), repeated `num_epochs` times (`None`: forever),
    and turned into sequences by [`ToLWMSequence`][data_pipelines.ToLWMSequence] with the task drawn
    from `tasks` (a task name or `{task: weight}`), deterministically from `(seed, position)`.
    With `video_tokenizer=None` the records carry their `"codes"` already (any sequence of dicts
    is a source, e.g. a list).

    **Arguments:**

    - `source`: a random-access source of records (`len`, `[index]`) with `"frames"` (or
      `"codes"`) and `"caption"`, e.g. [`MovingShapes`][data_pipelines.MovingShapes],
      [`VideoFiles`][data_pipelines.VideoFiles] or a list of dicts.
    - `video_tokenizer`: frames → codes, e.g. [`PatchQuantizer`][data_pipelines.PatchQuantizer],
      or `None` to use each record's `"codes"` (keyword only, required).
    - `tokenizer`: the text [`Tokenizer`][data_pipelines.Tokenizer]; default a
      [`ByteTokenizer`][data_pipelines.ByteTokenizer].
    - `tasks`: a name in [`TASKS`][data_pipelines.TASKS] (default `"video_to_text"`), or a dict of
      names to non-negative weights (normalized to sum to 1).
    - `seed`: seeds the shuffle and the task draws; default 0.
    - `shuffle`: shuffle each epoch (default `True`); `False` keeps the source's order.
    - `num_epochs`: how many times to repeat this process's examples, default 1; `None` repeats
      forever.
    - `process_index`: this process's index among `process_count`; default `jax.process_index()`.
    - `process_count`: the number of processes splitting the source; default `jax.process_count()`.
    - `vocab_size`: the model's vocabulary (`tokenizer.vocab_size + codebook_size`); with it each
      example's ids are checked against it once, as it is made (see
      [`ToLWMSequence`][data_pipelines.ToLWMSequence]). Default `None`: not checked.

    **Returns:**

    A grain `MapDataset` of this process's `len(source[process_index::process_count])` examples
    times `num_epochs` (unbounded with `None`), each the dict
    [`ToLWMSequence`][data_pipelines.ToLWMSequence] returns: `"tokens"` (int32 `[length]`),
    `"vision_mask"`, `"loss_mask"` (bool `[length]`), `"task"` and `"index"` (ints); `length`
    varies per example. Feed it to [`packed_batches`][data_pipelines.packed_batches].

    **Raises:**

    `ValueError` if `tasks` names an unknown task or its weights are negative or sum to 0, if
    `process_index` is not in `[0, process_count)`, `num_epochs` is neither `None` nor a positive
    int, `seed` is not an int, or `vocab_size` is not an int above `tokenizer.vocab_size`. Reading
    an example raises as [`ToLWMSequence`][data_pipelines.ToLWMSequence] does (an id outside
    `vocab_size` names the example).

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import TASKS, ByteTokenizer, MovingShapes, PatchQuantizer, video_text_examples

    tok = ByteTokenizer()
    source = MovingShapes(num_examples=8, num_frames=2, size=16)
    examples = video_text_examples(source, video_tokenizer=PatchQuantizer(patch=8), tokenizer=tok,
                                   tasks={"video_to_text": 0.5, "text_to_video": 0.5},
                                   process_index=0, process_count=1)
    assert len(examples) == 8
    example = examples[0]
    assert example["tokens"].dtype == np.int32 and example["loss_mask"].shape == example["tokens"].shape
    assert TASKS[example["task"]] in ("video_to_text", "text_to_video")
    caption = source[example["index"]]["caption"]
    assert tok.decode(example["tokens"][~example["vision_mask"]]) == caption
    ```
    """
    task_names, weights = _task_mixture(tasks)
    transform = ToLWMSequence(video_tokenizer, tokenizer or ByteTokenizer(), task_names, weights, vocab_size)
    ds = _this_process(source, seed, shuffle, num_epochs, process_index, process_count)
    return ds.random_map(transform, seed=seed)


def _this_process(
    source: grain.sources.RandomAccessDataSource, seed: int, shuffle: bool, num_epochs: int | None,
    process_index: int | None, process_count: int | None,
) -> grain.MapDataset:
    """This process's slice of `source`, shuffled per epoch and repeated."""
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if num_epochs is not None:
        _check_positive(num_epochs=num_epochs)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_positive(process_count=process_count)
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds if num_epochs == 1 else ds.repeat(num_epochs)


@dataclass(frozen=True)
class ToRingLayout:
    """A grain map transform: put every per-token array of a row in an `eqx_ring` layout for `num_shards` devices.

    Applies [`to_layout`][eqx_ring.to_layout] on the last axis of every array of the row. A frozen
    dataclass whose fields are its arguments.

    **Arguments:**

    - `layout`: `"contiguous"`, `"zigzag"` or `"striped"`, as the model uses.
    - `num_shards`: the number of devices on the ring (the mesh's `sp` size), positive.

    **Raises:**

    `ValueError` if `layout` is unknown or `num_shards` is not a positive int.
    """

    layout: str
    num_shards: int

    def __post_init__(self):
        """Check the fields; raises `ValueError` as listed above."""
        layout_positions(0, self.layout, self.num_shards)

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Permute every array of `row` into the layout.

        **Arguments:**

        - `row`: a dict of arrays whose last axis is the sequence, `[..., seq_len]`, in natural order.

        **Returns:**

        A new dict with the same keys, shapes and dtypes, every array in `layout` order.

        **Raises:**

        `ValueError` if `seq_len` does not split into `num_shards` (`2 · num_shards` for zigzag) or
        `layout` is unknown.
        """
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
    vocab_size: int | None = None,
) -> grain.IterDataset:
    """Pack sequences into rows of `seq_len`, reorder them for the ring, and batch them.

    Yields dicts of `[batch_size, seq_len]` arrays with the keys of `ROW_KEYS`. With `layout`, every
    array is in that layout for `ring_size` devices on the sequence axis (the model must use the same
    layout). `num_workers > 0` runs the pipeline in that many processes (`mp_prefetch`); each
    worker packs its own slice of the examples, so the batches differ from `num_workers=0` but are
    just as deterministic, and the iterator state covers every worker.

    Each batch holds this process's rows only; make global arrays with
    [`global_batch`][data_pipelines.global_batch]. A last, incomplete batch is dropped. Keys of the
    examples other than `"tokens"`, `"loss_mask"` and `"vision_mask"` (e.g. `"task"`) are dropped.
    `None` records (e.g. videos a [`VideoFiles`][data_pipelines.VideoFiles] with `skip_errors=True`
    could not decode) are counted in the packers' `skipped`, in every worker.

    **Arguments:**

    - `examples`: a `MapDataset` of token sequences, e.g. from
      [`video_text_examples`][data_pipelines.video_text_examples].
    - `seq_len`: the length of a row; with `layout`, divisible by `ring_size` (`2 · ring_size` for
      `"zigzag"`).
    - `batch_size`: rows per batch.
    - `pad_id`: the padding token, e.g. `tokenizer.pad_id`.
    - `overflow`: `"split"` (default) or `"reject"` for examples longer than `seq_len`, as in
      [`PackIterDataset`][data_pipelines.PackIterDataset].
    - `layout`: `None` (default) for natural order, or an `eqx_ring` layout name, applied by
      [`ToRingLayout`][data_pipelines.ToRingLayout].
    - `ring_size`: the number of devices on the ring for `layout`, default 1; must be 1 without `layout`.
    - `num_workers`: worker processes for `mp_prefetch`; default 0 runs in this process.
    - `vocab_size`: the model's vocabulary; with it each example's `"tokens"` are checked to lie
      in `[0, vocab_size)` before packing (one min and max per example). Default `None`: not
      checked (checking once in [`video_text_examples`][data_pipelines.video_text_examples] is
      enough).

    **Returns:**

    A grain `IterDataset` of dicts with the keys [`ROW_KEYS`][data_pipelines.ROW_KEYS], each a
    `[batch_size, seq_len]` NumPy array (int32 ids, segment ids and positions; bool masks).
    [`packing_stats`][data_pipelines.packing_stats] of its iterator says what packing did.

    **Raises:**

    `ValueError` naming the argument if `seq_len`, `batch_size` or `ring_size` is not a positive
    int, `num_workers` is negative, `ring_size > 1` without `layout`, `layout` is unknown or does
    not split `seq_len` into `ring_size` shards (`2 · ring_size` for `"zigzag"`), or `vocab_size`
    is not a positive int; or `overflow` is unknown. While iterating, an example with an id outside
    `vocab_size` raises `ValueError` naming its position in `examples`, its `"index"`, the id and
    `vocab_size`.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import ROW_KEYS, ByteTokenizer, MovingShapes, PatchQuantizer
    from data_pipelines import packed_batches, video_text_examples
    from eqx_ring import from_layout

    tok = ByteTokenizer()
    examples = video_text_examples(MovingShapes(8, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                   tokenizer=tok, process_index=0, process_count=1)
    batches = packed_batches(examples, seq_len=128, batch_size=2, pad_id=tok.pad_id, layout="zigzag", ring_size=4)
    batch = next(iter(batches))
    assert set(batch) == set(ROW_KEYS) and batch["tokens"].shape == (2, 128)
    tokens, targets, mask = (from_layout(batch[k], "zigzag", 4, axis=-1) for k in ("tokens", "targets", "target_mask"))
    assert (targets[:, :-1] == tokens[:, 1:])[mask[:, :-1]].all()  # next-token targets, in natural order
    ```
    """
    _check_batching(seq_len, batch_size, layout, ring_size, vocab_size)
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if vocab_size is not None:
        examples = examples.map_with_index(_CheckVocab(vocab_size))
    rows = PackIterDataset(examples.to_iter_dataset(allow_nones=True), seq_len, pad_id, overflow=overflow)
    return _batch_rows(rows, batch_size, layout, ring_size, num_workers)


def _check_batching(seq_len: int | None, batch_size: int, layout: str | None, ring_size: int,
                    vocab_size: int | None) -> None:
    if seq_len is not None:
        _check_positive(seq_len=seq_len)
    _check_positive(batch_size=batch_size)
    _check_layout_args(seq_len, layout, ring_size)
    if vocab_size is not None:
        _check_positive(vocab_size=vocab_size)


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

    **Arguments:**

    - `shards`: the rows, a [`PackedShards`][data_pipelines.PackedShards] of rows with at least
      `"tokens"`, `"loss_mask"`, `"vision_mask"` and `"segment_ids"` (as a packer writes them).
    - `batch_size`: rows per batch (this process's); a last, incomplete batch is dropped.
    - `seed`: seeds the shuffle; default 0.
    - `shuffle`: shuffle each epoch (default `True`).
    - `num_epochs`: how many times to repeat, default 1; `None` repeats forever.
    - `layout`: `None` (default) for natural order, or an `eqx_ring` layout name.
    - `ring_size`: the number of devices on the ring for `layout`, default 1; must be 1 without `layout`.
    - `num_workers`: worker processes for `mp_prefetch`; default 0.
    - `process_index`: this process's index; default `jax.process_index()`.
    - `process_count`: the number of processes splitting the rows; default `jax.process_count()`.

    **Returns:**

    A grain `IterDataset` of dicts of `[batch_size, seq_len]` arrays: the stored keys plus
    `"targets"`, `"target_mask"` and `"target_vision_mask"` (see
    [`with_targets`][data_pipelines.with_targets]), i.e. [`ROW_KEYS`][data_pipelines.ROW_KEYS] for
    rows written from a packer.

    **Raises:**

    `ValueError` if `process_index` is not in `[0, process_count)`, `batch_size` or `ring_size` is
    not a positive int, `ring_size > 1` without `layout`, `layout` is unknown, or `num_workers` is
    negative; a layout that does not split the rows' length raises at the first batch.
    """
    _check_batching(None, batch_size, layout, ring_size, None)
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    rows = _this_process(shards, seed, shuffle, num_epochs, process_index, process_count).to_iter_dataset()
    return _batch_rows(rows, batch_size, layout, ring_size, num_workers)


def with_targets(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add next-token `"targets"`, `"target_mask"` and `"target_vision_mask"` to a packed row, in natural order.

    `targets[t] = tokens[t + 1]`, trained where `loss_mask[t + 1]` is set and `t + 1` is in the same
    (non-padding) segment as `t`; `target_vision_mask[t] = vision_mask[t + 1]` says which targets
    are vision tokens, for per-modality losses. Computed before any ring layout, so a model's loss
    needs no shift (a shift of a layout-ordered or sequence-sharded array would be wrong or would
    move data).

    **Arguments:**

    - `row`: one packed row: `"tokens"`, `"segment_ids"`, `"loss_mask"`, `"vision_mask"` (each
      `[seq_len]`), and any other keys, which are kept.

    **Returns:**

    A new dict: `row`'s items plus `"targets"` (`[seq_len]`, the dtype of `"tokens"`; the last
    one is `tokens[-1]`, never trained), `"target_mask"` and `"target_vision_mask"` (bool `[seq_len]`).

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import with_targets

    row = {"tokens": np.array([5, 6, 7, 8, 9, 0], np.int32), "segment_ids": np.array([1, 1, 1, 2, 2, 0], np.int32),
           "loss_mask": np.array([0, 1, 1, 1, 1, 0], bool), "vision_mask": np.zeros(6, bool)}
    out = with_targets(row)
    assert out["targets"].tolist() == [6, 7, 8, 9, 0, 0]
    assert out["target_mask"].tolist() == [True, True, False, True, False, False]  # not across segments
    ```
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
        # grain's workers read absl flags, which are unparsed outside `absl.app.run` (an
        # UnparsedFlagAccessError at the first batch); their defaults are what we want.
        if not absl.flags.FLAGS.is_parsed():
            absl.flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        # Workers hand over batches in shared memory, unlinked when the array is garbage collected.
        # A batch still referenced at interpreter exit is collected after the modules are torn down,
        # where grain's `__del__` fails and the block leaks ("leaked shared_memory objects"); a copy
        # in this process lets the shared block go as soon as the batch is read.
        batches = batches.map(_copy_out_of_shared_memory)
    return batches


def _copy_out_of_shared_memory(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in batch.items()}


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
    vocab_size: int | None = None,
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

    The iteration ends when any row's stream runs out. There is no `num_workers`: the packers run
    in this process.

    **Arguments:**

    - `examples`: the whole dataset as a `MapDataset` of token sequences, the same on every process.
    - `seq_len`: the length of a row; with `layout`, divisible by `ring_size` (`2 · ring_size` for
      `"zigzag"`).
    - `batch_size`: rows per global batch.
    - `pad_id`: the padding token.
    - `rows`: the distinct rows in `[0, batch_size)` this process yields; default an even split by
      process index.
    - `overflow`: `"split"` (default) or `"reject"`, as in
      [`PackIterDataset`][data_pipelines.PackIterDataset].
    - `layout`: `None` (default) for natural order, or an `eqx_ring` layout name.
    - `ring_size`: the number of devices on the ring for `layout`, default 1; must be 1 without `layout`.
    - `vocab_size`: the model's vocabulary; with it each example's `"tokens"` are checked to lie
      in `[0, vocab_size)` before packing, as in [`packed_batches`][data_pipelines.packed_batches].
      Default `None`: not checked.

    **Returns:**

    A grain `IterDataset` of dicts with the keys [`ROW_KEYS`][data_pipelines.ROW_KEYS], each a
    `[len(rows), seq_len]` array holding the rows in ascending order. Turn them into global arrays
    with [`global_batch`][data_pipelines.global_batch]`(batch, mesh, batch_size=batch_size)`.

    **Raises:**

    `ValueError` if `rows` is `None` and `batch_size` is not divisible by the process count, if
    `rows` are not distinct indices in `[0, batch_size)`, or for the arguments
    [`packed_batches`][data_pipelines.packed_batches] refuses (`seq_len`, `batch_size`, `layout`,
    `ring_size`, `vocab_size`); while iterating, as `packed_batches` for an id outside `vocab_size`.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import ByteTokenizer, MovingShapes, PatchQuantizer, global_packed_batches
    from data_pipelines import video_text_examples

    tok = ByteTokenizer()
    examples = video_text_examples(MovingShapes(16, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                   process_index=0, process_count=1)

    def first_batch(rows):
        batches = global_packed_batches(examples, seq_len=128, batch_size=4, pad_id=tok.pad_id, rows=rows)
        return next(iter(batches))

    whole = first_batch(range(4))  # one process reads every row
    halves = [first_batch([0, 1]), first_batch([2, 3])]  # two processes read two rows each
    assert whole["tokens"].shape == (4, 128)
    assert np.array_equal(np.concatenate([h["tokens"] for h in halves]), whole["tokens"])
    ```
    """
    _check_batching(seq_len, batch_size, layout, ring_size, vocab_size)
    if vocab_size is not None:
        examples = examples.map_with_index(_CheckVocab(vocab_size))
    if rows is None:
        index, count = jax.process_index(), jax.process_count()
        if batch_size % count:
            raise ValueError(f"batch_size={batch_size} must be divisible by the process count {count}")
        rows = range(index * batch_size // count, (index + 1) * batch_size // count)
    rows = sorted(rows)
    if (not rows or not all(_is_int(r) for r in rows) or rows[0] < 0 or rows[-1] >= batch_size
            or len(set(rows)) != len(rows)):
        raise ValueError(f"rows must be distinct indices in [0, batch_size={batch_size}), got {rows}")
    streams = {}
    for r in rows:
        stream = PackIterDataset(examples[r::batch_size].to_iter_dataset(_IN_CALLER, allow_nones=True), seq_len, pad_id,
                                 overflow=overflow)
        stream = stream.map(with_targets)
        streams[r] = stream.map(ToRingLayout(layout, ring_size)) if layout is not None else stream
    return _RowStreams(streams)


# grain's default read options (16 threads reading 500 records ahead) are per stream: with one stream per row
# they started 16 threads per row (1,057 threads for 64 rows), which fought XLA's threads for the CPU and left
# training steps waiting for data. Packing a row is cheap, so each row's stream reads in the caller's thread.
_IN_CALLER = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


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
    device. When `sp` (or `tp`) spans processes, several processes hold the same rows. Pass them as
    `rows` to [`global_packed_batches`][data_pipelines.global_packed_batches].

    **Arguments:**

    - `mesh`: a mesh with the axes `("dp", "fsdp", "tp", "sp")`, e.g. from
      [`make_mesh`][eqx_ring.sharding.make_mesh].
    - `batch_size`: rows in the global batch, divisible by the `dp · fsdp` size.

    **Returns:**

    The row indices, sorted ascending, as a tuple of ints.

    **Example:**

    ```python
    from data_pipelines import process_rows
    from eqx_ring.sharding import make_mesh

    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)  # 8 devices, all in this one process
    assert process_rows(mesh, 4) == (0, 1, 2, 3)
    ```
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

    Call it outside `jit`, on every process, with the same `mesh`.

    **Arguments:**

    - `batch`: this process's rows, a mapping of name → `[rows, seq, ...]` array (e.g. a batch of
      [`packed_batches`][data_pipelines.packed_batches] or
      [`global_packed_batches`][data_pipelines.global_packed_batches]); `seq` divisible by the
      mesh's `sp` size.
    - `mesh`: the mesh, with the axes `("dp", "fsdp", "tp", "sp")`.
    - `batch_size`: the global number of rows (keyword only); `None` (default) concatenates equal
      shares in process order.

    **Returns:**

    A dict with the same keys of global `jax.Array`s, `[batch_size, seq, ...]` (or the sum of the
    processes' rows), dtypes kept, sharded by [`batch_sharding`][eqx_ring.sharding.batch_sharding].

    **Raises:**

    `ValueError` (with `batch_size`) if an array's first dimension is not the number of
    [`process_rows`][data_pipelines.process_rows].

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import global_batch
    from eqx_ring.sharding import batch_sharding, make_mesh

    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
    tokens = np.arange(4 * 16, dtype=np.int32).reshape(4, 16)
    batch = global_batch({"tokens": tokens}, mesh, batch_size=4)
    assert batch["tokens"].sharding == batch_sharding(mesh)
    assert np.array_equal(np.asarray(batch["tokens"]), tokens)
    ```
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
