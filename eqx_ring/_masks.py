"""Attention masks computed from true token positions, at element and at block granularity, and the dropout
mask, a hash of true positions."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Int, UInt32

SKIP, FULL, MASKED = 0, 1, 2  # block kinds: nothing visible, everything visible, mixed


class MaskSpec(NamedTuple):
    """Static description of how a score is formed and masked: the positional masks (segments are data and come
    separately), the logit softcap, which acts on every score before the masks, and the dropout rate, which
    acts on the probabilities after the softmax."""

    causal: bool
    causal_block_size: int
    sliding_window: int | None
    attention_chunk_size: int | None = None  # i sees j only if i // c == j // c (Llama 4's chunked attention)
    logit_softcap: float | None = None  # scores become c · tanh(s / c) before the bias and the masks (Gemma 2)
    dropout_rate: float = 0.0  # each probability is dropped with this chance and the others scaled by 1 / (1 - it)

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


def _mix(h: UInt32[Array, "*s"]) -> UInt32[Array, "*s"]:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 in which each input bit flips each output bit
    with probability close to 1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_rows(seeds: UInt32[Array, "*rows"], q_pos: Int[Array, " q"]) -> UInt32[Array, "*rows q"]:
    """Each query row's dropout hash: its (batch, head) seed mixed with its true position."""
    return _mix(seeds[..., None] + q_pos.astype(jnp.uint32) * jnp.uint32(0x9E3779B9))


def dropout_keep(rate: float, rows: UInt32[Array, "*rows q"], k_pos: Int[Array, " k"]) -> Bool[Array, "*rows q k"]:
    """Which probabilities dropout keeps: a counter-based hash of the row's hash and the key's true position.

    A pure function of (seed, true query position, true key position), so every path, layout, ring size,
    chunking and strategy drops the same set, and no `[q, k]` mask is ever stored: each tile makes its own.
    One MurmurHash3 finalizer per element, two multiplies and three xor-shifts (`jax.random`'s threefry
    would run twenty rounds); a probability is dropped with chance `rate`, to within 2⁻³².
    """
    bits = _mix(rows[..., None] ^ (k_pos.astype(jnp.uint32) * jnp.uint32(0x7FEB352D)))
    return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


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
