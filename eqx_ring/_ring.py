"""Public entry points of the fast kernels: one device (`blockwise_attention`) and the ring."""

from collections.abc import Hashable

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from ._checks import check_chunk, check_mask_args, check_qkv
from ._kernel import Config, attention
from ._layout import check_layout


def _run(q, k, v, *, axis_name, num_shards, layout, causal, causal_block_size, segment_ids, kv_segment_ids,
         key_bias, sliding_window, scale, query_chunk_size, key_chunk_size):
    dims = check_qkv(q, k, v)
    spec, q_seg, k_seg, bias = check_mask_args(
        dims,
        causal=causal,
        causal_block_size=causal_block_size,
        sliding_window=sliding_window,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        key_bias=key_bias,
    )
    where = "" if num_shards == 1 else f" (the local shard of {num_shards} devices on axis {axis_name!r})"
    # A zigzag shard holds two far-apart halves; a chunk inside one half keeps causal skipping exact.
    halves = 2 if layout == "zigzag" and num_shards > 1 else 1
    where = where if halves == 1 else f"{where}/2 (one zigzag half)"
    cfg = Config(
        spec=spec,
        scale=float(dims.head_dim**-0.5 if scale is None else scale),
        q_chunk=check_chunk("query_chunk_size", query_chunk_size, dims.q_len // halves, f"q_seq{where}"),
        k_chunk=check_chunk("key_chunk_size", key_chunk_size, dims.kv_len // halves, f"kv_seq{where}"),
        axis_name=axis_name,
        layout=layout,
    )
    b = -1 if dims.batch else 1
    groups = dims.q_heads // dims.kv_heads
    qi = q.reshape(b, dims.q_len, dims.kv_heads, groups, dims.head_dim)
    ki = k.reshape(b, dims.kv_len, dims.kv_heads, dims.head_dim)
    vi = v.reshape(b, dims.kv_len, dims.kv_heads, dims.head_dim)

    def flat(x, n):
        return None if x is None else x.reshape(b, n)

    bias = None if bias is None else bias.astype(jnp.float32)
    o = attention(cfg, qi, ki, vi, flat(bias, dims.kv_len), flat(q_seg, dims.q_len), flat(k_seg, dims.kv_len))
    return o.reshape(q.shape)


def blockwise_attention(
    q: Float[Array, "*batch q_seq q_heads head_dim"],
    k: Float[Array, "*batch kv_seq kv_heads head_dim"],
    v: Float[Array, "*batch kv_seq kv_heads head_dim"],
    /,
    *,
    causal: bool = False,
    causal_block_size: int = 1,
    segment_ids: Int[Array, "*batch q_seq"] | None = None,
    kv_segment_ids: Int[Array, "*batch kv_seq"] | None = None,
    key_bias: Float[Array, "*#batch kv_seq"] | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    query_chunk_size: int = 512,
    key_chunk_size: int = 512,
) -> Float[Array, "*batch q_seq q_heads head_dim"]:
    """Exact attention on one device in O(chunk²) extra memory (Blockwise Parallel Transformer).

    Equal to [`dot_product_attention`][eqx_ring.dot_product_attention] with the same arguments, in
    value and gradient, without ever holding the `[q_seq, kv_seq]` scores: queries and keys are
    processed in chunks with an online softmax whose statistics are float32. The backward pass
    (a `jax.custom_vjp`) keeps only the output and one log-sum-exp per query, and recomputes the
    scores chunk by chunk. Chunk pairs that a mask hides entirely are not computed, and pairs
    that it shows entirely are computed without building a mask.

    **Arguments:** as [`dot_product_attention`][eqx_ring.dot_product_attention], plus

    - `query_chunk_size`, `key_chunk_size`: tokens per chunk; each must divide its sequence length
      (a chunk longer than the sequence is shortened to it). Larger chunks run faster and use
      O(query_chunk_size · key_chunk_size · heads) more temporary memory.
    """
    return _run(q, k, v, axis_name=None, num_shards=1, layout="contiguous", causal=causal,
                causal_block_size=causal_block_size, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                key_bias=key_bias, sliding_window=sliding_window, scale=scale,
                query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size)


def ring_attention(
    q: Float[Array, "*batch q_seq q_heads head_dim"],
    k: Float[Array, "*batch kv_seq kv_heads head_dim"],
    v: Float[Array, "*batch kv_seq kv_heads head_dim"],
    /,
    *,
    axis_name: Hashable,
    layout: str = "contiguous",
    causal: bool = False,
    causal_block_size: int = 1,
    segment_ids: Int[Array, "*batch q_seq"] | None = None,
    kv_segment_ids: Int[Array, "*batch kv_seq"] | None = None,
    key_bias: Float[Array, "*#batch kv_seq"] | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    query_chunk_size: int = 512,
    key_chunk_size: int = 512,
) -> Float[Array, "*batch q_seq q_heads head_dim"]:
    """Exact attention over a sequence split across the devices of mesh axis `axis_name`.

    Call it inside `jax.shard_map` on the LOCAL shards: every argument with a sequence axis
    (`q`, `k`, `v`, `segment_ids`, `kv_segment_ids`, `key_bias`) is split along that axis over
    `axis_name` in the order given by `layout` (see [`to_layout`][eqx_ring.to_layout]). Key/value
    blocks, with their segment ids and bias, travel once around the ring (n − 1 transfers, each
    issued before the block in hand is computed) while every device folds them into its queries'
    online softmax with [`blockwise_attention`][eqx_ring.blockwise_attention]'s kernel. The
    backward pass is a second ring in which dk/dv/dbias accumulate in float32 and travel with
    their block. Masks are computed from true token positions, so the result equals
    [`dot_product_attention`][eqx_ring.dot_product_attention] on the unsharded, naturally ordered
    sequence, in value and gradient. With GQA, k/v travel with their own (fewer) heads.

    **Arguments:** as [`blockwise_attention`][eqx_ring.blockwise_attention] (with local shapes), plus

    - `axis_name`: the `shard_map` mesh axis the sequence is split over.
    - `layout`: `"contiguous"`, `"zigzag"` or `"striped"`; the last two balance causal work
      across devices. It must be the layout the inputs were put in.

    **Raises:** `ValueError` if `axis_name` is not bound (not inside `shard_map` over it), if the
    layout is unknown, or if a chunk size does not divide the local sequence.
    """
    try:
        n = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"axis_name={axis_name!r} is not a bound mesh axis: call ring_attention inside "
            "jax.shard_map over a mesh that has this axis"
        ) from None
    check_layout(layout, q.shape[-3] * n, n, what=f"q_seq (local {q.shape[-3]} × {n} devices)")
    check_layout(layout, k.shape[-3] * n, n, what=f"kv_seq (local {k.shape[-3]} × {n} devices)")
    return _run(q, k, v, axis_name=axis_name, num_shards=n, layout=layout, causal=causal,
                causal_block_size=causal_block_size, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                key_bias=key_bias, sliding_window=sliding_window, scale=scale,
                query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size)
