"""The XLA path: a ring step as a loop over (query chunk, key chunk) pairs with an online softmax.

Runs on any backend. Each chunk pair's scores exist only while it is computed (O(chunk²) memory);
pairs that a mask hides entirely are skipped and pairs it shows entirely build no mask.

Whole arrays keep the caller's sequence-major layout (no copies); each chunk is transposed to
head-major when it is used, so every chunk matmul is a plain or a right-transposed product (XLA:CPU
runs left-transposed ones 1.3-1.9x slower: benchmarks/matmul_layouts_cpu.py). For the same reason the
accumulators are head-major, and dk, dv are kept transposed while they travel (shapes as in
`_kernel.py`, and C for a chunk's length):

    acc, dq           [B, K, G, Lq, D]    float32, unnormalized (acc) / unscaled (dq)
    dk^T, dv^T        [B, K, D, Lk]       float32, travel with their block
    m, l              [B, K, G, Lq]       float32, running row maximum and softmax denominator
"""

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from ._buffers import zeros_after
from ._checks import check_chunk
from ._kernel import Gradients, Kernel, KeyValueBlock, Queries, Upstream
from ._masks import MaskSpec, classify, dropout_keep, skip_or_compute, visible

_F32 = jnp.float32


def _slice(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _update_slice(x, update, start, axis):
    return lax.dynamic_update_slice_in_dim(x, update, start, axis)


def _maybe(f, x, *rest):
    """`f(x, *rest)`, or None for an optional input that is absent."""
    return None if x is None else f(x, *rest)


def _present(x):
    """`(x,)`, or `()` for an optional input that is absent."""
    return () if x is None else (x,)


def _head_major_query_chunk(x, start, size):
    """[B, L, K, G, D] -> the chunk [B, K, G, size, D]."""
    return _slice(x, start, size, 1).transpose(0, 2, 3, 1, 4)


def _head_major_kv_chunk(x, start, size):
    """[B, L, K, D] -> the chunk [B, K, size, D]."""
    return _slice(x, start, size, 1).transpose(0, 2, 1, 3)


def _skip_or_compute_chunks(masks: MaskSpec, q_pos, q_seg, k_pos, k_seg, compute, skipped):
    """`compute(mask)` where some pair of the chunks is visible (`skipped` elsewhere); `mask` is None
    where every pair is."""
    if not masks.positional and q_seg is None:
        return compute(None)
    kind = classify(masks, q_pos, k_pos, q_seg, k_seg)
    return skip_or_compute(kind, skipped, lambda masked: compute(visible(masks, q_pos, k_pos, q_seg, k_seg)
                                                                 if masked else None))


def _scores(q_chunk, k_chunk, bias_chunk, mask, scale, softcap=None):
    """The chunk pair's scores, and with a softcap the derivative of the cap, 1 - tanh², else None."""
    s = jnp.einsum("bkgqd,bkpd->bkgqp", q_chunk, k_chunk, preferred_element_type=_F32) * scale
    capped = None
    if softcap is not None:
        t = jnp.tanh(s / softcap)
        s, capped = softcap * t, 1.0 - t * t
    if bias_chunk is not None:
        s = s + bias_chunk[:, None, None, None, :]
    if mask is not None:
        s = jnp.where(mask[:, None, None] if mask.ndim == 3 else mask, s, -jnp.inf)
    return s, capped


def _dropped(x, keep, rate):
    """`x` where dropout keeps a probability (scaled by 1 / (1 - rate)), 0 where it drops one; `x` without dropout."""
    return x if keep is None else jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0)


def _chunk_keep(masks: MaskSpec, rows: tuple, k_pos):
    """The chunk pair's dropout keep mask ([B, K, G, Cq, Ck]) from its rows' hashes (`rows`: the hashes, or `()`
    without dropout, then None)."""
    return dropout_keep(masks.dropout_rate, *rows, k_pos) if rows else None


