"""`AttentionSpec` and `KernelTuning`: the settings a model owns once and hands to every layer."""

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ._checks import check_positive_int, is_positive_int
from ._layout import LAYOUTS
from ._ring import IMPLEMENTATIONS, STRATEGIES
from ._rope import RopeScaling


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """How the kernels tile the work: block sizes and which attention kernel runs.

    None of it changes a result beyond float rounding, nor any parameter, so it can be chosen per
    call ([`RingTransformer.__call__`][eqx_ring.RingTransformer.__call__]'s `tuning=`) without
    rebuilding the model: under `jit` it is static, so a new tuning compiles a new program.

    **Arguments:**

    - `query_chunk_size`: the attention kernel's query block size (default 512).
    - `key_chunk_size`: the attention kernel's key block size (default 512).
    - `ffn_chunk_size`: tokens per chunk of the [`BlockwiseFFN`][eqx_ring.BlockwiseFFN] (default 2048).
    - `implementation`: the attention kernel: `"xla"`, `"pallas"` (fused, for GPUs) or `None`
      (default: the fused kernel on a GPU when the shapes suit it); see
      [`blockwise_attention`][eqx_ring.blockwise_attention].
    - `kv_pieces`: on a ring, each device's key/value block travels in this many pieces, which
      divides the memory of the blocks in flight by it; with `strategy="allgather"`, the keys and
      values are gathered this many slices of kv heads at a time. Default `None`: 1 on a ring, one
      kv head at a time for the all-gather; see [`ring_attention`][eqx_ring.ring_attention].

    **Raises:** `ValueError` if a chunk size or `kv_pieces` (unless `None`) is not a positive int or
    `implementation` is unknown.
    """

    query_chunk_size: int = 512
    key_chunk_size: int = 512
    ffn_chunk_size: int = 2048
    implementation: str | None = None
    kv_pieces: int | None = None

    def __post_init__(self):
        for name in ("query_chunk_size", "key_chunk_size", "ffn_chunk_size"):
            check_positive_int(name, getattr(self, name))
        if self.kv_pieces is not None:
            check_positive_int("kv_pieces", self.kv_pieces)
        if self.implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {self.implementation!r}")


