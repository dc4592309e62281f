"""Blockwise online-softmax attention and its ring, forward and backward.

One implementation serves both public kernels: `blockwise_attention` is a ring of one device.

Whole arrays keep the caller's sequence-major layout (no copies); each chunk is transposed
to head-major when it is used, so every block matmul is a plain or a right-transposed product
(XLA:CPU runs left-transposed ones 1.3-1.9x slower: benchmarks/matmul_layouts_cpu.py). B = flattened
batch, K = kv heads,
G = q heads per kv head:

    q, o, do          [B, Lq, K, G, D]     input dtype
    k, v              [B, Lk, K, D]        input dtype, travel around the ring
    acc, dq           [B, K, G, Lq, D]     float32 accumulators, head-major
    dk^T, dv^T        [B, K, D, Lk]        float32, travel with their block
    m, l, lse, delta  [B, K, G, Lq]        float32
    seg [B, L] int32;  bias [B, Lk] float32;  positions [L] int32 (recomputed, never sent)
"""

from collections.abc import Callable, Hashable
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jaxtyping import Array

from . import _pallas
from ._layout import shard_positions
from ._masks import MaskSpec, classify, visible

_F32 = jnp.float32


class Config(NamedTuple):
    """Everything static about one attention call (hashable: it is a custom_vjp nondiff arg).

    With `implementation="pallas"` one ring step is one fused kernel (`_pallas.py`) and the chunk
    sizes are its tiles: `q_chunk`/`k_chunk` forward, `bwd_chunks` backward.
    """

    spec: MaskSpec
    scale: float
    q_chunk: int
    k_chunk: int
    axis_name: Hashable | None
    layout: str
    implementation: str = "xla"
    bwd_chunks: tuple[int, int] = (0, 0)
    interpret: bool = False


class KV(NamedTuple):
    """What travels around the ring together: a key/value block and its per-key data."""

    k: Array
    v: Array
    seg: Array | None
    bias: Array | None


