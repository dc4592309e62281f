"""Argument checks shared by every attention entry point; each error names the argument."""

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._masks import MaskSpec


def is_positive_int(value) -> bool:
    """Whether `value` is an int (a NumPy integer too, but not a bool) of at least 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_positive_int(name: str, value) -> None:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_array(name: str, x, shape: tuple[int | None, ...], axes: tuple[str, ...], *, kind: str = "float") -> None:
    """Raise unless `x` is an array of `shape` (`None`: any size) whose dtype is of `kind` ("float" or "int").

    The explicit twin of an argument's jaxtyping annotation, so that a wrong shape is named even with
    the hook off. `axes` names the axes for the message, e.g. `("seq", "d_model")`.
    """
    want = "[" + ", ".join(a if n is None else f"{a}={n}" for a, n in zip(axes, shape, strict=True)) + "]"
    want = want if axes else "[] (a scalar)"
    x_shape = getattr(x, "shape", None)
    if x_shape is None or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array of shape {want}, got {type(x).__name__}")
    if len(x_shape) != len(shape) or any(n is not None and n != m for n, m in zip(shape, x_shape, strict=True)):
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(x_shape)}")
    if kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")


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
    # Empty axes would reach a division by the chunk size or the head groups, or a softmax over nothing.
    for name, size in (("q_seq", q_len), ("kv_seq", kv_len), ("kv_heads", kv_heads)):
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {name}={size} (q shape {q.shape}, k shape {k.shape})")
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
    attention_chunk_size: int | None = None,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
) -> tuple[MaskSpec, Array | None, Array | None, Array | None]:
    """Validate the mask arguments; return the spec, q/kv segment ids and the key bias broadcast to batch."""
    if not isinstance(causal, bool | np.bool_):
        raise TypeError(f"causal must be a bool (a static Python value), got {causal!r}")
    check_positive_int("causal_block_size", causal_block_size)
    if causal_block_size != 1 and not causal:
        raise ValueError(f"causal_block_size={causal_block_size} sets the block of the causal mask, so it needs "
                         "causal=True; got causal=False")
    if sliding_window is not None and not is_positive_int(sliding_window):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if attention_chunk_size is not None and not is_positive_int(attention_chunk_size):
        raise ValueError(f"attention_chunk_size must be a positive int or None, got {attention_chunk_size!r}")
    if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real)
                                      or not math.isfinite(logit_softcap) or logit_softcap <= 0):
        raise ValueError(f"logit_softcap must be a positive finite number or None, got {logit_softcap!r}")
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real) or not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be a number in [0, 1) (a static Python value), got {dropout_rate!r}")
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
    spec = MaskSpec(bool(causal), int(causal_block_size), None if sliding_window is None else int(sliding_window),
                    None if attention_chunk_size is None else int(attention_chunk_size),
                    None if logit_softcap is None else float(logit_softcap), float(dropout_rate))
    return spec, segment_ids, kv_segment_ids, key_bias


def dropout_seeds(rate: float, key, dims: Dims) -> Array | None:
    """One uint32 seed per (batch, q head), `[*batch, q_heads]`, drawn from `key`; `None` without dropout."""
    if rate == 0:
        return None
    if key is None:
        raise ValueError(f"dropout_rate={rate} needs dropout_key, a jax.random key (or set dropout_rate=0)")
    return jax.random.bits(key, (*dims.batch, dims.q_heads), jnp.uint32)


def check_sinks(sinks, dims: Dims):
    """`sinks` (or `None`), once it is one floating logit per query head."""
    if sinks is None:
        return None
    if not hasattr(sinks, "shape") or not jnp.issubdtype(jnp.asarray(sinks).dtype, jnp.floating):
        raise TypeError(f"sinks must be a floating array of one logit per query head, got {sinks!r}")
    if sinks.shape != (dims.q_heads,):
        raise ValueError(f"sinks must have shape ({dims.q_heads},) (one logit per query head), got {sinks.shape}")
    return sinks


def check_chunk(name: str, chunk: int, length: int, what: str) -> int:
    """The chunk size actually used: `chunk`, capped at `length`, which it must divide."""
    check_positive_int(name, chunk)
    chunk = min(int(chunk), length)
    if length % chunk:
        raise ValueError(f"{name}={chunk} must divide {what}={length}")
    return chunk


def known_value(x) -> np.ndarray | None:
    """`x` as a NumPy array, or `None` if it is traced (under `jit` or `vmap` its value exists only at run time)."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def check_scale(scale, *, static: bool):
    """`scale` as given (a Python float when `static`); it must be finite wherever its value is known."""
    if scale is None:
        return None
    value = known_value(scale)
    if value is None:
        if static:
            raise TypeError(f"scale must be a Python float or None (it is static here), got a traced {scale!r}")
        return scale
    if value.shape != () or not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {float(value)}")
    return float(value) if static else scale
