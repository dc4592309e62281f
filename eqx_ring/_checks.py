"""Argument checks shared by every attention entry point; each error names the argument."""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array

from ._masks import MaskSpec


class Dims(NamedTuple):
    batch: tuple[int, ...]
    q_len: int
    q_heads: int
    kv_len: int
    kv_heads: int
    head_dim: int


def check_qkv(q: Array, k: Array, v: Array) -> Dims:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 3:
            raise ValueError(f"{name} must have shape [*batch, seq, heads, head_dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={k.shape}, v={v.shape}")
    if k.ndim != q.ndim or k.shape[:-3] != q.shape[:-3]:
        raise ValueError(f"q and k must have the same batch dims, got q={q.shape}, k={k.shape}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    *batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[-3], k.shape[-2]
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    return Dims(tuple(batch), q_len, q_heads, kv_len, kv_heads, head_dim)


def check_mask_args(
    dims: Dims,
    *,
    causal: bool,
    causal_block_size: int,
    sliding_window: int | None,
    segment_ids: Array | None,
    kv_segment_ids: Array | None,
    key_bias: Array | None,
) -> tuple[MaskSpec, Array | None, Array | None, Array | None]:
    """Validate the mask arguments; return the spec, q/kv segment ids and the key bias broadcast to batch."""
    if not isinstance(causal_block_size, int) or causal_block_size < 1:
        raise ValueError(f"causal_block_size must be a positive int, got {causal_block_size!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids needs segment_ids (the query side's ids) as well")
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        for name, ids, n in (("segment_ids", segment_ids, dims.q_len), ("kv_segment_ids", kv_segment_ids, dims.kv_len)):
            if ids.shape != (*dims.batch, n):
                raise ValueError(f"{name} must have shape {(*dims.batch, n)} ([*batch, seq]), got {ids.shape}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
        segment_ids, kv_segment_ids = segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
    if key_bias is not None:
        key_bias = jnp.asarray(key_bias)
        if not jnp.issubdtype(key_bias.dtype, jnp.floating):
            raise TypeError(f"key_bias must have a floating dtype, got {key_bias.dtype}")
        want = (*dims.batch, dims.kv_len)
        try:
            key_bias = jnp.broadcast_to(key_bias, want)
        except ValueError:
            raise ValueError(f"key_bias must broadcast to {want} ([*batch, kv_seq]), got {key_bias.shape}") from None
    spec = MaskSpec(bool(causal), causal_block_size, sliding_window)
    return spec, segment_ids, kv_segment_ids, key_bias


def check_chunk(name: str, chunk: int, length: int, what: str) -> int:
    """The chunk size actually used: `chunk`, capped at `length`, which it must divide."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{name} must be a positive int, got {chunk!r}")
    chunk = min(chunk, length)
    if length % chunk:
        raise ValueError(f"{name}={chunk} must divide {what}={length}")
    return chunk
