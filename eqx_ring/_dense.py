"""Dense attention: the reference every fast path is tested against."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_mask_args, check_qkv, check_scale, check_sinks, dropout_seeds
from ._masks import dropout_keep, dropout_rows, visible


def dot_product_attention(
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
    attention_chunk_size: int | None = None,
    sinks: Float[Array, " q_heads"] | None = None,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
) -> Float[Array, "*batch q_seq q_heads head_dim"]:
    """Dense multi-head attention with every mask of the library; materializes the scores.

    The reference that [`blockwise_attention`][eqx_ring.blockwise_attention] and
    [`ring_attention`][eqx_ring.ring_attention] equal. Computes in float32 whatever the input
    dtype and returns q's dtype. Memory is O(q_seq · kv_seq) per head: use it for checking and
    for short sequences only. Positions are token indices starting at 0 on both sides; a query
    that sees no key returns 0.

    **Arguments:**

    - `q`: queries, `[*batch, q_seq, q_heads, head_dim]`.
    - `k`: keys, `[*batch, kv_seq, kv_heads, head_dim]`; `q_heads` must be a multiple of
      `kv_heads` (grouped-query attention: q head `h` reads kv head `h // (q_heads // kv_heads)`).
    - `v`: values, `[*batch, kv_seq, kv_heads, head_dim]`, the same shape and dtype as `k`.
    - `causal`: query `i` sees key `j` only if `j // causal_block_size <= i // causal_block_size`.
      Default `False`: no causal mask.
    - `causal_block_size`: 1 (default) for ordinary causal attention; tokens per frame for
      frame-causal attention. Must be 1 unless `causal=True`.
    - `segment_ids`: `[*batch, q_seq]` ints; a query sees only keys of its own segment (packing).
      Default `None`: no segment mask.
    - `kv_segment_ids`: `[*batch, kv_seq]` ints, the keys' segment ids when they differ from
      `segment_ids` (which must then be given too). Default `None`: the keys use `segment_ids`.
    - `key_bias`: `[*#batch, kv_seq]` floats added to the scores of each key, broadcast over
      queries and heads (e.g. `-inf` for padding). Default `None`: no bias.
    - `sliding_window`: `w`; query `i` sees key `j` only if `i - w < j <= i`. Default `None`:
      no window.
    - `scale`: multiplies `q·k`; default `None` means `head_dim ** -0.5`.
    - `attention_chunk_size`: `c`; query `i` sees key `j` only if `i // c == j // c` (Llama 4's
      chunked attention; combine with `causal=True` for its causal chunks). Default `None`: no chunks.
    - `sinks`: `[q_heads]` logits, one per query head, that join every softmax denominator of their
      head with no value (gpt-oss's attention sinks). Default `None`: no sinks.
    - `logit_softcap`: `c`; every score `s` (after `scale`) becomes `c · tanh(s / c)` before the
      bias and the masks (Gemma 2). Default `None`: no cap.
    - `dropout_rate`: the chance that dropout drops each attention probability (after the softmax;
      the kept ones are scaled by `1 / (1 - dropout_rate)`). Which ones it drops is a hash of
      `dropout_key`, the batch index, the query head and the true query and key positions, the same
      in every function of the library. Default 0: no dropout.
    - `dropout_key`: a `jax.random` key; needed when `dropout_rate` is not 0.

    **Returns:**

    The attention output, `[*batch, q_seq, q_heads, head_dim]`, in `q`'s dtype.

    **Raises:**

    `ValueError` if `dropout_rate` is not in [0, 1) or has no `dropout_key`, if the shapes of `q`, `k`, `v`,
    the segment ids or `key_bias` do not fit together
    (`q`, `k`, `v` need at least 3 axes, a sequence of at least one token and at least one kv head),
    if `causal_block_size` or `sliding_window` is not a positive int, if `causal_block_size != 1`
    without `causal=True`, or if `scale` is not finite; `TypeError` if `q`, `k`, `v` do not share
    one floating dtype, if the segment ids are not integers, or if `causal` is not a bool.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_ring

    q, k, v = jax.random.normal(jax.random.key(0), (3, 16, 4, 8))  # each [seq, heads, head_dim]
    k, v = k[:, :2], v[:, :2]  # 2 kv heads, each read by 2 query heads (GQA)
    out = eqx_ring.dot_product_attention(q, k, v, causal=True)
    assert out.shape == (16, 4, 8)
    # The first query sees only the first key, so its output is that key's value.
    assert jnp.allclose(out[0], jnp.repeat(v[0], 2, axis=0), atol=1e-6)
    ```
    """
    dims = check_qkv(q, k, v)
    spec, q_seg, k_seg, bias = check_mask_args(
        dims,
        causal=causal,
        causal_block_size=causal_block_size,
        sliding_window=sliding_window,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        key_bias=key_bias,
        attention_chunk_size=attention_chunk_size,
        logit_softcap=logit_softcap,
        dropout_rate=dropout_rate,
    )
    seeds = dropout_seeds(spec.dropout_rate, dropout_key, dims)
    scale = dims.head_dim**-0.5 if scale is None else check_scale(scale, static=False)
    sinks = check_sinks(sinks, dims)
    groups = dims.q_heads // dims.kv_heads
    f32 = jnp.float32
    qg = q.astype(f32).reshape(*dims.batch, dims.q_len, dims.kv_heads, groups, dims.head_dim)
    s = jnp.einsum("...qhgd,...khd->...hgqk", qg, k.astype(f32)) * scale
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    if bias is not None:
        s = s + bias.astype(f32)[..., None, None, None, :]
    mask = visible(
        spec, jnp.arange(dims.q_len), jnp.arange(dims.kv_len), q_seg, k_seg
    )
    if mask is not None:
        s = jnp.where(mask[..., None, None, :, :], s, -jnp.inf)
    if sinks is not None:  # one more column per row: the sink's logit, dropped after the softmax
        sink = sinks.astype(f32).reshape(dims.kv_heads, groups)[:, :, None, None]
        s = jnp.concatenate([s, jnp.broadcast_to(sink, (*s.shape[:-1], 1))], axis=-1)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    p = p if sinks is None else p[..., :-1]
    if seeds is not None:
        rows = dropout_rows(seeds.reshape(*dims.batch, dims.kv_heads, groups), jnp.arange(dims.q_len))
        p = jnp.where(dropout_keep(spec.dropout_rate, rows, jnp.arange(dims.kv_len)), p / (1 - spec.dropout_rate), 0.0)
    o = jnp.einsum("...hgqk,...khd->...qhgd", p, v.astype(f32))
    return o.reshape(q.shape).astype(q.dtype)
