"""Rotary position embedding computed from integer positions (no position table), with frequency scaling."""

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

ROPE_SCALINGS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are rescaled to stretch a model's context: position interpolation or Llama 3's.

    Part of an [`AttentionSpec`][eqx_ring.AttentionSpec] (`rope_scaling=`); the same two kinds as
    Hugging Face's `rope_scaling` of `"rope_type"` `"linear"` and `"llama3"`.

    - `"linear"` (position interpolation, Chen et al. 2023): every frequency divided by `factor`,
      which is position `p` rotated as `p / factor`.
    - `"llama3"`: frequencies whose wavelength is longer than `original_max_position_embeddings /
      low_freq_factor` are divided by `factor`, those shorter than `original_max_position_embeddings /
      high_freq_factor` kept, and those between interpolated smoothly (Llama 3.1's recipe).

    **Arguments:**

    - `kind`: `"linear"` or `"llama3"`.
    - `factor`: the stretch, a finite float > 0.
    - `low_freq_factor`, `high_freq_factor`: `"llama3"` only (defaults 1 and 4, Llama 3.1's);
      `high_freq_factor` must exceed `low_freq_factor`.
    - `original_max_position_embeddings`: `"llama3"` only: the context the model was pretrained on
      (default 8192, Llama 3's).

    **Raises:** `ValueError`, naming the field, for an unknown `kind`, a factor that is not a finite
    float > 0, `high_freq_factor <= low_freq_factor`, or an `original_max_position_embeddings` that
    is not a positive int.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"RopeScaling.kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"RopeScaling.{name} must be a finite float > 0, got {value!r}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed low_freq_factor="
                             f"{self.low_freq_factor}")
        length = self.original_max_position_embeddings
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
            raise ValueError(f"RopeScaling.original_max_position_embeddings must be a positive int, got {length!r}")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The `head_dim // 2` angular frequencies `theta^(-2i / head_dim)`, rescaled by `scaling`, as float32.

    Computed in float64 on the host: they depend on static settings only, so they are constants of
    the compiled program.
    """
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    if scaling is not None:
        if scaling.kind == "linear":
            inv_freq = inv_freq / scaling.factor
        else:
            old = scaling.original_max_position_embeddings
            wavelength = 2 * math.pi / inv_freq
            smooth = (old / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor
                                                                     - scaling.low_freq_factor)
            inv_freq = np.where(wavelength > old / scaling.low_freq_factor, inv_freq / scaling.factor,
                                np.where(wavelength < old / scaling.high_freq_factor, inv_freq,
                                         (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq))
    return inv_freq.astype(np.float32)


def apply_rope(
    x: Float[Array, "seq heads head_dim"], positions: Int[Array, " seq"], theta: float,
    scaling: RopeScaling | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """Rotate the two halves of each head by angles `position * rope_frequencies(head_dim, theta, scaling)`.

    Angles and the rotation are computed in float32 whatever `x`'s dtype, because bfloat16 cannot
    represent positions beyond 256 exactly and would scramble long-range phases.
    """
    inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling))
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
