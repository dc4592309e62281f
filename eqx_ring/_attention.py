"""`RingAttention`: multi-head self-attention whose kernel is blockwise on one device or a ring over a mesh."""

from functools import partial
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_array, check_positive_int, is_positive_int, known_value
from ._layout import check_layout, layout_positions, shard_positions
from ._ring import blockwise_attention, fused_is_interpreted, ring_attention
from ._rope import apply_rope
from ._spec import AttentionSpec

DEFAULT_SPEC = AttentionSpec()


def check_spec(spec, num_heads: int, num_kv_heads: int, head_dim: int) -> AttentionSpec:
    """`spec`, once it is an `AttentionSpec` that heads of these sizes can run (`None`: the default spec)."""
    spec = DEFAULT_SPEC if spec is None else spec
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an eqx_ring.AttentionSpec, got {type(spec).__name__}")
    if spec.rope_theta is not None and head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of features: head_dim={head_dim} must be even (or use a spec with "
                         "rope_theta=None)")
    if num_kv_heads % spec.head_shards:
        raise ValueError(f"num_kv_heads={num_kv_heads} must be divisible by the size {spec.head_shards} of "
                         f"head_axis={spec.head_axis!r}")
    return spec


def inside_shard_map(spec: AttentionSpec) -> bool:
    """Whether we are traced inside a caller's `shard_map` in which the spec's sequence axes are manual."""
    axes = spec.sequence_axes
    manual = jax.sharding.get_abstract_mesh().manual_axes
    return all(a in manual for a in ((axes,) if isinstance(axes, str) else axes))


