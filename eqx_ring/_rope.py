"""Rotary position embedding computed from integer positions (no position table)."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def apply_rope(
    x: Float[Array, "seq heads head_dim"], positions: Int[Array, " seq"], theta: float
) -> Float[Array, "seq heads head_dim"]:
    """Rotate the two halves of each head by angles `position / theta^(2i / head_dim)`.

    Angles and the rotation are computed in float32 whatever `x`'s dtype, because bfloat16 cannot
    represent positions beyond 256 exactly and would scramble long-range phases.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
