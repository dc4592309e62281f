"""An independent float64 NumPy attention, written from the definitions of the masks."""

import numpy as np

_M32 = 0xFFFFFFFF


def _murmur_finalizer(h: int) -> int:
    """MurmurHash3's fmix32, on Python ints."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def dropout_kept(rate: float, seed: int, i: int, j: int) -> bool:
    """Whether dropout keeps probability (i, j) of the row whose seed is `seed`, from the definition:
    row = fmix(seed + i·0x9E3779B9), bits = fmix(row xor j·0x7FEB352D), kept if bits >= rate·2³²."""
    row = _murmur_finalizer((seed + i * 0x9E3779B9) & _M32)
    return _murmur_finalizer(row ^ ((j * 0x7FEB352D) & _M32)) >= min(round(rate * 2**32), _M32)


def numpy_attention(q, k, v, *, causal=False, causal_block_size=1, segment_ids=None, kv_segment_ids=None,
                    key_bias=None, sliding_window=None, scale=None, attention_chunk_size=None, sinks=None,
                    logit_softcap=None, dropout=None):
    """q [B, Tq, H, D], k/v [B, Tk, Hk, D]; loops over batch, heads and queries. `dropout`: (rate, seeds), the
    seeds one uint32 per (batch, head), `[B, H]`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(tq):
                keep = np.ones(tk, bool)
                j = np.arange(tk)
                if causal:
                    keep &= j // causal_block_size <= i // causal_block_size
                if sliding_window is not None:
                    keep &= (i - sliding_window < j) & (j <= i)
                if attention_chunk_size is not None:
                    keep &= j // attention_chunk_size == i // attention_chunk_size
                if segment_ids is not None:
                    keep &= np.asarray(kv_segment_ids)[bi] == np.asarray(segment_ids)[bi, i]
                s = k[bi, :, kh] @ q[bi, i, hi] * scale
                if logit_softcap is not None:
                    s = logit_softcap * np.tanh(s / logit_softcap)
                if key_bias is not None:
                    s = s + np.broadcast_to(np.asarray(key_bias, np.float64), (b, tk))[bi]
                s = np.where(keep, s, -np.inf)
                if not np.isfinite(s).any():
                    continue  # sees no key: output 0 (a sink alone has no value)
                top = s.max() if sinks is None else max(s.max(), float(sinks[hi]))
                p = np.exp(s - top)
                denominator = p.sum() + (0.0 if sinks is None else np.exp(float(sinks[hi]) - top))
                p = p / denominator
                if dropout is not None:
                    rate, seeds = dropout
                    kept = np.array([dropout_kept(rate, int(seeds[bi, hi]), i, j) for j in range(tk)])
                    p = np.where(kept, p / (1 - rate), 0.0)
                out[bi, i, hi] = p @ v[bi, :, kh]
    return out
