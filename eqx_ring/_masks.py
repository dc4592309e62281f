"""Attention masks computed from true token positions, at element and at block granularity."""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

SKIP, FULL, MASKED = 0, 1, 2  # block kinds: nothing visible, everything visible, mixed


class MaskSpec(NamedTuple):
    """Static description of the positional masks (segments are data and come separately)."""

    causal: bool
    causal_block_size: int
    sliding_window: int | None

    @property
    def positional(self) -> bool:
        return self.causal or self.sliding_window is not None


def visible(
    spec: MaskSpec,
    q_pos: Int[Array, " q"],
    k_pos: Int[Array, " k"],
    q_seg: Int[Array, "*b q"] | None,
    k_seg: Int[Array, "*b k"] | None,
) -> Bool[Array, "*b q k"] | None:
    """Which (query, key) pairs may attend; `None` when every pair may."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    qp, kp = q_pos[:, None], k_pos[None, :]
    if spec.causal:
        b = spec.causal_block_size
        mask = both(mask, kp // b <= qp // b)
    if spec.sliding_window is not None:
        mask = both(mask, (qp - spec.sliding_window < kp) & (kp <= qp))
    if q_seg is not None:
        mask = both(mask, q_seg[..., :, None] == k_seg[..., None, :])
    return mask


def classify(
    spec: MaskSpec,
    q_pos: Int[Array, " q"],
    k_pos: Int[Array, " k"],
    q_seg: Int[Array, "b q"] | None,
    k_seg: Int[Array, "b k"] | None,
) -> Int[Array, ""]:
    """Kind of a (query block, key block) pair: `SKIP`, `FULL` or `MASKED`.

    Uses only the blocks' position and segment ranges, so it costs O(block) and is conservative:
    a block reported `SKIP` or `FULL` is exactly that for every batch element.
    """
    q_lo, q_hi, k_lo, k_hi = q_pos.min(), q_pos.max(), k_pos.min(), k_pos.max()
    none = jnp.asarray(False)
    every = jnp.asarray(True)
    if spec.causal:
        b = spec.causal_block_size
        none |= k_lo // b > q_hi // b
        every &= k_hi // b <= q_lo // b
    if spec.sliding_window is not None:
        w = spec.sliding_window
        none |= (k_lo > q_hi) | (k_hi <= q_lo - w)
        every &= (k_hi <= q_lo) & (k_lo > q_hi - w)
    if q_seg is not None:
        qs_lo, qs_hi = q_seg.min(-1), q_seg.max(-1)
        ks_lo, ks_hi = k_seg.min(-1), k_seg.max(-1)
        none |= jnp.all((qs_hi < ks_lo) | (ks_hi < qs_lo))
        every &= jnp.all((qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo))
    return jnp.where(none, SKIP, jnp.where(every, FULL, MASKED)).astype(jnp.int32)
