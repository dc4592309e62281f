"""Attention masks computed from true token positions, at element and at block granularity."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Int

SKIP, FULL, MASKED = 0, 1, 2  # block kinds: nothing visible, everything visible, mixed


class MaskSpec(NamedTuple):
    """Static description of how a score is formed and masked: the positional masks (segments are data and come
    separately) and the logit softcap, which acts on every score before the masks."""

    causal: bool
    causal_block_size: int
    sliding_window: int | None
    attention_chunk_size: int | None = None  # i sees j only if i // c == j // c (Llama 4's chunked attention)
    logit_softcap: float | None = None  # scores become c · tanh(s / c) before the bias and the masks (Gemma 2)

    @property
    def positional(self) -> bool:
        """Whether a mask depends on positions (`False`: only segments, if any, can hide a key)."""
        return self.causal or self.sliding_window is not None or self.attention_chunk_size is not None

    @property
    def lookback(self) -> int | None:
        """How far back a query can see, if a mask bounds it (keys at `i - lookback < j <= i`); else `None`."""
        bounds = [self.sliding_window] if self.sliding_window is not None else []
        if self.attention_chunk_size is not None and self.causal:
            bounds.append(self.attention_chunk_size)
        return min(bounds, default=None)


def visible(
    spec: MaskSpec,
    q_pos: Int[Array, " q"],
    k_pos: Int[Array, " k"],
    q_seg: Int[Array, "*b q"] | None,
    k_seg: Int[Array, "*b k"] | None,
) -> Bool[Array, "*b q k"] | None:
    """Which (query, key) pairs may attend; `None` when every pair may."""
    mask = None

    def and_also(mask, condition):
        return condition if mask is None else mask & condition

    qp, kp = q_pos[:, None], k_pos[None, :]
    if spec.causal:
        frame = spec.causal_block_size
        mask = and_also(mask, kp // frame <= qp // frame)
    if spec.sliding_window is not None:
        mask = and_also(mask, (qp - spec.sliding_window < kp) & (kp <= qp))
    if spec.attention_chunk_size is not None:
        mask = and_also(mask, qp // spec.attention_chunk_size == kp // spec.attention_chunk_size)
    if q_seg is not None:
        mask = and_also(mask, q_seg[..., :, None] == k_seg[..., None, :])
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
        frame = spec.causal_block_size
        none |= k_lo // frame > q_hi // frame
        every &= k_hi // frame <= q_lo // frame
    if spec.sliding_window is not None:
        w = spec.sliding_window
        none |= (k_lo > q_hi) | (k_hi <= q_lo - w)
        every &= (k_hi <= q_lo) & (k_lo > q_hi - w)
    if spec.attention_chunk_size is not None:
        c = spec.attention_chunk_size
        none |= (k_hi // c < q_lo // c) | (k_lo // c > q_hi // c)
        every &= (q_lo // c == q_hi // c) & (k_lo // c == k_hi // c) & (q_lo // c == k_lo // c)
    if q_seg is not None:
        qs_lo, qs_hi = q_seg.min(-1), q_seg.max(-1)
        ks_lo, ks_hi = k_seg.min(-1), k_seg.max(-1)
        none |= jnp.all((qs_hi < ks_lo) | (ks_hi < qs_lo))
        every &= jnp.all((qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo))
    return jnp.where(none, SKIP, jnp.where(every, FULL, MASKED)).astype(jnp.int32)


def skip_or_compute(kind: Int[Array, ""] | None, skipped: Any, compute: Callable[[bool], Any]) -> Any:
    """`skipped` for a `SKIP` block, else `compute(masked)`, with `masked` true only for a `MASKED` one.

    `kind=None` (nothing is ever masked) computes without a mask and builds no conditional.
    """
    if kind is None:
        return compute(False)
    branches = {SKIP: lambda: skipped, FULL: lambda: compute(False), MASKED: lambda: compute(True)}
    return lax.switch(kind, [branches[k] for k in sorted(branches)])