def _forward_chunk_pair(q_chunk, k_chunk, v_chunk, bias_chunk, mask, keep, acc, m, l, scale, masks):
    s, _ = _scores(q_chunk, k_chunk, bias_chunk, mask, scale, masks.logit_softcap)
    m_new = jnp.maximum(m, s.max(-1))
    # A row with nothing visible yet keeps m = -inf; shifting by 0 there keeps exp() at 0, not NaN.
    m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_shift[..., None])
    rescale = jnp.exp(m - m_shift)
    l = rescale * l + p.sum(-1)  # the softmax's denominator counts every probability, dropped or not
    p = _dropped(p, keep, masks.dropout_rate)
    pv = jnp.einsum("bkgqp,bkpd->bkgqd", p.astype(v_chunk.dtype), v_chunk, preferred_element_type=_F32)
    return acc * rescale[..., None] + pv, m_new, l


def _backward_chunk_pair(q_chunk, q_t, k_chunk, v_chunk, bias_chunk, mask, keep, do_chunk, do_t, lse_chunk,
                         delta_chunk, scale, masks):
    """Gradients of one chunk pair; q_t / do_t are the query chunks transposed to [B, K, D, G, C].

    With dropout, o = Σ_j p_j z_j v_j with z = keep / (1 - rate): dv takes p · z, and the gradient reaching
    p is z · (do · v); delta = rowsum(do · o) is Σ_j p_j z_j (do · v_j) as it stands.
    """
    s, capped = _scores(q_chunk, k_chunk, bias_chunk, mask, scale, masks.logit_softcap)
    p = jnp.exp(s - lse_chunk[..., None])
    dv_t = jnp.einsum("bkdgq,bkgqp->bkdp", do_t, _dropped(p, keep, masks.dropout_rate).astype(do_t.dtype),
                      preferred_element_type=_F32)
    dp = jnp.einsum("bkgqd,bkpd->bkgqp", do_chunk, v_chunk, preferred_element_type=_F32)
    ds = p * (_dropped(dp, keep, masks.dropout_rate) - delta_chunk[..., None])
    dbias = None if bias_chunk is None else ds.sum((1, 2, 3))  # the bias is added after the cap
    ds = ds if capped is None else ds * capped
    # dq and dk miss the factor `scale`; it is applied once to the finished sums.
    dq = jnp.einsum("bkgqp,bkpd->bkgqd", ds.astype(k_chunk.dtype), k_chunk, preferred_element_type=_F32)
    dk_t = jnp.einsum("bkdgq,bkgqp->bkdp", q_t, ds.astype(q_t.dtype), preferred_element_type=_F32)
    return dq, dk_t, dv_t, dbias


def _each_kv_head(fn, per_head, headed, shared):
    """Run `fn` on one kv head (with its G q heads) at a time.

    `per_head` and `headed` have the kv-head axis at 1 and are sliced; `headed` and `shared`
    are carried and updated. Chunk temporaries then hold C x C scores for G q heads only, so a
    chunk pair's memory no longer grows with the head count; each matmul stays C x C x D.
    """

    def head(h, carry):
        headed, shared = carry

        def one(x):
            return _slice(x, h, 1, 1)

        new_headed, shared = fn(*(one(x) for x in per_head), carry=tuple(one(x) for x in headed), shared=shared)
        return tuple(_update_slice(x, y, h, 1) for x, y in zip(headed, new_headed, strict=True)), shared

    return lax.fori_loop(0, per_head[0].shape[1], head, (headed, shared))


