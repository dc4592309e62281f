"""`RingAttention`: multi-head self-attention whose kernel is blockwise on one device or a ring over a mesh."""

import math
import numbers
from functools import partial
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_array, check_positive_int, is_positive_int, known_value
from ._layout import LAYOUTS, check_layout, layout_positions, shard_positions
from ._ring import IMPLEMENTATIONS, blockwise_attention, fused_is_interpreted, ring_attention
from ._rope import apply_rope


def linear(layer: eqx.nn.Linear, x: Float[Array, "seq in"]) -> Float[Array, "seq out"]:
    """An `eqx.nn.Linear` applied to every row of `x` as one matmul."""
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


class RingAttention(eqx.Module):
    """Multi-head self-attention with RoPE, GQA and masks, computed exactly in O(chunk²) memory.

    The projections run in the global view; the attention itself is
    [`blockwise_attention`][eqx_ring.blockwise_attention] when `mesh` is `None`, and
    [`ring_attention`][eqx_ring.ring_attention] inside `jax.shard_map` over `seq_axis` (and heads
    over `head_axis`) when a mesh is given. Called inside a caller's own `shard_map` in which
    `seq_axis` is manual, it works on the local shard and runs the ring directly.

    Like every Equinox layer it takes one example, `[seq, d_model]`; batch it with `jax.vmap`
    (over a mesh, `jax.vmap(attn, spmd_axis_name=("dp", "fsdp"))` keeps each data shard's examples
    on their devices). The sequence must be in `layout` order (see
    [`to_layout`][eqx_ring.to_layout]); masks use true positions, so the result equals attention
    over the naturally ordered sequence.

    [`prefill`][eqx_ring.RingAttention.prefill] and
    [`decode_step`][eqx_ring.RingAttention.decode_step] run it with a KV cache, for generation.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import eqx_ring
    from eqx_ring.sharding import make_mesh

    x = jax.random.normal(jax.random.key(1), (64, 32))  # [seq, d_model], natural order
    kw = dict(num_kv_heads=2, query_chunk_size=16, key_chunk_size=16, key=jax.random.key(0))
    attn = eqx_ring.RingAttention(32, 4, **kw)  # causal, with RoPE; one device: blockwise attention
    y = eqx.filter_jit(attn)(x)
    assert y.shape == (64, 32)

    # The same weights as a ring over 8 devices, on a zigzag-ordered sequence.
    ring = eqx_ring.RingAttention(32, 4, layout="zigzag", mesh=make_mesh(sp=8), **kw)
    y_ring = eqx.filter_jit(ring)(eqx_ring.to_layout(x, "zigzag", 8, axis=0))
    assert jnp.allclose(eqx_ring.from_layout(y_ring, "zigzag", 8, axis=0), y, atol=1e-5)
    ```
    """

    # Logical axes for eqx_ring.sharding (see DEFAULT_RULES): weights are [out, in].
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "query_proj.weight": ("heads", "embed"), "query_proj.bias": ("heads",),
        "key_proj.weight": ("kv_heads", "embed"), "key_proj.bias": ("kv_heads",),
        "value_proj.weight": ("kv_heads", "embed"), "value_proj.bias": ("kv_heads",),
        # The d_model-wide bias is added to an output whose d_model is whole: it stays whole.
        "output_proj.weight": ("embed", "heads"), "output_proj.bias": (None,),
    }

    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    output_proj: eqx.nn.Linear
    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    causal_block_size: int = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    rope_theta: float | None = eqx.field(static=True)
    layout: str = eqx.field(static=True)
    query_chunk_size: int = eqx.field(static=True)
    key_chunk_size: int = eqx.field(static=True)
    implementation: str | None = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True)
    seq_axis: str = eqx.field(static=True)
    head_axis: str | None = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = True,
        causal_block_size: int = 1,
        sliding_window: int | None = None,
        rope_theta: float | None = 10_000.0,
        use_bias: bool = False,
        layout: str = "contiguous",
        query_chunk_size: int = 512,
        key_chunk_size: int = 512,
        implementation: str | None = None,
        mesh: Mesh | None = None,
        seq_axis: str = "sp",
        head_axis: str | None = None,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: width of the input and output.
        - `num_heads`: query heads.
        - `num_kv_heads`: key/value heads (GQA/MQA); must divide `num_heads`. Defaults to `num_heads`.
        - `head_dim`: width of each head; defaults to `d_model // num_heads`.
        - `causal`: causal mask (default `True`), as in
          [`dot_product_attention`][eqx_ring.dot_product_attention].
        - `causal_block_size`: tokens per causal block (default 1: ordinary causal attention).
        - `sliding_window`: attend only to the last `sliding_window` tokens (itself included); default `None`: none.
        - `rope_theta`: RoPE base (default `10_000.0`), or `None` for no rotary embedding.
        - `use_bias`: whether the four projections have biases (default `False`).
        - `layout`: the order of the sequence on the ring: `"contiguous"` (default), `"zigzag"` or
          `"striped"`; see [`to_layout`][eqx_ring.to_layout].
        - `query_chunk_size`: the kernel's query block size (default 512).
        - `key_chunk_size`: the kernel's key block size (default 512).
        - `implementation`: the attention kernel: `"xla"`, `"pallas"` (fused, for GPUs) or `None`
          (default: the fused kernel on a GPU when the shapes suit it); see
          [`blockwise_attention`][eqx_ring.blockwise_attention].
        - `mesh`: a mesh to run the ring over, or `None` (default) for one device.
        - `seq_axis`: the mesh axis the sequence is split over (default `"sp"`).
        - `head_axis`: a mesh axis to split the heads over (tensor parallelism), or `None` (default).
          `num_kv_heads` must be divisible by its size.
        - `dtype`: parameter dtype; defaults to float32.
        - `key`: a `jax.random.PRNGKey` for the initialisation.

        **Raises:**

        `ValueError` if `d_model`, `num_heads`, `num_kv_heads` or `head_dim` is not a positive int, if
        `d_model` is not divisible by `num_heads` (and no `head_dim` is given), if `num_heads` is not
        a multiple of `num_kv_heads`, if RoPE is on and `head_dim` is odd, if `rope_theta` is not a
        positive finite number (or `None`), if a chunk size, `causal_block_size` or `sliding_window`
        is not a positive int, if `causal_block_size != 1` without `causal=True`, if `layout` or
        `implementation` is unknown, if `head_axis` is given without a `mesh`, or if `seq_axis` /
        `head_axis` is not an axis of `mesh`; `TypeError` if `causal` is not a bool.
        """
        # Sizes are checked before they size the projections (0 or less fails inside JAX otherwise).
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value is not None and not is_positive_int(value):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model={d_model} must be divisible by num_heads={num_heads}, or pass head_dim explicitly"
                )
            head_dim = d_model // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        qk, kk, vk, ok = jax.random.split(key, 4)
        lin = partial(eqx.nn.Linear, use_bias=use_bias, dtype=dtype)
        self.query_proj = lin(d_model, num_heads * head_dim, key=qk)
        self.key_proj = lin(d_model, num_kv_heads * head_dim, key=kk)
        self.value_proj = lin(d_model, num_kv_heads * head_dim, key=vk)
        self.output_proj = lin(num_heads * head_dim, d_model, key=ok)
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.causal_block_size = causal_block_size
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.layout = layout
        self.query_chunk_size = query_chunk_size
        self.key_chunk_size = key_chunk_size
        self.implementation = implementation
        self.mesh = mesh
        self.seq_axis = seq_axis
        self.head_axis = head_axis

    def __check_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        theta = self.rope_theta
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, numbers.Real)
                                  or not math.isfinite(theta) or theta <= 0):
            raise ValueError(f"rope_theta must be a positive finite number or None, got {theta!r}")
        if self.rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of features: head_dim={self.head_dim} must be even")
        for name in ("query_chunk_size", "key_chunk_size", "causal_block_size"):
            check_positive_int(name, getattr(self, name))
        if self.sliding_window is not None and not is_positive_int(self.sliding_window):
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if not isinstance(self.causal, bool | np.bool_):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        if self.causal_block_size != 1 and not self.causal:
            raise ValueError(f"causal_block_size={self.causal_block_size} sets the block of the causal mask, so it "
                             "needs causal=True; got causal=False")
        if self.head_axis is not None and self.mesh is None:
            raise ValueError(f"head_axis={self.head_axis!r} splits the heads over a mesh axis, so it needs a mesh; "
                             "got mesh=None (inside your own shard_map, split the heads there and pass head_axis=None)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {self.implementation!r}")
        for name, axis in (("seq_axis", self.seq_axis), ("head_axis", self.head_axis)):
            if self.mesh is not None and axis is not None and axis not in self.mesh.axis_names:
                raise ValueError(f"{name}={axis!r} is not an axis of the mesh, whose axes are {self.mesh.axis_names}")
        if self.mesh is not None and self.head_axis is not None and self.num_kv_heads % self.mesh.shape[self.head_axis]:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must be divisible by the size "
                f"{self.mesh.shape[self.head_axis]} of head_axis={self.head_axis!r}"
            )

    @classmethod
    def from_multihead_attention(cls, mha: eqx.nn.MultiheadAttention, **kwargs) -> "RingAttention":
        """A `RingAttention` holding `mha`'s weights, computing what `mha(x, x, x)` computes.

        Unless given in `kwargs`, the result is non-causal with no RoPE, like `mha`. Any other
        constructor argument (`mesh`, `layout`, chunk sizes, masks) may be passed too, except
        those fixed by `mha`'s weights.

        **Arguments:**

        - `mha`: an `eqx.nn.MultiheadAttention` used as self-attention.
        - `**kwargs`: further [`RingAttention`][eqx_ring.RingAttention] constructor arguments
          (keyword only), e.g. `causal=True`, `mesh=...`; not `num_kv_heads`, `head_dim`,
          `use_bias`, `dtype` or `key`.

        **Returns:**

        A `RingAttention` whose projections are `mha`'s (the same arrays), with `num_heads` and
        `head_dim` taken from `mha`.

        **Raises:**

        `TypeError` if `kwargs` holds `num_kv_heads`, `head_dim`, `use_bias`, `dtype` or `key`.
        `ValueError` if `mha` is not a self-attention layer that `RingAttention` can
        express (equal query/key/value/output sizes and equal qk/vo head sizes), or if it has
        attention dropout, which `RingAttention` does not implement.
        """
        fixed = {"num_kv_heads", "head_dim", "use_bias", "dtype", "key"} & kwargs.keys()
        if fixed:
            raise TypeError(f"{sorted(fixed)} are taken from the MultiheadAttention and cannot be passed")
        sizes = (mha.query_size, mha.key_size, mha.value_size, mha.output_size)
        if len(set(sizes)) != 1 or mha.qk_size != mha.vo_size:
            raise ValueError(
                "RingAttention is self-attention with one width and one head size; got query/key/value/output "
                f"sizes {sizes} and qk_size={mha.qk_size}, vo_size={mha.vo_size}"
            )
        if mha.dropout.p != 0:
            raise ValueError(
                f"RingAttention has no attention dropout but mha.dropout.p={mha.dropout.p}; set it to 0 first "
                "(eqx.tree_at(lambda m: m.dropout.p, mha, 0.0))"
            )
        kwargs.setdefault("causal", False)
        kwargs.setdefault("rope_theta", None)
        attn = cls(mha.query_size, mha.num_heads, head_dim=mha.qk_size, dtype=mha.query_proj.weight.dtype,
                   key=jax.random.key(0), **kwargs)
        return eqx.tree_at(
            lambda a: (a.query_proj, a.key_proj, a.value_proj, a.output_proj),
            attn,
            (mha.query_proj, mha.key_proj, mha.value_proj, mha.output_proj),
        )

    def __call__(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """**Arguments:**

        - `x`: the sequence, `[seq, d_model]` (or, inside a caller's `shard_map` over `seq_axis`,
          the local shard), in `layout` order.
        - `positions`: `[seq]` ints, each token's position for RoPE (e.g. restarting in every
          packed segment), in the same order as `x`. Default `None`: the true position of each
          slot in the layout. Masks never use it.
        - `segment_ids`: `[seq]` packed-sequence ids; tokens attend only within their own id.
          Default `None`: one segment.
        - `key`: unused (there is no dropout); accepted so the layer drops into Equinox code that
          passes it.
        - `inference`: unused, likewise.

        **Returns:**

        The attention output, `[seq, d_model]`, like `x` (and in its layout order).

        **Raises:**

        `ValueError` if `x` is not `[seq, d_model]` or `positions` / `segment_ids` is not `[seq]`,
        if a mesh is given and `seq` does not split over its `seq_axis` in `layout`, or if a chunk
        size does not divide the (local) sequence; `TypeError` if `x` is not floating or
        `positions` / `segment_ids` are not integers. (With jaxtyping's import hook on, its
        `TypeCheckError` names a wrong shape or dtype first.)
        """
        del key, inference
        with jax.named_scope("eqx_ring.RingAttention"):
            return self.prefill(x, positions=positions, segment_ids=segment_ids)[0]

    def prefill(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
    ) -> tuple[
        Float[Array, "seq {self.d_model}"],
        Float[Array, "seq {self.num_kv_heads} {self.head_dim}"],
        Float[Array, "seq {self.num_kv_heads} {self.head_dim}"],
    ]:
        """What `__call__` computes, and the keys (after RoPE) and values, to start a KV cache.

        **Arguments:**

        - `x`: the sequence, `[seq, d_model]`, in `layout` order, as for `__call__`.
        - `positions`: `[seq]` RoPE positions, as for `__call__`; default `None`: the true
          position of each slot.
        - `segment_ids`: `[seq]` packed-sequence ids, as for `__call__`; default `None`: one segment.

        **Returns:**

        `(output, keys, values)`: the output `[seq, d_model]` and the keys and values
        `[seq, num_kv_heads, head_dim]`, all in `layout` order (with a mesh, laid out over
        `seq_axis` like `x`), ready for [`decode_step`][eqx_ring.RingAttention.decode_step].

        **Raises:**

        As `__call__`.
        """
        check_array("x", x, (None, self.d_model), ("seq", "d_model"))
        seq = x.shape[0]
        for name, ids in (("positions", positions), ("segment_ids", segment_ids)):
            if ids is not None:
                check_array(name, ids, (seq,), ("seq",), kind="int")
        # Manual axes are those of a caller's shard_map we are traced inside.
        inside = self.seq_axis in jax.sharding.get_abstract_mesh().manual_axes
        ring = self._ring_size(seq, inside)
        if positions is None:
            if inside:
                positions = shard_positions(jax.lax.axis_index(self.seq_axis), seq, self.layout, ring)
            else:
                positions = jnp.asarray(layout_positions(seq, self.layout, ring))
        q, k, v = self._project(x, positions)
        o = self._attend(q, k, v, segment_ids, inside)
        return linear(self.output_proj, o.reshape(seq, self.num_heads * self.head_dim)), k, v

    def decode_step(
        self,
        x: Float[Array, " {self.d_model}"],
        keys: Float[Array, "cache {self.num_kv_heads} {self.head_dim}"],
        values: Float[Array, "cache {self.num_kv_heads} {self.head_dim}"],
        segment_ids: Int[Array, " cache"],
        *,
        index: Int[Array, ""],
        position: Int[Array, ""],
        segment: Int[Array, ""],
    ) -> tuple[
        Float[Array, " {self.d_model}"],
        Float[Array, "cache {self.num_kv_heads} {self.head_dim}"],
        Float[Array, "cache {self.num_kv_heads} {self.head_dim}"],
    ]:
        """Attend from one new token over a KV cache, after writing its key and value into the cache.

        The cache holds a sequence in `layout` order, split over `seq_axis` when there is a mesh.
        Each device writes the new key and value if it owns the token's slot, attends over its own
        slots only, and the devices' partial results (max, sum and numerator of the softmax) are
        merged by one `pmax` and two `psum`s: nothing of the cache moves between devices.

        **Arguments:**

        - `x`: the new token's input, `[d_model]`.
        - `keys`: the cached keys, `[cache, num_kv_heads, head_dim]` in `layout` order (as
          [`prefill`][eqx_ring.RingAttention.prefill] returned them, or a previous `decode_step`).
        - `values`: the cached values, `[cache, num_kv_heads, head_dim]`, likewise.
        - `segment_ids`: `[cache]`, the cached tokens' segments; the token sees only its own `segment`.
        - `index`: scalar int, the token's index in the (natural-order) sequence; its key and value
          are written at that index's slot, and it sees indices `<= index` (and, with
          `sliding_window=w`, `> index - w`). Keyword only, like the two below.
        - `position`: scalar int, its RoPE position.
        - `segment`: scalar int, its segment id.

        **Returns:**

        `(output, keys, values)`: the output `[d_model]` and the cache with the token's key and
        value written, `[cache, num_kv_heads, head_dim]` each.

        **Raises:**

        `ValueError` if `head_axis` is set (decoding does not split heads), if an argument's shape is
        not the one above, if `index` is known and outside `[0, cache)`, or if with a mesh the cache
        length does not split over `seq_axis` in `layout`; `TypeError` if `x`, `keys`, `values` are
        not floating or `segment_ids`, `index`, `position`, `segment` are not integers. A traced
        `index` (under `jit`) outside `[0, cache)` raises at run time, through `eqx.error_if`:
        without the check the token would be written nowhere and dropped silently.
        """
        if self.head_axis is not None:
            raise ValueError(f"decode_step does not split heads: build the decoding model with head_axis=None, got "
                             f"head_axis={self.head_axis!r}")
        check_array("x", x, (self.d_model,), ("d_model",))
        heads = (self.num_kv_heads, self.head_dim)
        check_array("keys", keys, (None, *heads), ("cache", "num_kv_heads", "head_dim"))
        size = keys.shape[0]
        check_array("values", values, (size, *heads), ("cache", "num_kv_heads", "head_dim"))
        check_array("segment_ids", segment_ids, (size,), ("cache",), kind="int")
        index, position, segment = (jnp.asarray(a) for a in (index, position, segment))
        for name, scalar in (("index", index), ("position", position), ("segment", segment)):
            check_array(name, scalar, (), (), kind="int")
        index = self._check_index(index, size)
        return self._decode_step(x, keys, values, segment_ids, index=index, position=position, segment=segment)

    def _decode_step(self, x, keys, values, segment_ids, *, index, position, segment):
        """`decode_step` on checked arguments ([`RingTransformer`][eqx_ring.RingTransformer] checks the index once
        per token, not once per layer)."""
        q, k, v = self._project(x[None], position[None])
        if self.mesh is None:
            o, keys, values = self._decode_local(q, k, v, keys, values, segment_ids, index, segment, sharded=False)
        else:
            check_layout(self.layout, keys.shape[0], self.mesh.shape[self.seq_axis], what="cache length")
            cache, one = P(self.seq_axis), P()
            o, keys, values = jax.shard_map(
                partial(self._decode_local, sharded=True), mesh=self.mesh,
                in_specs=(one, one, one, cache, cache, cache, one, one), out_specs=(one, cache, cache),
            )(q, k, v, keys, values, segment_ids, index, segment)
        return linear(self.output_proj, o.reshape(1, self.num_heads * self.head_dim))[0], keys, values

    @staticmethod
    def _check_index(index, size: int):
        """`index`, checked to be a slot of a `size`-slot cache: now if it is known, at run time if traced."""
        message = f"index must be in [0, {size}): the KV cache has {size} slots (keys.shape[0])"
        known = known_value(index)
        if known is None:
            return eqx.error_if(index, (index < 0) | (index >= size), message)
        if not 0 <= known < size:
            raise ValueError(f"{message}, got index={known}")
        return index

    def _decode_local(self, q, k, v, keys, values, segment_ids, index, segment, *, sharded: bool):
        """One query against this device's cache slots; merged over the ring when `sharded`."""
        n = jax.lax.axis_size(self.seq_axis) if sharded else 1
        shard = jax.lax.axis_index(self.seq_axis) if sharded else 0
        true = shard_positions(shard, keys.shape[0], self.layout, n)
        write = true == index
        keys = jnp.where(write[:, None, None], k.astype(keys.dtype), keys)
        values = jnp.where(write[:, None, None], v.astype(values.dtype), values)
        visible = (true <= index) & (jnp.where(write, segment, segment_ids) == segment)
        if self.sliding_window is not None:
            visible &= index - true < self.sliding_window
        group = self.num_heads // self.num_kv_heads
        qg = q[0].reshape(self.num_kv_heads, group, self.head_dim).astype(jnp.float32) * self.head_dim**-0.5
        scores = jnp.einsum("kgd,tkd->kgt", qg, keys.astype(jnp.float32))
        scores = jnp.where(visible, scores, -jnp.inf)
        m = scores.max(-1)
        seen = jnp.isfinite(m)  # false where none of this device's slots is visible
        p = jnp.exp(scores - jnp.where(seen, m, 0.0)[..., None])
        l, o = p.sum(-1), jnp.einsum("kgt,tkd->kgd", p, values.astype(jnp.float32))
        if sharded:
            m_all = jax.lax.pmax(m, self.seq_axis)
            weight = jnp.where(seen, jnp.exp(m - m_all), 0.0)
            l = jax.lax.psum(l * weight, self.seq_axis)
            o = jax.lax.psum(o * weight[..., None], self.seq_axis)
        # The token always sees itself, so l > 0 after the merge.
        return (o / l[..., None]).reshape(1, self.num_heads, self.head_dim).astype(q.dtype), keys, values

    def _project(self, x, positions):
        """Queries, keys and values of `x`, rotated by RoPE at `positions`."""
        seq = x.shape[0]

        def heads(layer, n):
            return linear(layer, x).reshape(seq, n, self.head_dim)

        q = heads(self.query_proj, self.num_heads)
        k = heads(self.key_proj, self.num_kv_heads)
        v = heads(self.value_proj, self.num_kv_heads)
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        return q, k, v

    def _ring_size(self, seq: int, inside: bool) -> int:
        """Devices on the sequence ring (1 without one); checks that `seq` splits over them."""
        if inside:
            return jax.lax.axis_size(self.seq_axis)
        if self.mesh is None:
            return 1
        n = self.mesh.shape[self.seq_axis]
        check_layout(self.layout, seq, n, what=f"x seq (split over {self.seq_axis!r})")
        return n

    def _attend(self, q, k, v, segment_ids, inside: bool):
        kernel_kw = dict(
            causal=self.causal,
            causal_block_size=self.causal_block_size,
            sliding_window=self.sliding_window,
            query_chunk_size=self.query_chunk_size,
            key_chunk_size=self.key_chunk_size,
            implementation=self.implementation,
        )
        if inside:
            return ring_attention(q, k, v, axis_name=self.seq_axis, layout=self.layout, segment_ids=segment_ids,
                                  **kernel_kw)
        if self.mesh is None:
            return blockwise_attention(q, k, v, segment_ids=segment_ids, **kernel_kw)
        ring = partial(ring_attention, axis_name=self.seq_axis, layout=self.layout, **kernel_kw)
        qkv_spec = P(self.seq_axis, self.head_axis, None)
        # Pallas's interpreter (the fused kernel off GPU, for tests) trips jax 0.10's varying-axes check.
        check_vma = not fused_is_interpreted(self.implementation)
        if segment_ids is None:
            return jax.shard_map(ring, mesh=self.mesh, in_specs=(qkv_spec,) * 3, out_specs=qkv_spec,
                                 check_vma=check_vma)(q, k, v)

        def with_ids(q, k, v, ids):
            return ring(q, k, v, segment_ids=ids)

        return jax.shard_map(with_ids, mesh=self.mesh, in_specs=(qkv_spec,) * 3 + (P(self.seq_axis),),
                             out_specs=qkv_spec, check_vma=check_vma)(q, k, v, segment_ids)