def _dsl(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _q_chunk(x, start, size):
    """[B, L, K, G, D] -> the head-major chunk [B, K, G, size, D]."""
    return _dsl(x, start, size, 1).transpose(0, 2, 3, 1, 4)


def _kv_chunk(x, start, size):
    """[B, L, K, D] -> the head-major chunk [B, K, size, D]."""
    return _dsl(x, start, size, 1).transpose(0, 2, 1, 3)


def _dus(x, update, start, axis):
    return lax.dynamic_update_slice_in_dim(x, update, start, axis)


def _opt(f, x, *rest):
    return None if x is None else f(x, *rest)


def _dispatch(cfg: Config, q_pos, q_seg, k_pos, k_seg, compute: Callable[[Any], Any], skipped):
    """Run `compute(mask)` only where some pair is visible, and build the mask only where needed."""
    spec = cfg.spec
    if not spec.positional and q_seg is None:
        return compute(None)
    kind = classify(spec, q_pos, k_pos, q_seg, k_seg)
    return lax.switch(
        kind,
        (
            lambda: skipped,
            lambda: compute(None),
            lambda: compute(visible(spec, q_pos, k_pos, q_seg, k_seg)),
        ),
    )


def _scores(qc, kc, bias_c, mask, scale):
    s = jnp.einsum("bkgqd,bkpd->bkgqp", qc, kc, preferred_element_type=_F32) * scale
    if bias_c is not None:
        s = s + bias_c[:, None, None, None, :]
    if mask is not None:
        s = jnp.where(mask[:, None, None] if mask.ndim == 3 else mask, s, -jnp.inf)
    return s


def _fwd_block(qc, kc, vc, bias_c, mask, acc, m, l, scale):
    s = _scores(qc, kc, bias_c, mask, scale)
    m_new = jnp.maximum(m, s.max(-1))
    # A row with nothing visible yet keeps m = -inf; shifting by 0 there keeps exp() at 0, not NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_use[..., None])
    alpha = jnp.exp(m - m_use)
    l = alpha * l + p.sum(-1)
    pv = jnp.einsum("bkgqp,bkpd->bkgqd", p.astype(vc.dtype), vc, preferred_element_type=_F32)
    return acc * alpha[..., None] + pv, m_new, l


def _bwd_block(qc, q_t, kc, vc, bias_c, mask, doc, do_t, lse_c, delta_c, scale):
    """Gradients of one block; q_t / do_t are the chunks transposed to [B, K, D, G, Cq]."""
    s = _scores(qc, kc, bias_c, mask, scale)
    p = jnp.exp(s - lse_c[..., None])
    dv_t = jnp.einsum("bkdgq,bkgqp->bkdp", do_t, p.astype(do_t.dtype), preferred_element_type=_F32)
    dp = jnp.einsum("bkgqd,bkpd->bkgqp", doc, vc, preferred_element_type=_F32)
    ds = p * (dp - delta_c[..., None])
    # dq and dk miss the factor `scale`; it is applied once to the finished sums.
    dq = jnp.einsum("bkgqp,bkpd->bkgqd", ds.astype(kc.dtype), kc, preferred_element_type=_F32)
    dk_t = jnp.einsum("bkdgq,bkgqp->bkdp", q_t, ds.astype(q_t.dtype), preferred_element_type=_F32)
    db = None if bias_c is None else ds.sum((1, 2, 3))
    return dq, dk_t, dv_t, db


def _each_kv_head(fn, per_head, headed, shared):
    """Run `fn` on one kv head (with its G q heads) at a time.

    `per_head` and `headed` have the kv-head axis at 1 and are sliced; `headed` and `shared`
    are carried and updated. Block temporaries then hold Cq x Ck scores for G q heads only, so a
    chunk pair's memory no longer grows with the head count; each matmul stays Cq x Ck x D.
    """

    def head(h, carry):
        headed, shared = carry

        def one(x):
            return _dsl(x, h, 1, 1)

        new_headed, shared = fn(*(one(x) for x in per_head), tuple(one(x) for x in headed), shared)
        return tuple(_dus(x, y, h, 1) for x, y in zip(headed, new_headed, strict=True)), shared

    return lax.fori_loop(0, per_head[0].shape[1], head, (headed, shared))


def _fwd_sweep(cfg: Config, q, q_pos, q_seg, kv: KV, k_pos, state):
    """Fold one key/value block into the running (acc, m, l) of every local query."""
    cq, ck = cfg.q_chunk, cfg.k_chunk

    def q_step(i, state):
        qs = i * cq
        qc, qp, qsg = _q_chunk(q, qs, cq), _dsl(q_pos, qs, cq, 0), _opt(_dsl, q_seg, qs, cq, 1)
        blk = tuple(_dsl(x, qs, cq, 3) for x in state)

        def k_step(j, blk):
            ks = j * ck
            kp, ksg, kb = _dsl(k_pos, ks, ck, 0), _opt(_dsl, kv.seg, ks, ck, 1), _opt(_dsl, kv.bias, ks, ck, 1)

            def compute(mask):
                def block(qh, kh, vh, carry, shared):
                    return _fwd_block(qh, kh, vh, kb, mask, *carry, cfg.scale), shared

                per_head = (qc, _kv_chunk(kv.k, ks, ck), _kv_chunk(kv.v, ks, ck))
                return _each_kv_head(block, per_head, blk, ())[0]

            return _dispatch(cfg, qp, qsg, kp, ksg, compute, blk)

        blk = lax.fori_loop(0, kv.k.shape[1] // ck, k_step, blk)
        return tuple(_dus(x, b, qs, 3) for x, b in zip(state, blk, strict=True))

    return lax.fori_loop(0, q.shape[1] // cq, q_step, state)


def _bwd_sweep(cfg: Config, q, q_pos, q_seg, do, lse, delta, kv: KV, k_pos, dq, dkv):
    """Add one key/value block's contribution to dq and to that block's (dk^T, dv^T, dbias)."""
    cq, ck = cfg.q_chunk, cfg.k_chunk

    def q_step(i, carry):
        dq, dkv = carry
        qs = i * cq
        q_raw, do_raw = _dsl(q, qs, cq, 1), _dsl(do, qs, cq, 1)
        qc, doc = q_raw.transpose(0, 2, 3, 1, 4), do_raw.transpose(0, 2, 3, 1, 4)
        q_t, do_t = q_raw.transpose(0, 2, 4, 3, 1), do_raw.transpose(0, 2, 4, 3, 1)
        lse_c, delta_c = _dsl(lse, qs, cq, 3), _dsl(delta, qs, cq, 3)
        qp, qsg = _dsl(q_pos, qs, cq, 0), _opt(_dsl, q_seg, qs, cq, 1)

        def k_step(j, c):
            dqc, dkv = c
            ks = j * ck
            kp, ksg, kb = _dsl(k_pos, ks, ck, 0), _opt(_dsl, kv.seg, ks, ck, 1), _opt(_dsl, kv.bias, ks, ck, 1)
            axes = (3, 3, 1)  # dk^T, dv^T, dbias
            blk = (dqc, *(_opt(_dsl, x, ks, ck, ax) for x, ax in zip(dkv, axes, strict=True)))

            def compute(mask):
                def block(qh, q_th, kh, vh, doh, do_th, lse_h, delta_h, carry, db):
                    *grads, ddb = _bwd_block(qh, q_th, kh, vh, kb, mask, doh, do_th, lse_h, delta_h, cfg.scale)
                    carry = tuple(a + g for a, g in zip(carry, grads, strict=True))
                    return carry, None if db is None else db + ddb

                per_head = (qc, q_t, _kv_chunk(kv.k, ks, ck), _kv_chunk(kv.v, ks, ck), doc, do_t, lse_c, delta_c)
                headed, db = _each_kv_head(block, per_head, blk[:3], blk[3])
                return (*headed, db)

            # The branches see chunk-sized values only: whole accumulators stay outside the
            # conditional, where XLA updates them in place instead of copying them.
            dqc, *dblk = _dispatch(cfg, qp, qsg, kp, ksg, compute, blk)
            return dqc, tuple(_opt(_dus, x, d, ks, ax) for x, d, ax in zip(dkv, dblk, axes, strict=True))

        dqc, dkv = lax.fori_loop(0, kv.k.shape[1] // ck, k_step, (_dsl(dq, qs, cq, 3), dkv))
        return _dus(dq, dqc, qs, 3), dkv

    return lax.fori_loop(0, q.shape[1] // cq, q_step, (dq, dkv))


def _ring_geometry(cfg: Config):
    """(devices on the ring, this device's index); (1, 0) without an axis."""
    if cfg.axis_name is None:
        return 1, 0
    return lax.axis_size(cfg.axis_name), lax.axis_index(cfg.axis_name)


def _shift(tree, cfg: Config, n: int):
    """Send a pytree one step along the ring: device i -> i + 1."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _ring_forward(cfg: Config, kv: KV, state, step):
    """Fold every key/value block of the ring into `state` with `step(s, kv, state)`."""
    n, _ = _ring_geometry(cfg)
    if n > 1:

        def body(carry, s):
            kv, state = carry
            nxt = _shift(kv, cfg, n)  # issued before this step's compute, which it overlaps
            return (nxt, step(s, kv, state)), None

        (kv, state), _ = lax.scan(body, (kv, state), jnp.arange(n - 1))
    return step(n - 1, kv, state)


def _ring_backward(cfg: Config, kv: KV, dq, dkv, step):
    """Run `step(s, kv, dq, dkv)` on every block; each block's `dkv` travels with it and comes home."""
    n, _ = _ring_geometry(cfg)
    if n > 1:

        def body(carry, s):
            kv, dq, dkv = carry
            nxt = _shift(kv, cfg, n)
            dq, dkv = step(s, kv, dq, dkv)
            # The gradient accumulators travel with their block, one step behind its k/v.
            return (nxt, dq, _shift(dkv, cfg, n)), None

        (kv, dq, dkv), _ = lax.scan(body, (kv, dq, dkv), jnp.arange(n - 1))
    dq, dkv = step(n - 1, kv, dq, dkv)
    if n > 1:
        dkv = _shift(dkv, cfg, n)  # the last hop brings each block's gradients home
    return dq, dkv


def _forward(cfg: Config, q, kv: KV, q_seg):
    n, r = _ring_geometry(cfg)
    b, lq, kh, g, d = q.shape
    lk = kv.k.shape[1]
    q_pos = shard_positions(r, lq, cfg.layout, n)

    def k_pos(s):
        return shard_positions((r - s) % n, lk, cfg.layout, n)

    if cfg.implementation == "pallas":

        def fused(s, kv, state):
            step = _pallas.forward(q, kv.k, kv.v, q_pos, k_pos(s), q_seg, kv.seg, kv.bias, spec=cfg.spec,
                                   scale=cfg.scale, block_q=cfg.q_chunk, block_k=cfg.k_chunk, interpret=cfg.interpret)
            return _pallas.merge(*state, *step)

        empty = (jnp.full_like(q, 0.0, _F32), jnp.full_like(q, -jnp.inf, _F32, shape=(b, kh, g, lq)))
        return _ring_forward(cfg, kv, empty, fused)

    # full_like inherits q's varying mesh axes, so the carries type-check under shard_map.
    state = (
        jnp.full_like(q, 0.0, _F32, shape=(b, kh, g, lq, d)),
        jnp.full_like(q, -jnp.inf, _F32, shape=(b, kh, g, lq)),
        jnp.full_like(q, 0.0, _F32, shape=(b, kh, g, lq)),
    )
    acc, m, l = _ring_forward(cfg, kv, state, lambda s, kv, st: _fwd_sweep(cfg, q, q_pos, q_seg, kv, k_pos(s), st))
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = (acc / l_safe[..., None]).transpose(0, 3, 1, 2, 4)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    return o, lse


def _backward(cfg: Config, q, kv: KV, q_seg, o, lse, do):
    n, r = _ring_geometry(cfg)
    b, lq, kh, g, d = q.shape
    lk = kv.k.shape[1]
    q_pos = shard_positions(r, lq, cfg.layout, n)
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(_F32), o.astype(_F32))

    def k_pos(s):
        return shard_positions((r - s) % n, lk, cfg.layout, n)

    if cfg.implementation == "pallas":

        def fused(s, kv, dq, dkv):
            bq, bk = cfg.bwd_chunks
            dq_s, *dkv_s = _pallas.backward(q, kv.k, kv.v, q_pos, k_pos(s), q_seg, kv.seg, kv.bias, do, lse, delta,
                                            spec=cfg.spec, scale=cfg.scale, block_q=bq, block_k=bk,
                                            interpret=cfg.interpret)
            return dq + dq_s, tuple(_opt(jnp.add, a, x) for a, x in zip(dkv, dkv_s, strict=True))

        zeros = tuple(_opt(jnp.full_like, x, 0.0, _F32) for x in (kv.k, kv.v, kv.bias))
        dq, (dk, dv, db) = _ring_backward(cfg, kv, jnp.full_like(q, 0.0, _F32), zeros, fused)
        return dq, dk, dv, db

    # Rows that saw no key have lse = -inf and every score -inf; shifting by 0 keeps p at 0.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    dq = jnp.full_like(q, 0.0, _F32, shape=(b, kh, g, lq, d))
    dkv = (
        jnp.full_like(kv.k, 0.0, _F32, shape=(b, kh, d, lk)),
        jnp.full_like(kv.v, 0.0, _F32, shape=(b, kh, d, lk)),
        _opt(jnp.full_like, kv.bias, 0.0, _F32),
    )

    def step(s, kv, dq, dkv):
        return _bwd_sweep(cfg, q, q_pos, q_seg, do, lse, delta, kv, k_pos(s), dq, dkv)

    dq, (dk_t, dv_t, db) = _ring_backward(cfg, kv, dq, dkv, step)
    dq = (dq * cfg.scale).transpose(0, 3, 1, 2, 4)
    return dq, (dk_t * cfg.scale).transpose(0, 3, 1, 2), dv_t.transpose(0, 3, 1, 2), db


def _fold_vmap(fn: Callable) -> Callable:
    """`fn` (arrays with a leading batch axis B) under `jax.vmap` folds the mapped axis into B.

    Without this, vmapping the kernel would batch the block classification (its segment ranges
    differ per example), turning every `lax.switch` into a select that computes all branches.
    Folded, one classification covers the whole batch and masked blocks are still skipped.
    """
    f = custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        def fold(x, batched):
            if not batched:
                x = jnp.broadcast_to(x, (axis_size, *x.shape))
            return x.reshape(-1, *x.shape[2:])

        out = f(*jax.tree.map(fold, list(args), list(in_batched)))
        out = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return f


@cache
def _impls(cfg: Config) -> tuple[Callable, Callable]:
    def fwd(q, k, v, bias, q_seg, k_seg):
        return _forward(cfg, q, KV(k, v, k_seg, bias), q_seg)

    def bwd(q, k, v, bias, q_seg, k_seg, o, lse, do):
        return _backward(cfg, q, KV(k, v, k_seg, bias), q_seg, o, lse, do)

    return _fold_vmap(fwd), _fold_vmap(bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(cfg: Config, q, k, v, bias, q_seg, k_seg):
    """Exact attention of local queries against the ring's keys. Shapes as in the module docstring."""
    o, _ = _impls(cfg)[0](q, k, v, bias, q_seg, k_seg)
    return o.astype(q.dtype)


def _attention_fwd(cfg: Config, q, k, v, bias, q_seg, k_seg):
    o, lse = _impls(cfg)[0](q, k, v, bias, q_seg, k_seg)
    o = o.astype(q.dtype)
    return o, (q, k, v, bias, q_seg, k_seg, o, lse)


def _attention_bwd(cfg: Config, res, do):
    q, k, v, bias, q_seg, k_seg, o, lse = res
    dq, dk, dv, db = _impls(cfg)[1](q, k, v, bias, q_seg, k_seg, o, lse, do)
    db = None if db is None else db.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), db, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