@dataclass(frozen=True)
class XlaKernel(Kernel):
    """Chunks of `query_chunk` queries and `key_chunk` keys (each dividing its local sequence)."""

    query_chunk: int
    key_chunk: int

    @classmethod
    def for_shapes(cls, query_chunk_size, key_chunk_size, q_len: int, kv_len: int, where: str) -> "XlaKernel":
        """The chunks actually used: each capped at its sequence, which it must divide.

        `q_len`/`kv_len` are the lengths one chunk loop sees (half a zigzag shard); `where` says so
        in the error, after the argument's name.
        """
        return cls(check_chunk("query_chunk_size", query_chunk_size, q_len, f"q_seq{where}"),
                   check_chunk("key_chunk_size", key_chunk_size, kv_len, f"kv_seq{where}"))

    def start_forward(self, q):
        b, lq, kh, g, d = q.shape
        # full_like inherits q's varying mesh axes, so the carries type-check under shard_map.
        return (
            jnp.full_like(q, 0.0, _F32, shape=(b, kh, g, lq, d)),
            jnp.full_like(q, -jnp.inf, _F32, shape=(b, kh, g, lq)),
            jnp.full_like(q, 0.0, _F32, shape=(b, kh, g, lq)),
        )

    def forward_step(self, masks, scale, queries: Queries, block: KeyValueBlock, key_positions, state):
        """Fold one key/value block into the running (acc, m, l) of every local query."""
        q_size, k_size = self.query_chunk, self.key_chunk

        def query_step(i, state):
            q_start = i * q_size
            q_chunk = _head_major_query_chunk(queries.q, q_start, q_size)
            q_pos = _slice(queries.positions, q_start, q_size, 0)
            q_seg = _maybe(_slice, queries.segment_ids, q_start, q_size, 1)
            rows = _maybe(_slice, queries.dropout, q_start, q_size, 3)
            running = tuple(_slice(x, q_start, q_size, 3) for x in state)

            def key_step(j, running):
                k_start = j * k_size
                k_pos = _slice(key_positions, k_start, k_size, 0)
                k_seg = _maybe(_slice, block.segment_ids, k_start, k_size, 1)
                bias = _maybe(_slice, block.bias, k_start, k_size, 1)

                def compute(mask):
                    def one_head(q_h, k_h, v_h, *rows_h, carry, shared):
                        keep = _chunk_keep(masks, rows_h, k_pos)
                        return _forward_chunk_pair(q_h, k_h, v_h, bias, mask, keep, *carry, scale, masks), shared

                    per_head = (q_chunk, _head_major_kv_chunk(block.k, k_start, k_size),
                                _head_major_kv_chunk(block.v, k_start, k_size), *_present(rows))
                    return _each_kv_head(one_head, per_head, running, ())[0]

                return _skip_or_compute_chunks(masks, q_pos, q_seg, k_pos, k_seg, compute, running)

            running = lax.fori_loop(0, block.k.shape[1] // k_size, key_step, running)
            return tuple(_update_slice(x, r, q_start, 3) for x, r in zip(state, running, strict=True))

        return lax.fori_loop(0, queries.q.shape[1] // q_size, query_step, state)

    def finish_forward(self, state):
        acc, m, l = state
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        # o is made one query chunk at a time into one buffer: from `(acc / l).transpose(...)`, XLA:CPU fused the
        # division into each of o's consumers (the output projection, the backward pass's delta), which made two
        # [L, H·D] copies held from the recomputed forward pass to the backward pass: 0.25 GiB of the 4.15 GiB a
        # device needed for the million-token train step of benchmarks/memory_floor.py (3.90 GiB with the loop).
        size = self.query_chunk

        def normalise(i, o):
            chunk = _slice(acc, i * size, size, 3) / _slice(l_safe, i * size, size, 3)[..., None]
            return _update_slice(o, chunk.transpose(0, 3, 1, 2, 4).astype(o.dtype), i * size, 1)

        b, kh, g, lq, d = acc.shape
        o = lax.fori_loop(0, lq // size, normalise, zeros_after(acc, acc, (b, lq, kh, g, d)))
        lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
        return o, lse

    def start_backward(self, queries: Queries, upstream: Upstream, block: KeyValueBlock):
        b, lq, kh, g, d = queries.q.shape
        lk = block.k.shape[1]
        # Rows that saw no key have lse = -inf and every score -inf; shifting by 0 keeps p at 0.
        upstream = upstream._replace(lse=jnp.where(upstream.lse == -jnp.inf, 0.0, upstream.lse))
        dq = zeros_after(upstream.do, queries.q, (b, kh, g, lq, d))
        # A block's dk/dv accumulators travel with it and are a piece's size: left to XLA, which places them
        # better (made after `do`, ring attention alone takes 30 MiB more at T = 1M with kv_pieces=8).
        dkv = (
            jnp.full_like(block.k, 0.0, _F32, shape=(b, kh, d, lk)),
            jnp.full_like(block.v, 0.0, _F32, shape=(b, kh, d, lk)),
            _maybe(jnp.full_like, block.bias, 0.0, _F32),
        )
        return upstream, dq, dkv

    def backward_step(self, masks, scale, queries: Queries, upstream: Upstream, block: KeyValueBlock,
                      key_positions, dq, dkv):
        """Add one key/value block's contribution to dq and to that block's (dk^T, dv^T, dbias)."""
        q_size, k_size = self.query_chunk, self.key_chunk

        def query_step(i, carry):
            dq, dkv = carry
            q_start = i * q_size
            q_raw, do_raw = _slice(queries.q, q_start, q_size, 1), _slice(upstream.do, q_start, q_size, 1)
            q_chunk, do_chunk = q_raw.transpose(0, 2, 3, 1, 4), do_raw.transpose(0, 2, 3, 1, 4)
            q_t, do_t = q_raw.transpose(0, 2, 4, 3, 1), do_raw.transpose(0, 2, 4, 3, 1)
            lse_chunk = _slice(upstream.lse, q_start, q_size, 3)
            delta_chunk = _slice(upstream.delta, q_start, q_size, 3)
            q_pos = _slice(queries.positions, q_start, q_size, 0)
            q_seg = _maybe(_slice, queries.segment_ids, q_start, q_size, 1)
            rows = _maybe(_slice, queries.dropout, q_start, q_size, 3)

            def key_step(j, carry):
                dq_chunk, dkv = carry
                k_start = j * k_size
                k_pos = _slice(key_positions, k_start, k_size, 0)
                k_seg = _maybe(_slice, block.segment_ids, k_start, k_size, 1)
                bias = _maybe(_slice, block.bias, k_start, k_size, 1)
                axes = (3, 3, 1)  # the key axis of dk^T, dv^T, dbias
                chunk_grads = (dq_chunk, *(_maybe(_slice, x, k_start, k_size, ax)
                                           for x, ax in zip(dkv, axes, strict=True)))

                def compute(mask):
                    def one_head(q_h, q_t_h, k_h, v_h, do_h, do_t_h, lse_h, delta_h, *rows_h, carry, shared):
                        keep = _chunk_keep(masks, rows_h, k_pos)
                        *grads, dbias_h = _backward_chunk_pair(q_h, q_t_h, k_h, v_h, bias, mask, keep, do_h, do_t_h,
                                                               lse_h, delta_h, scale, masks)
                        carry = tuple(a + g for a, g in zip(carry, grads, strict=True))
                        return carry, None if shared is None else shared + dbias_h

                    per_head = (q_chunk, q_t, _head_major_kv_chunk(block.k, k_start, k_size),
                                _head_major_kv_chunk(block.v, k_start, k_size), do_chunk, do_t, lse_chunk,
                                delta_chunk, *_present(rows))
                    headed, dbias = _each_kv_head(one_head, per_head, chunk_grads[:3], chunk_grads[3])
                    return (*headed, dbias)

                # The branches see chunk-sized values only: whole accumulators stay outside the
                # conditional, where XLA updates them in place instead of copying them.
                dq_chunk, *dkv_chunk = _skip_or_compute_chunks(masks, q_pos, q_seg, k_pos, k_seg, compute,
                                                               chunk_grads)
                return dq_chunk, tuple(_maybe(_update_slice, x, d, k_start, ax)
                                       for x, d, ax in zip(dkv, dkv_chunk, axes, strict=True))

            dq_chunk, dkv = lax.fori_loop(0, block.k.shape[1] // k_size, key_step,
                                          (_slice(dq, q_start, q_size, 3), dkv))
            return _update_slice(dq, dq_chunk, q_start, 3), dkv

        return lax.fori_loop(0, queries.q.shape[1] // q_size, query_step, (dq, dkv))

    def finish_backward(self, scale, dq, dkv):
        dk_t, dv_t, dbias = dkv
        dq = (dq * scale).transpose(0, 3, 1, 2, 4)
        return Gradients(dq, (dk_t * scale).transpose(0, 3, 1, 2), dv_t.transpose(0, 3, 1, 2), dbias)