# Placement: where a model runs, not what it is; zoo files and configs do not save it.
_PLACEMENT = ("mesh", "head_axis")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Everything every attention layer of a model shares: masks, RoPE, the ring's layout and mesh, kernel tuning.

    Frozen and hashable, so it is a static part of a model under `jit`. A
    [`RingTransformer`][eqx_ring.RingTransformer] owns one and hands it to each of its layers at
    call time; the layers hold only their parameters and dimensions. Change it with
    [`replace`][eqx_ring.AttentionSpec.replace] and
    [`RingTransformer.with_spec`][eqx_ring.RingTransformer.with_spec].

    **Arguments:**

    - `causal`: causal mask (default `True`), as in
      [`dot_product_attention`][eqx_ring.dot_product_attention].
    - `causal_block_size`: tokens per causal block (default 1: ordinary causal attention); needs `causal`.
    - `sliding_window`: attend only to the last `sliding_window` tokens (itself included); default
      `None`: no window.
    - `attention_chunk_size`: attend only within chunks of this many tokens (Llama 4's chunked
      attention: `i` sees `j` only if `i // c == j // c`, with `causal` as set); default `None`: no chunks.
    - `logit_softcap`: `c`; every attention score `s` becomes `c · tanh(s / c)` before the masks
      (Gemma 2); default `None`: no cap.
    - `dropout`: the chance that each attention probability is dropped in training (see
      [`dot_product_attention`][eqx_ring.dot_product_attention]'s `dropout_rate`); the layers then
      need a `key` unless called with `inference=True`. Default 0: no dropout.
    - `rope_theta`: RoPE base (default `10_000.0`), or `None` for no rotary embedding.
    - `rope_scaling`: a [`RopeScaling`][eqx_ring.RopeScaling] of RoPE's frequencies (position
      interpolation or Llama 3's), or `None` (default) for none; needs `rope_theta`.
    - `layout`: the order of the sequence on the ring: `"contiguous"` (default), `"zigzag"` or
      `"striped"`; inputs must be in it (see [`to_layout`][eqx_ring.to_layout]).
    - `mesh`: a mesh to run the ring over, or `None` (default) for one device.
    - `seq_axis`: the mesh axis the sequence is split over (default `"sp"`); with
      `strategy="hybrid"`, the axis of the ring.
    - `strategy`: how attention reaches keys on other devices (see
      [`ring_attention`][eqx_ring.ring_attention]): `"ring"` (default), `"allgather"`, `"ulysses"`
      or `"hybrid"` (Ulysses' all-to-all over `ulysses_axis` within a ring over `seq_axis`; the
      sequence is split over both, `seq_axis` major). All compute the same attention.
    - `ulysses_axis`: the all-to-all axis of `strategy="hybrid"` (default `"usp"`, the axis
      [`make_mesh`][eqx_ring.sharding.make_mesh]`(usp=...)` adds); unused by the other strategies.
    - `head_axis`: a mesh axis to split the heads over (tensor parallelism), or `None` (default);
      needs a `mesh`.
    - `tuning`: the [`KernelTuning`][eqx_ring.KernelTuning] (default: its defaults).

    **Raises:** `ValueError` if `causal_block_size`, `sliding_window` or `attention_chunk_size` is not
    a positive int (or `None` for the last two), if `causal_block_size != 1` without `causal`, if
    `rope_theta` or `logit_softcap` is not a positive finite number or `None`, if `dropout` is not in
    [0, 1), if `rope_scaling` is
    given without `rope_theta`, if `layout` is unknown, if `head_axis` is given without a `mesh`,
    if `seq_axis` / `head_axis` (or, for the hybrid, `ulysses_axis`) is not an axis of `mesh`, if
    `strategy` is unknown, or if the hybrid's two axes are one; `TypeError` if `causal` is not a
    bool, `mesh` not a `jax.sharding.Mesh`, `rope_scaling` not a `RopeScaling` or `tuning` not a `KernelTuning`.

    **Example:**

    ```python
    import eqx_ring
    from eqx_ring.sharding import make_mesh

    spec = eqx_ring.AttentionSpec(layout="zigzag", mesh=make_mesh(sp=4))
    assert spec.ring_size == 4 and eqx_ring.AttentionSpec().ring_size == 1
    assert spec.replace(mesh=None).to_dict() == spec.to_dict()  # placement is not saved
    assert eqx_ring.AttentionSpec.from_dict(spec.to_dict()) == spec.replace(mesh=None)
    ```
    """

    causal: bool = True
    causal_block_size: int = 1
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    logit_softcap: float | None = None
    dropout: float = 0.0
    rope_theta: float | None = 10_000.0
    rope_scaling: RopeScaling | None = None
    layout: str = "contiguous"
    mesh: Mesh | None = None
    seq_axis: str = "sp"
    head_axis: str | None = None
    tuning: KernelTuning = KernelTuning()
    strategy: str = "ring"
    ulysses_axis: str = "usp"

    def __post_init__(self):
        if not isinstance(self.tuning, KernelTuning):
            raise TypeError(f"tuning must be a KernelTuning, got {type(self.tuning).__name__}")
        if not isinstance(self.causal, bool | np.bool_):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        check_positive_int("causal_block_size", self.causal_block_size)
        if self.causal_block_size != 1 and not self.causal:
            raise ValueError(f"causal_block_size={self.causal_block_size} sets the block of the causal mask, so it "
                             "needs causal=True; got causal=False")
        if self.sliding_window is not None and not is_positive_int(self.sliding_window):
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.attention_chunk_size is not None and not is_positive_int(self.attention_chunk_size):
            raise ValueError(f"attention_chunk_size must be a positive int or None, got {self.attention_chunk_size!r}")
        cap = self.logit_softcap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not math.isfinite(cap)
                                or cap <= 0):
            raise ValueError(f"logit_softcap must be a positive finite number or None, got {cap!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        theta = self.rope_theta
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, numbers.Real)
                                  or not math.isfinite(theta) or theta <= 0):
            raise ValueError(f"rope_theta must be a positive finite number or None, got {theta!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise TypeError(f"rope_scaling must be an eqx_ring.RopeScaling or None, got "
                                f"{type(self.rope_scaling).__name__}")
            if theta is None:
                raise ValueError("rope_scaling rescales RoPE's frequencies, so it needs a rope_theta; got "
                                 "rope_theta=None")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(self.mesh).__name__}")
        if self.head_axis is not None and self.mesh is None:
            raise ValueError(f"head_axis={self.head_axis!r} splits the heads over a mesh axis, so it needs a mesh; "
                             "got mesh=None (inside your own shard_map, split the heads there and pass head_axis=None)")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        hybrid = self.strategy == "hybrid"
        if hybrid and self.ulysses_axis == self.seq_axis:
            raise ValueError(f"strategy='hybrid' needs two mesh axes, the ring's seq_axis and the all-to-all's "
                             f"ulysses_axis; both are {self.seq_axis!r}")
        for name, axis in (("seq_axis", self.seq_axis), ("head_axis", self.head_axis),
                           ("ulysses_axis", self.ulysses_axis if hybrid else None)):
            if self.mesh is not None and axis is not None and axis not in self.mesh.axis_names:
                raise ValueError(f"{name}={axis!r} is not an axis of the mesh, whose axes are {self.mesh.axis_names}")

    @property
    def sequence_axes(self) -> str | tuple[str, str]:
        """The mesh axes the sequence is split over: `seq_axis`, or `(seq_axis, ulysses_axis)` for the hybrid.

        Use it in a `PartitionSpec` (`P(None, spec.sequence_axes)` for `[batch, seq]`) and as the
        `axis_name` of [`ring_attention`][eqx_ring.ring_attention].

        **Returns:** a `str`, or a pair of them.
        """
        return (self.seq_axis, self.ulysses_axis) if self.strategy == "hybrid" else self.seq_axis

    @property
    def ring_size(self) -> int:
        """Devices the sequence is split over: the size of `seq_axis` in `mesh` (times that of
        `ulysses_axis` for the hybrid), 1 without a mesh. The layout splits the sequence into this many shards.

        **Returns:** an `int`.
        """
        if self.mesh is None:
            return 1
        axes = self.sequence_axes
        return math.prod(int(self.mesh.shape[a]) for a in ((axes,) if isinstance(axes, str) else axes))

    @property
    def head_shards(self) -> int:
        """How many ways the heads are split: the size of `head_axis` in `mesh`, 1 without one.

        **Returns:** an `int`.
        """
        return 1 if self.head_axis is None else int(self.mesh.shape[self.head_axis])

    def replace(self, **changes: Any) -> "AttentionSpec":
        """A copy with some fields replaced (`dataclasses.replace`; the copy is checked again).

        **Arguments:**

        - `**changes`: fields and their new values, e.g. `mesh=None` or `layout="zigzag"`.

        **Returns:** a new `AttentionSpec`.
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready values, without its placement (`mesh`, `head_axis`): what a config saves.

        **Returns:** a `dict` of the other fields, `tuning` and `rope_scaling` (unless `None`) as nested
        `dict`s.
        """
        return {f.name: (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
                for f in dataclasses.fields(self) if f.name not in _PLACEMENT
                for value in (getattr(self, f.name),)}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "AttentionSpec":
        """The spec [`to_dict`][eqx_ring.AttentionSpec.to_dict] wrote (without placement).

        **Arguments:**

        - `fields`: a mapping of field names to values, as `to_dict` returns (`tuning` and
          `rope_scaling` mappings of their fields); `mesh` and `head_axis` may appear only as `None`.

        **Returns:** a new `AttentionSpec` with `mesh=None` and `head_axis=None`.

        **Raises:** `ValueError` if `fields` holds a placement that is not `None` or unknown names, and
        as the constructor.
        """
        fields = dict(fields)
        placed = sorted(name for name in _PLACEMENT if fields.pop(name, None) is not None)
        if placed:
            raise ValueError(f"fields {placed} are a placement, which a saved spec does not hold; give them to the "
                             "model instead")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"fields {unknown} are not AttentionSpec fields; expected some of {sorted(known)}")
        for name, cls_ in (("tuning", KernelTuning), ("rope_scaling", RopeScaling)):
            if isinstance(fields.get(name), Mapping):
                fields[name] = cls_(**fields[name])
        return cls(**fields)