class RingAttention(eqx.Module):
    """Multi-head self-attention with RoPE, GQA and masks, computed exactly in O(chunk²) memory.

    The layer holds its projections and head sizes only; how it attends (masks, RoPE, layout,
    mesh, kernel tuning) is the [`AttentionSpec`][eqx_ring.AttentionSpec] passed to each call,
    which a [`RingTransformer`][eqx_ring.RingTransformer] owns and hands to all its layers. The
    projections run in the global view; the attention itself is
    [`blockwise_attention`][eqx_ring.blockwise_attention] when the spec has no mesh, and
    [`ring_attention`][eqx_ring.ring_attention] inside `jax.shard_map` over `seq_axis` (and heads
    over `head_axis`) when it has one. Called inside a caller's own `shard_map` in which
    `seq_axis` is manual, it works on the local shard and runs the ring directly.

    Like every Equinox layer it takes one example, `[seq, d_model]`; batch it with `jax.vmap`
    (over a mesh, `jax.vmap(attn, spmd_axis_name=("dp", "fsdp"))` keeps each data shard's examples
    on their devices). The sequence must be in the spec's `layout` order (see
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
    attn = eqx_ring.RingAttention(32, 4, num_kv_heads=2, key=jax.random.key(0))
    # Causal, with RoPE; no mesh: blockwise attention on one device.
    spec = eqx_ring.AttentionSpec(tuning=eqx_ring.KernelTuning(query_chunk_size=16, key_chunk_size=16))
    y = eqx.filter_jit(attn)(x, spec=spec)
    assert y.shape == (64, 32)

    # The same layer as a ring over 8 devices, on a zigzag-ordered sequence.
    ring = spec.replace(layout="zigzag", mesh=make_mesh(sp=8))
    y_ring = eqx.filter_jit(attn)(eqx_ring.to_layout(x, "zigzag", 8, axis=0), spec=ring)
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
        # One logit per query head, split over the heads as the queries are.
        "sinks": ("heads",),
    }

    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    output_proj: eqx.nn.Linear
    sinks: Float[Array, " {self.num_heads}"] | None
    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = False,
        qkv_bias: bool | None = None,
        use_sinks: bool = False,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: width of the input and output.
        - `num_heads`: query heads.
        - `num_kv_heads`: key/value heads (GQA/MQA); must divide `num_heads`. Defaults to `num_heads`.
        - `head_dim`: width of each head; defaults to `d_model // num_heads`.
        - `use_bias`: whether the four projections have biases (default `False`).
        - `qkv_bias`: whether the query, key and value projections have biases, the output one's
          following `use_bias` (Qwen2 has these three only); default `None`: `use_bias`.
        - `use_sinks`: whether each query head has a learnable sink logit, `sinks` (`[num_heads]`,
          initialised to 0), that joins every softmax denominator of its head with no value
          (gpt-oss's attention sinks); default `False`.
        - `dtype`: parameter dtype; defaults to float32.
        - `key`: a `jax.random.PRNGKey` for the initialisation.

        **Raises:**

        `ValueError` if `d_model`, `num_heads`, `num_kv_heads` or `head_dim` is not a positive int, if
        `d_model` is not divisible by `num_heads` (and no `head_dim` is given), or if `num_heads` is
        not a multiple of `num_kv_heads`.
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
        qkv = partial(eqx.nn.Linear, use_bias=use_bias if qkv_bias is None else qkv_bias, dtype=dtype)
        self.query_proj = qkv(d_model, num_heads * head_dim, key=qk)
        self.key_proj = qkv(d_model, num_kv_heads * head_dim, key=kk)
        self.value_proj = qkv(d_model, num_kv_heads * head_dim, key=vk)
        self.output_proj = eqx.nn.Linear(num_heads * head_dim, d_model, use_bias=use_bias, dtype=dtype, key=ok)
        self.sinks = jnp.zeros(num_heads, jnp.float32 if dtype is None else dtype) if use_sinks else None
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def __check_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_multihead_attention(cls, mha: eqx.nn.MultiheadAttention) -> "RingAttention":
        """A `RingAttention` holding `mha`'s weights; called with `spec=RingAttention.MHA_SPEC` (non-causal, no RoPE;
        replace its mesh, layout or tuning as needed) it computes what `mha(x, x, x)` computes.

        **Arguments:**

        - `mha`: an `eqx.nn.MultiheadAttention` used as self-attention.

        **Returns:**

        A `RingAttention` whose projections are `mha`'s (the same arrays), with `num_heads` and
        `head_dim` taken from `mha`.

        **Raises:**

        `ValueError` if `mha` is not a self-attention layer that `RingAttention` can
        express (equal query/key/value/output sizes and equal qk/vo head sizes), or if it has
        attention dropout: a layer holds no settings, so the rate belongs in the spec it is called
        with (`MHA_SPEC.replace(dropout=p)`), whose dropped set is our hash's, not Equinox's draw.
        """
        sizes = (mha.query_size, mha.key_size, mha.value_size, mha.output_size)
        if len(set(sizes)) != 1 or mha.qk_size != mha.vo_size:
            raise ValueError(
                "RingAttention is self-attention with one width and one head size; got query/key/value/output "
                f"sizes {sizes} and qk_size={mha.qk_size}, vo_size={mha.vo_size}"
            )
        if mha.dropout.p != 0:
            raise ValueError(
                f"mha.dropout.p={mha.dropout.p}: a RingAttention's dropout rate is its spec's, not the layer's; "
                "convert eqx.tree_at(lambda m: m.dropout.p, mha, 0.0) and call the layer with "
                f"spec=RingAttention.MHA_SPEC.replace(dropout={mha.dropout.p}) and key="
            )
        attn = cls(mha.query_size, mha.num_heads, head_dim=mha.qk_size, dtype=mha.query_proj.weight.dtype,
                   key=jax.random.key(0))
        return eqx.tree_at(
            lambda a: (a.query_proj, a.key_proj, a.value_proj, a.output_proj),
            attn,
            (mha.query_proj, mha.key_proj, mha.value_proj, mha.output_proj),
        )

    MHA_SPEC: ClassVar[AttentionSpec] = AttentionSpec(causal=False, rope_theta=None)
    """The spec under which a layer from [`from_multihead_attention`][eqx_ring.RingAttention.from_multihead_attention]
    computes what the `eqx.nn.MultiheadAttention` did: no mask, no RoPE."""

    def __call__(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        spec: AttentionSpec | None = None,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """**Arguments:**

        - `x`: the sequence, `[seq, d_model]` (or, inside a caller's `shard_map` over `seq_axis`,
          the local shard), in the spec's `layout` order.
        - `spec`: how to attend, an [`AttentionSpec`][eqx_ring.AttentionSpec]; default `None`:
          `AttentionSpec()` (causal, RoPE, one device).
        - `positions`: `[seq]` ints, each token's position for RoPE (e.g. restarting in every
          packed segment), in the same order as `x`. Default `None`: the true position of each
          slot in the layout. Masks never use it.
        - `segment_ids`: `[seq]` packed-sequence ids; tokens attend only within their own id.
          Default `None`: one segment.
        - `key`: a `jax.random` key for the spec's `dropout`; needed when it is not 0, unless
          `inference=True`. The same key drops the same probabilities whatever the spec's mesh,
          layout or strategy. Default `None`.
        - `inference`: `True` turns dropout off for this call (Equinox's convention); default
          `None`: the spec's `dropout` applies. (A model whose spec has `dropout=0`, e.g.
          `model.with_spec(spec.replace(dropout=0.0))`, never drops.)

        **Returns:**

        The attention output, `[seq, d_model]`, like `x` (and in its layout order).

        **Raises:**

        `ValueError` if the spec has dropout, `inference` is not `True` and `key` is `None`, if `x`
        is not `[seq, d_model]` or `positions` / `segment_ids` is not `[seq]`, if the spec has a mesh
        and `seq` does not split over its `seq_axis` in `layout`, if a chunk size does not divide the
        (local) sequence, if the spec's RoPE meets an odd `head_dim` or its `head_axis` does not
        divide `num_kv_heads`; `TypeError` if `spec` is not an `AttentionSpec`,
        `x` is not floating or `positions` / `segment_ids` are not integers. (With jaxtyping's
        import hook on, its `TypeCheckError` names a wrong shape or dtype first.)
        """
        with jax.named_scope("eqx_ring.RingAttention"):
            return self._prefill(x, spec, positions, segment_ids, key, inference)[0]

    def prefill(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        spec: AttentionSpec | None = None,
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
        - `spec`: the [`AttentionSpec`][eqx_ring.AttentionSpec], as for `__call__`.
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
        return self._prefill(x, spec, positions, segment_ids, None, True)

    def _prefill(self, x, spec, positions, segment_ids, key, inference: bool | None):
        """`prefill`, with the spec's dropout drawn from `key` unless `inference`."""
        spec = check_spec(spec, self.num_heads, self.num_kv_heads, self.head_dim)
        dropout_rate = 0.0 if inference else spec.dropout
        if dropout_rate and key is None:
            raise ValueError(f"AttentionSpec(dropout={spec.dropout}) needs key= to drop attention probabilities in "
                             "training; pass inference=True to turn dropout off")
        check_array("x", x, (None, self.d_model), ("seq", "d_model"))
        seq = x.shape[0]
        for name, ids in (("positions", positions), ("segment_ids", segment_ids)):
            if ids is not None:
                check_array(name, ids, (seq,), ("seq",), kind="int")
        # Manual axes are those of a caller's shard_map we are traced inside.
        inside = inside_shard_map(spec)
        ring = _ring_size(spec, seq, inside)
        if positions is None:
            if inside:
                positions = shard_positions(jax.lax.axis_index(spec.sequence_axes), seq, spec.layout, ring)
            else:
                positions = jnp.asarray(layout_positions(seq, spec.layout, ring))
        q, k, v = self._project(x, positions, spec)
        o = self._attend(q, k, v, segment_ids, spec, inside, dropout_rate, key)
        return jax.vmap(self.output_proj)(o.reshape(seq, self.num_heads * self.head_dim)), k, v

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
        spec: AttentionSpec | None = None,
    ) -> tuple[
        Float[Array, " {self.d_model}"],
        Float[Array, "cache {self.num_kv_heads} {self.head_dim}"],
        Float[Array, "cache {self.num_kv_heads} {self.head_dim}"],
    ]:
        """Attend from one new token over a KV cache, after writing its key and value into the cache.

        The cache holds a sequence in the spec's `layout` order, split over `seq_axis` when the
        spec has a mesh. Each device writes the new key and value if it owns the token's slot,
        attends over its own slots only, and the devices' partial results (max, sum and numerator
        of the softmax) are merged by one `pmax` and two `psum`s: nothing of the cache moves
        between devices.

        **Arguments:**

        - `x`: the new token's input, `[d_model]`.
        - `keys`: the cached keys, `[cache, num_kv_heads, head_dim]` in `layout` order (as
          [`prefill`][eqx_ring.RingAttention.prefill] returned them, or a previous `decode_step`).
        - `values`: the cached values, `[cache, num_kv_heads, head_dim]`, likewise.
        - `segment_ids`: `[cache]`, the cached tokens' segments; the token sees only its own `segment`.
        - `index`: scalar int, the token's index in the (natural-order) sequence; its key and value
          are written at that index's slot, and it sees indices `<= index` (and, with
          `sliding_window=w`, `> index - w`). Keyword only, like the three below.
        - `position`: scalar int, its RoPE position.
        - `segment`: scalar int, its segment id.
        - `spec`: the [`AttentionSpec`][eqx_ring.AttentionSpec] the cache was prefilled with;
          default `None`: `AttentionSpec()`.

        **Returns:**

        `(output, keys, values)`: the output `[d_model]` and the cache with the token's key and
        value written, `[cache, num_kv_heads, head_dim]` each.

        **Raises:**

        `ValueError` if the spec has a `head_axis` (decoding does not split heads), if an
        argument's shape is not the one above, if `index` is known and outside `[0, cache)`, or if
        with a mesh the cache length does not split over `seq_axis` in `layout`; `TypeError` if
        `x`, `keys`, `values` are not floating or `segment_ids`, `index`, `position`, `segment` are
        not integers. A traced `index` (under `jit`) outside `[0, cache)` raises at run time,
        through `eqx.error_if`: without the check the token would be written nowhere and dropped
        silently.
        """
        spec = check_spec(spec, self.num_heads, self.num_kv_heads, self.head_dim)
        if spec.head_axis is not None:
            raise ValueError(f"decode_step does not split heads: decode with a spec whose head_axis=None, got "
                             f"head_axis={spec.head_axis!r}")
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
        return self._decode_step(x, keys, values, segment_ids, index=index, position=position, segment=segment,
                                 spec=spec)

    def _decode_step(self, x, keys, values, segment_ids, *, index, position, segment, spec: AttentionSpec):
        """`decode_step` on checked arguments ([`RingTransformer`][eqx_ring.RingTransformer] checks the index once
        per token, not once per layer)."""
        q, k, v = self._project(x[None], position[None], spec)
        local = partial(self._decode_local, layout=spec.layout, sliding_window=spec.sliding_window,
                        attention_chunk_size=spec.attention_chunk_size, logit_softcap=spec.logit_softcap)
        if spec.mesh is None:
            o, keys, values = local(q, k, v, keys, values, segment_ids, index, segment, self.sinks, seq_axis=None)
        else:
            check_layout(spec.layout, keys.shape[0], spec.ring_size, what="cache length")
            cache, one = P(spec.sequence_axes), P()
            o, keys, values = jax.shard_map(
                partial(local, seq_axis=spec.sequence_axes), mesh=spec.mesh,
                in_specs=(one, one, one, cache, cache, cache, one, one, one), out_specs=(one, cache, cache),
            )(q, k, v, keys, values, segment_ids, index, segment, self.sinks)
        return self.output_proj(o.reshape(self.num_heads * self.head_dim)), keys, values

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

    def _decode_local(self, q, k, v, keys, values, segment_ids, index, segment, sinks, *, layout: str,
                      sliding_window: int | None, attention_chunk_size: int | None,
                      logit_softcap: float | None, seq_axis: str | tuple[str, str] | None):
        """One query against this device's cache slots; merged over the ring `seq_axis` (`None`: no ring)."""
        n = 1 if seq_axis is None else jax.lax.axis_size(seq_axis)
        shard = 0 if seq_axis is None else jax.lax.axis_index(seq_axis)
        true = shard_positions(shard, keys.shape[0], layout, n)
        write = true == index
        keys = jnp.where(write[:, None, None], k.astype(keys.dtype), keys)
        values = jnp.where(write[:, None, None], v.astype(values.dtype), values)
        visible = (true <= index) & (jnp.where(write, segment, segment_ids) == segment)
        if sliding_window is not None:
            visible &= index - true < sliding_window
        if attention_chunk_size is not None:
            visible &= index // attention_chunk_size == true // attention_chunk_size
        group = self.num_heads // self.num_kv_heads
        qg = q[0].reshape(self.num_kv_heads, group, self.head_dim).astype(jnp.float32) * self.head_dim**-0.5
        scores = jnp.einsum("kgd,tkd->kgt", qg, keys.astype(jnp.float32))
        if logit_softcap is not None:
            scores = logit_softcap * jnp.tanh(scores / logit_softcap)
        scores = jnp.where(visible, scores, -jnp.inf)
        m = scores.max(-1)
        seen = jnp.isfinite(m)  # false where none of this device's slots is visible
        p = jnp.exp(scores - jnp.where(seen, m, 0.0)[..., None])
        l, o = p.sum(-1), jnp.einsum("kgt,tkd->kgd", p, values.astype(jnp.float32))
        if seq_axis is not None:
            m_all = jax.lax.pmax(m, seq_axis)
            weight = jnp.where(seen, jnp.exp(m - m_all), 0.0)
            l = jax.lax.psum(l * weight, seq_axis)
            o = jax.lax.psum(o * weight[..., None], seq_axis)
            m = m_all
        if sinks is not None:
            l = l + jnp.exp(sinks.astype(jnp.float32).reshape(self.num_kv_heads, group) - m)
        # The token always sees itself, so l > 0 after the merge.
        return (o / l[..., None]).reshape(1, self.num_heads, self.head_dim).astype(q.dtype), keys, values

    def _project(self, x, positions, spec: AttentionSpec):
        """Queries, keys and values of `x`, rotated by the spec's RoPE at `positions`."""
        seq = x.shape[0]

        def heads(layer, n):
            return jax.vmap(layer)(x).reshape(seq, n, self.head_dim)

        q = heads(self.query_proj, self.num_heads)
        k = heads(self.key_proj, self.num_kv_heads)
        v = heads(self.value_proj, self.num_kv_heads)
        if spec.rope_theta is not None:
            q = apply_rope(q, positions, spec.rope_theta, spec.rope_scaling)
            k = apply_rope(k, positions, spec.rope_theta, spec.rope_scaling)
        return q, k, v

    def _attend(self, q, k, v, segment_ids, spec: AttentionSpec, inside: bool, dropout_rate: float, key):
        tuning = spec.tuning
        kernel_kw = dict(
            causal=spec.causal,
            causal_block_size=spec.causal_block_size,
            sliding_window=spec.sliding_window,
            attention_chunk_size=spec.attention_chunk_size,
            logit_softcap=spec.logit_softcap,
            dropout_rate=dropout_rate,
            query_chunk_size=tuning.query_chunk_size,
            key_chunk_size=tuning.key_chunk_size,
            implementation=tuning.implementation,
        )
        if spec.mesh is None and not inside:
            return blockwise_attention(q, k, v, segment_ids=segment_ids, sinks=self.sinks, dropout_key=key, **kernel_kw)
        ring = partial(ring_attention, axis_name=spec.sequence_axes, layout=spec.layout, kv_pieces=tuning.kv_pieces,
                       strategy=spec.strategy, **kernel_kw)

        def local(q, k, v, ids, sinks, key):
            if key is not None and spec.head_axis is not None and jax.lax.axis_size(spec.head_axis) > 1:
                # Each device holds a slice of the heads, which the seeds would number from 0 again: give each
                # slice its own key (the dropped set then depends on the head split, and on nothing else).
                key = jax.random.fold_in(key, jax.lax.axis_index(spec.head_axis))
            return ring(q, k, v, segment_ids=ids, sinks=sinks, dropout_key=key)

        if inside:
            return local(q, k, v, segment_ids, self.sinks, key)
        qkv_spec = P(spec.sequence_axes, spec.head_axis, None)
        # Pallas's interpreter (the fused kernel off GPU, for tests) trips jax 0.10's varying-axes check.
        check_vma = not fused_is_interpreted(tuning.implementation)
        # Absent segment ids, sinks or key (None) are empty subtrees: their specs apply to nothing.
        return jax.shard_map(local, mesh=spec.mesh, out_specs=qkv_spec, check_vma=check_vma,
                             in_specs=(qkv_spec,) * 3 + (P(spec.sequence_axes), P(spec.head_axis), P()),
                             )(q, k, v, segment_ids, self.sinks, key)


def _ring_size(spec: AttentionSpec, seq: int, inside: bool) -> int:
    """Devices on the sequence ring for a `seq`-long input (1 without one); checks that `seq` splits over them."""
    if inside:
        return jax.lax.axis_size(spec.sequence_axes)
    if spec.mesh is not None:
        check_layout(spec.layout, seq, spec.ring_size, what=f"x seq (split over {spec.sequence_axes!r})")
    return spec.ring_size
