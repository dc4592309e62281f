"""Public entry points of the fast kernels: one device (`blockwise_attention`) and the ring."""

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import check_mask_args, check_positive_int, check_qkv, check_scale, check_sinks, dropout_seeds
from ._kernel import Kernel, Settings, attention
from ._kernel_pallas import PallasKernel, interpreted
from ._kernel_xla import XlaKernel
from ._layout import check_layout

IMPLEMENTATIONS = ("xla", "pallas")


def fused_is_interpreted(implementation: str | None) -> bool:
    """Whether `implementation` means the fused kernels in Pallas's interpreter (asked for off GPU)."""
    return implementation == "pallas" and interpreted()


def _choose_kernel(implementation: str | None, query_chunk_size, key_chunk_size, q_len: int, kv_len: int,
                   head_dim: int, where: str) -> Kernel:
    """The path that computes each ring step, with its tiles for the lengths one step sees.

    `None` picks the fused kernels on GPU when the shapes suit Triton, and the XLA path otherwise;
    off GPU, an explicit "pallas" runs the same kernels in Pallas's interpreter (slow; for tests).
    The fused path picks its own tiles, so the chunk sizes are checked only for the XLA path.
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation == "pallas" or (implementation is None and jax.default_backend() == "gpu"):
        fused = PallasKernel.for_shapes(q_len, kv_len, head_dim, where=where, required=implementation == "pallas")
        if fused is not None:
            return fused
    return XlaKernel.for_shapes(query_chunk_size, key_chunk_size, q_len, kv_len, where)


STRATEGIES = ("ring", "allgather", "ulysses", "hybrid")


def _run(q, k, v, *, strategy, axes, layout, causal, causal_block_size, segment_ids, kv_segment_ids,
         key_bias, sliding_window, scale, query_chunk_size, key_chunk_size, implementation, kv_pieces=None,
         attention_chunk_size=None, sinks=None, logit_softcap=None, dropout_rate=0.0, dropout_key=None):
    """Attention of local shards; `axes` maps "ring" (or "allgather") and "ulysses" to (mesh axis, size) or None."""
    dims = check_qkv(q, k, v)
    ring_axis, ring_n = axes.get("ring") or (None, 1)
    a2a_axis, a2a_n = axes.get("ulysses") or (None, 1)
    num_shards = ring_n * a2a_n
    if axes:
        check_layout(layout, dims.q_len * num_shards, num_shards,
                     what=f"q_seq (local {dims.q_len} × {num_shards} devices)")
        check_layout(layout, dims.kv_len * num_shards, num_shards,
                     what=f"kv_seq (local {dims.kv_len} × {num_shards} devices)")
    masks, q_seg, k_seg, bias = check_mask_args(
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
    seeds = dropout_seeds(masks.dropout_rate, dropout_key, dims)
    names = [name for name, _ in axes.values()]
    named = f"axis {names[0]!r}" if len(names) == 1 else "axes " + " × ".join(map(repr, names))
    where = "" if num_shards == 1 else f" (the local shard of {num_shards} devices on {named})"
    # A zigzag shard holds two far-apart halves; a chunk inside one half keeps causal skipping exact.
    halves = 2 if layout == "zigzag" and num_shards > 1 else 1
    where = where if halves == 1 else f"{where}/2 (one zigzag half)"
    scale = float(dims.head_dim**-0.5) if scale is None else check_scale(scale, static=True)
    sinks = check_sinks(sinks, dims)
    kv_pieces = _check_pieces(strategy, kv_pieces, dims, halves)
    if dims.q_heads % a2a_n:
        raise ValueError(f"strategy={strategy!r} splits the {dims.q_heads} query heads over the {a2a_n} devices of "
                         f"axis {a2a_axis!r} (all-to-all): {a2a_n} must divide {dims.q_heads}")
    # Pieces of the kv sequence (a ring's) or of its heads (allgather's): a kernel's key block is a piece of a run.
    kv_run = dims.kv_len // (halves if strategy == "allgather" else max(halves, kv_pieces))
    kernel = _choose_kernel(implementation, query_chunk_size, key_chunk_size, dims.q_len // halves, kv_run,
                            dims.head_dim, where)
    settings = Settings(kernel=kernel, masks=masks, scale=scale, axis_name=ring_axis, layout=layout,
                        kv_pieces=kv_pieces, strategy="allgather" if strategy == "allgather" else "ring",
                        gathered=a2a_n)
    batch = -1 if dims.batch else 1
    groups = dims.q_heads // dims.kv_heads
    q_grouped = q.reshape(batch, dims.q_len, dims.kv_heads, groups, dims.head_dim)
    k_flat = k.reshape(batch, dims.kv_len, dims.kv_heads, dims.head_dim)
    v_flat = v.reshape(batch, dims.kv_len, dims.kv_heads, dims.head_dim)
    q_seg, k_seg = (None if x is None else x.reshape(batch, n) for x, n in ((q_seg, dims.q_len), (k_seg, dims.kv_len)))
    bias = None if bias is None else bias.astype(jnp.float32).reshape(batch, dims.kv_len)
    sinks = None if sinks is None else sinks.reshape(dims.kv_heads, groups)
    seeds = None if seeds is None else seeds.reshape(batch, dims.kv_heads, groups)
    if a2a_axis is None:
        o = with_sinks(*attention(settings, q_grouped, k_flat, v_flat, bias, q_seg, k_seg, seeds), sinks)
        return o.reshape(q.shape)
    o = _ulysses(settings, a2a_axis, a2a_n, q_grouped, k_flat, v_flat, bias, q_seg, k_seg, sinks, seeds)
    return o.reshape(q.shape)


def with_sinks(o, lse, sinks):
    """`o` ([B, L, K, G, D]) as if each row's softmax denominator also held `exp(sinks)` ([K, G]; `None`: none).

    A sink is a logit with no value: it rescales the row by `exp(lse - logaddexp(lse, sink))`. Applied to the
    finished output, outside every path's kernels, so all of them (and every strategy) get sinks from one line;
    its gradient, and the one it sends back into the scores through `lse`, come from autodiff.
    """
    if sinks is None:
        return o
    weight = jnp.exp(lse - jnp.logaddexp(lse, sinks.astype(jnp.float32)[None, :, :, None]))  # [B, K, G, L]
    return (o.astype(jnp.float32) * jnp.moveaxis(weight, 3, 1)[..., None]).astype(o.dtype)


def _check_pieces(strategy: str, kv_pieces: int | None, dims, halves: int) -> int:
    """`kv_pieces`, checked against what it slices: the local kv sequence on a ring, the kv heads under allgather."""
    if strategy == "allgather":
        kv_pieces = dims.kv_heads if kv_pieces is None else kv_pieces
        check_positive_int("kv_pieces", kv_pieces)
        if dims.kv_heads % kv_pieces:
            raise ValueError(f"kv_pieces={kv_pieces} must divide the {dims.kv_heads} kv heads: with strategy="
                             "'allgather' the keys and values are gathered that many slices of heads at a time")
        return kv_pieces
    kv_pieces = 1 if kv_pieces is None else kv_pieces
    check_positive_int("kv_pieces", kv_pieces)
    if strategy == "ulysses" and kv_pieces != 1:
        raise ValueError(f"kv_pieces={kv_pieces} splits what travels around a ring, and strategy='ulysses' has none; "
                         "leave it None (or use strategy='hybrid')")
    if dims.kv_len % kv_pieces or (kv_pieces > 1 and kv_pieces % halves):
        raise ValueError(f"kv_pieces={kv_pieces} must divide the local kv_seq = {dims.kv_len}"
                         + (" and be even with layout='zigzag' (a piece must lie in one half of the shard)"
                            if halves == 2 else ""))
    return kv_pieces


def _ulysses(settings: Settings, axis: Hashable, n: int, q, k, v, bias, q_seg, k_seg, sinks, seeds):
    """DeepSpeed-Ulysses: all-to-all from sequence- to head-sharded, attention over the `n` shards, and back.

    Each device ends up with every token of `1/n` of the heads, in the layout order of the shards it
    gathered (so `settings.gathered = n` gives their true positions), and runs `settings`' kernel on them:
    alone, or as one member of a ring over `settings.axis_name` (the hybrid). With GQA each kv head is
    repeated `n / gcd(kv_heads, n)` times, the least that gives every device whole kv heads for its query
    heads (none when `n` divides the kv heads).
    """
    kv_heads, groups = q.shape[2], q.shape[3]
    repeat = n // math.gcd(kv_heads, n)
    q = q.reshape(*q.shape[:2], kv_heads * repeat, groups // repeat, q.shape[4])
    k, v = (jnp.repeat(x, repeat, axis=2) for x in (k, v))

    def to_heads(x):  # [B, L, H, ...] -> [B, n·L, H/n, ...]
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    def gather(x):
        return None if x is None else lax.all_gather(x, axis, axis=1, tiled=True)

    rows = kv_heads * repeat // n

    def mine(x, axis_of_heads):  # this device's heads of a per-head array, in the order the all-to-all gives them
        x = x.reshape(*x.shape[:axis_of_heads], kv_heads * repeat, groups // repeat)
        return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * rows, rows, axis_of_heads)

    o, lse = attention(settings, to_heads(q), to_heads(k), to_heads(v), gather(bias), gather(q_seg), gather(k_seg),
                       None if seeds is None else mine(seeds, 1))
    if sinks is not None:
        o = with_sinks(o, lse, mine(sinks, 0))
    o = lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)
    return o.reshape(*o.shape[:2], kv_heads, groups, o.shape[4])


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
    implementation: str | None = None,
    attention_chunk_size: int | None = None,
    sinks: Float[Array, " q_heads"] | None = None,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
) -> Float[Array, "*batch q_seq q_heads head_dim"]:
    """Exact attention on one device in O(chunk²) extra memory (Blockwise Parallel Transformer).

    Equal to [`dot_product_attention`][eqx_ring.dot_product_attention] with the same arguments, in
    value and gradient, without ever holding the `[q_seq, kv_seq]` scores: queries and keys are
    processed in chunks with an online softmax whose statistics are float32. The backward pass
    (a `jax.custom_vjp`) keeps only the output and one log-sum-exp per query, and recomputes the
    scores chunk by chunk. Chunk pairs that a mask hides entirely are not computed, and pairs
    that it shows entirely are computed without building a mask.

    **Arguments:**

    - `q`: queries, `[*batch, q_seq, q_heads, head_dim]`.
    - `k`: keys, `[*batch, kv_seq, kv_heads, head_dim]`; `q_heads` must be a multiple of
      `kv_heads` (grouped-query attention).
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
    - `query_chunk_size`: queries per chunk (default 512); must divide `q_seq` (a chunk longer than
      the sequence is shortened to it).
    - `key_chunk_size`: keys per chunk (default 512); must divide `kv_seq`, likewise. Larger chunks
      run faster and use O(query_chunk_size · key_chunk_size · heads) more temporary memory.
    - `implementation`: `"xla"` (the blockwise loop above, any backend), `"pallas"` (one fused
      Pallas kernel per ring step, forward and backward, lowered to Triton on GPU; its tiles are
      128 × 64 forward and 64 × 64 backward, or the largest power of two dividing a shorter
      sequence, and the chunk sizes above do not apply; off GPU it runs in Pallas's interpreter,
      which is slow and meant for tests), or `None` (default): `"pallas"` on a GPU when `head_dim`
      is a power of two >= 16 and the local sequence splits into tiles of 16 or more, `"xla"`
      otherwise. Both give the same result.
    - `attention_chunk_size`: `c`; query `i` sees key `j` only if `i // c == j // c` (Llama 4's
      chunked attention; with `causal=True`, causal within each chunk). Chunk pairs it hides are not
      computed. Default `None`: no chunks.
    - `sinks`: `[q_heads]` learnable logits (gpt-oss's attention sinks): each joins the softmax
      denominator of its head's every query, with no value, so a query may attend to "nothing".
      Default `None`: no sinks.
    - `logit_softcap`: `c`; every score `s` (after `scale`) becomes `c · tanh(s / c)` before the
      bias and the masks (Gemma 2), in both kernels and their backward passes. Default `None`: no cap.
    - `dropout_rate`: the chance that dropout drops each attention probability, as in
      [`dot_product_attention`][eqx_ring.dot_product_attention], which drops the same ones for the
      same key. No mask is stored: each chunk pair hashes its own. Default 0: no dropout.
    - `dropout_key`: a `jax.random` key; needed when `dropout_rate` is not 0.

    **Returns:**

    The attention output, `[*batch, q_seq, q_heads, head_dim]`, in `q`'s dtype.

    **Raises:**

    `ValueError` if a chunk size is not a positive int or does not divide its sequence length, if
    `implementation` is not one of `"xla"`, `"pallas"`, `None`, or for an `implementation="pallas"`
    the shapes do not suit; `TypeError` if `scale` is not a Python float (it is static here); and the
    errors of [`dot_product_attention`][eqx_ring.dot_product_attention] for bad shapes, dtypes or masks.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_ring

    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 8))  # each [batch, seq, heads, head_dim]
    out = eqx_ring.blockwise_attention(q, k, v, causal=True, query_chunk_size=16, key_chunk_size=16)
    assert jnp.allclose(out, eqx_ring.dot_product_attention(q, k, v, causal=True), atol=1e-5)
    ```
    """
    return _run(q, k, v, strategy="ring", axes={}, layout="contiguous", causal=causal,
                causal_block_size=causal_block_size, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                key_bias=key_bias, sliding_window=sliding_window, scale=scale,
                query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, implementation=implementation,
                attention_chunk_size=attention_chunk_size, sinks=sinks, logit_softcap=logit_softcap,
                dropout_rate=dropout_rate, dropout_key=dropout_key)


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
    implementation: str | None = None,
    kv_pieces: int | None = None,
    strategy: str = "ring",
    attention_chunk_size: int | None = None,
    sinks: Float[Array, " q_heads"] | None = None,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
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

    The ring is one of four ways to reach the other devices' keys, chosen by `strategy`; all of
    them take the same local shards in any layout, compute masks from true positions and give the
    same result (see [Benchmarks](../benchmarks.md#four-ways-to-split-attention) for when to use
    which):

    - `"ring"` (default): the above.
    - `"allgather"`: every device gathers all keys and values (with their segment ids and bias),
      `kv_pieces` slices of kv heads one after another, the next slice's gather issued before the
      current one is attended to, and attends to them in one step; their gradients are reduced
      back to their owners with a reduce-scatter. What MaxText and PyTorch do by default.
    - `"ulysses"`: DeepSpeed-Ulysses. Two all-to-alls turn the sequence-sharded q, k, v into
      head-sharded ones over the whole sequence, each device attends with the blockwise kernel
      over its `q_heads / n` heads, and one all-to-all brings the output back. The axis size must
      divide `q_heads`; with GQA each kv head is repeated `n / gcd(kv_heads, n)` times, the least
      that gives every device the kv heads its query heads read.
    - `"hybrid"`: Ulysses over the second axis of `axis_name = (ring_axis, all_to_all_axis)` and a
      ring over the first: each all-to-all group holds consecutive shards and the ring runs between
      the groups (USP / LoongTrain's 2-D attention). The sequence is split over both axes, the
      ring's major (`P(..., (ring_axis, all_to_all_axis))`).

    **Arguments:**

    Shapes are those of the local shard: `q_seq` and `kv_seq` are the global lengths divided by
    the size of `axis_name`. In the masks, `i` and `j` are true (global, natural-order) positions.

    - `q`: local queries, `[*batch, q_seq, q_heads, head_dim]`.
    - `k`: local keys, `[*batch, kv_seq, kv_heads, head_dim]`; `q_heads` must be a multiple of
      `kv_heads` (grouped-query attention).
    - `v`: local values, `[*batch, kv_seq, kv_heads, head_dim]`, the same shape and dtype as `k`.
    - `axis_name`: the `shard_map` mesh axis the sequence is split over; for
      `strategy="hybrid"`, a pair `(ring_axis, all_to_all_axis)` of them.
    - `layout`: `"contiguous"` (default), `"zigzag"` or `"striped"`; the last two balance causal
      work across devices. It must be the layout the inputs were put in.
    - `causal`: query `i` sees key `j` only if `j // causal_block_size <= i // causal_block_size`.
      Default `False`: no causal mask.
    - `causal_block_size`: 1 (default) for ordinary causal attention; tokens per frame for
      frame-causal attention. Must be 1 unless `causal=True`.
    - `segment_ids`: local `[*batch, q_seq]` ints; a query sees only keys of its own segment (packing).
      Default `None`: no segment mask.
    - `kv_segment_ids`: local `[*batch, kv_seq]` ints, the keys' segment ids when they differ from
      `segment_ids` (which must then be given too). Default `None`: the keys use `segment_ids`.
    - `key_bias`: local `[*#batch, kv_seq]` floats added to the scores of each key, broadcast over
      queries and heads (e.g. `-inf` for padding). Default `None`: no bias.
    - `sliding_window`: `w`; query `i` sees key `j` only if `i - w < j <= i`. Default `None`:
      no window. With `layout="contiguous"` the ring is window-aware: each device runs only the
      `ceil((w - 1) / kv_seq)` steps whose blocks its queries can see, instead of n - 1, so the
      transfers and steps fall with the window (`benchmarks/window_ring.py`).
    - `scale`: multiplies `q·k`; default `None` means `head_dim ** -0.5`.
    - `query_chunk_size`: queries per chunk (default 512); must divide the local `q_seq`, or half
      of it with `layout="zigzag"` on more than one device (a longer chunk is shortened to it).
    - `key_chunk_size`: keys per chunk (default 512); must divide the local `kv_seq` likewise.
    - `implementation`: `"xla"` (the blockwise loop above, any backend), `"pallas"` (one fused
      Pallas kernel per ring step, forward and backward, lowered to Triton on GPU; its tiles are
      128 × 64 forward and 64 × 64 backward, or the largest power of two dividing a shorter
      sequence, and the chunk sizes above do not apply; off GPU it runs in Pallas's interpreter,
      which is slow and meant for tests), or `None` (default): `"pallas"` on a GPU when `head_dim`
      is a power of two >= 16 and the local sequence splits into tiles of 16 or more, `"xla"`
      otherwise. Both give the same result.
    - `kv_pieces`: each device's key/value block goes round the ring in this many pieces, one
      ring after another (default 1: whole blocks). What travels, the block in hand and the one
      arriving (and in the backward pass their float32 dk/dv), is then `1/kv_pieces` of a block:
      the memory they take falls by that factor, the bytes sent stay the same, in `kv_pieces`
      times as many smaller steps. It must divide the local `kv_seq` (be even with
      `layout="zigzag"`, so that a piece lies in one half of the shard), and the key chunk must
      divide a piece. See [Benchmarks](../benchmarks.md#the-memory-floor). With
      `strategy="allgather"` the keys and values are gathered in this many slices of kv heads
      instead, so it must divide `kv_heads`; `"ulysses"` has no ring and takes none. Default
      `None`: 1 on a ring, one kv head at a time for the all-gather.
    - `strategy`: `"ring"` (default), `"allgather"`, `"ulysses"` or `"hybrid"`, as above.
    - `attention_chunk_size`: `c`; query `i` sees key `j` only if `i // c == j // c` (Llama 4's
      chunked attention; with `causal=True`, causal within each chunk). Default `None`: no chunks.
      Like a window, causal chunks on the contiguous layout limit the ring to the
      `ceil((c - 1) / kv_seq)` steps whose blocks a chunk can reach.
    - `sinks`: `[q_heads]` learnable logits (gpt-oss's attention sinks), replicated on every device:
      each joins the softmax denominator of its head's every query, with no value. Their gradient is
      this device's share (`shard_map` sums it over the devices). Default `None`: no sinks.
    - `logit_softcap`: `c`; every score `s` (after `scale`) becomes `c · tanh(s / c)` before the
      bias and the masks (Gemma 2). Default `None`: no cap.
    - `dropout_rate`: the chance that dropout drops each attention probability. Which ones is a hash
      of `dropout_key`, the batch index, the query head and the true positions, so every layout, ring
      size and strategy drops the same set as
      [`dot_product_attention`][eqx_ring.dot_product_attention] on the whole sequence. The batch index
      is the local one: under data parallelism give each data shard its own key (e.g.
      `jax.random.fold_in(key, lax.axis_index("dp"))`). Default 0: no dropout.
    - `dropout_key`: a `jax.random` key, the same on every device of the ring; needed when
      `dropout_rate` is not 0.

    **Returns:**

    This device's shard of the output, `[*batch, q_seq, q_heads, head_dim]`, in `q`'s dtype and
    in `layout` order.

    **Raises:**

    `ValueError` if `axis_name` is not bound (not inside `shard_map` over it), if the layout is
    unknown or does not split the global sequence over the devices, if `strategy` is unknown, if
    the hybrid's `axis_name` is not a pair, if Ulysses' axis does not divide `q_heads`, if
    `kv_pieces` does not divide what it slices, and as
    [`blockwise_attention`][eqx_ring.blockwise_attention] for chunk sizes and `implementation`
    (with the local sequence); `TypeError` as it for `scale`; and the errors of
    [`dot_product_attention`][eqx_ring.dot_product_attention] for bad shapes, dtypes or masks.

    **Example:**

    ```python
    from functools import partial

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    import eqx_ring
    from eqx_ring.sharding import make_mesh

    mesh = make_mesh(sp=8)  # the 8 devices on the sequence axis "sp"
    q, k, v = jax.random.normal(jax.random.key(0), (3, 64, 4, 8))  # each [seq, heads, head_dim]
    # Zigzag order balances causal work; each device then gets 8 of the 64 tokens.
    q_, k_, v_ = (eqx_ring.to_layout(x, "zigzag", 8, axis=0) for x in (q, k, v))
    ring = partial(eqx_ring.ring_attention, axis_name="sp", layout="zigzag", causal=True)
    out = jax.shard_map(ring, mesh=mesh, in_specs=P("sp"), out_specs=P("sp"))(q_, k_, v_)
    out = eqx_ring.from_layout(out, "zigzag", 8, axis=0)
    assert jnp.allclose(out, eqx_ring.dot_product_attention(q, k, v, causal=True), atol=1e-5)
    ```
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "hybrid":
        if not (isinstance(axis_name, tuple) and len(axis_name) == 2):
            raise ValueError("strategy='hybrid' runs a ring over one mesh axis and the all-to-all over another: "
                             f"axis_name must be a pair (ring_axis, all_to_all_axis), got {axis_name!r}")
        named = dict(zip(("ring", "ulysses"), axis_name, strict=True))
    else:
        named = {"ulysses" if strategy == "ulysses" else "ring": axis_name}
    axes = {}
    for role, name in named.items():
        try:
            axes[role] = (name, lax.axis_size(name))
        except NameError:
            which = f"axis_name={axis_name!r}" + ("" if name == axis_name else f": {name!r}")
            raise ValueError(f"{which} is not a bound mesh axis: call ring_attention inside jax.shard_map over a "
                             "mesh that has this axis") from None
    return _run(q, k, v, strategy=strategy, axes=axes, layout=layout, causal=causal,
                causal_block_size=causal_block_size, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                key_bias=key_bias, sliding_window=sliding_window, scale=scale,
                query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, implementation=implementation,
                kv_pieces=kv_pieces, attention_chunk_size=attention_chunk_size, sinks=sinks,
                logit_softcap=logit_softcap, dropout_rate=dropout_rate, dropout_key=dropout_key)
