"""Buffers whose place in the schedule we choose, not XLA."""

import jax.numpy as jnp
from jaxtyping import Array


def zeros_after(after: Array | tuple[Array, ...], like: Array, shape: tuple[int, ...] | None = None,
                dtype=jnp.float32) -> Array:
    """Zeros of `shape` (default: `like`'s) and `dtype` (default float32), varying over `like`'s mesh axes, that XLA
    cannot make before `after` (an array, or each of a tuple of them) exists.

    Zeros depend on nothing, so XLA:CPU makes them as early as it likes: in a rematerialised layer, before its
    recomputed forward pass, so that the backward pass's gradient accumulators ([L, H·D] float32 each) are held
    through that pass and the FFN's backward pass too. Zeros computed from one element of each `after` array
    (`0 · tanh(x)`, which XLA does not fold, as it is NaN for a NaN x) wait for them. An `optimization_barrier`
    does not: XLA:CPU removes it and folds the constant zero through.
    """
    zero = sum(jnp.tanh(a[(0,) * a.ndim].astype(jnp.float32)) * 0.0
               for a in (after if isinstance(after, tuple) else (after,)))
    return jnp.full_like(like, zero, dtype, shape=shape)
