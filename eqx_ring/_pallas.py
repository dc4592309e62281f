"""Fused attention kernels for one ring step (Pallas, lowered to Triton on GPU).

The XLA path in `_kernel.py` materializes each chunk pair's scores in HBM and pays a kernel launch
per chunk; these kernels keep one q tile in registers and stream the k/v tiles past it, so a ring
step costs one launch forward and two backward. They compute exactly what one ring step of
`_kernel.py` contributes, so the ring composes them unchanged:

    forward:   o, lse = merge(o, lse, *forward(q, kv block of step s, ...))   for every step s
    backward:  delta = rowsum(do * o) once; then per step dq += backward(...)[0], and the
               block's dk, dv, dbias (which travel with it) += backward(...)[1:]

Shapes (B batch, K kv heads, G q heads per kv head, D head dim, H = K * G):

    q, do        [B, Lq, K, G, D]   q's dtype          o, dq   [B, Lq, K, G, D]  float32
    k, v         [B, Lk, K, D]      q's dtype          dk, dv  [B, Lk, K, D]     float32
    lse, delta   [B, K, G, Lq]      float32            q_pos [Lq], k_pos [Lk]    int32
    q_seg [B, Lq], k_seg [B, Lk] int32;  bias, dbias [B, Lk] float32

Which tile pairs to skip, and which need no mask, is decided before the kernels run: `classify`
reduces over the batch axis with `jnp.all`, which Triton cannot lower (no `reduce_and`), and one
table of kinds per (batch, q tile, k tile) then serves every head and all three kernels. Inside
the kernels `visible` builds the element mask of the mixed tiles, so the masks are the ones the
XLA path and the dense reference use.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from ._masks import FULL, MASKED, SKIP, MaskSpec, classify, visible

_F32 = jnp.float32
_LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is one GPU instruction
_LN2 = 0.6931471805599453
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def pow2_tile(n: int) -> bool:
    """Triton's rule for a `tl.dot` tile side (and the head dim): a power of two, 16 or more."""
    return n >= 16 and n & (n - 1) == 0


def _check(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, block_q: int, block_k: int, interpret: bool):
    """The tile sizes actually used; raise early, with the argument's name, what Triton would reject late."""
    b, lq, kh, g, d = q.shape
    lk = k.shape[1]
    if k.shape != (b, lk, kh, d) or v.shape != k.shape:
        raise ValueError(f"k and v must have shape [B, Lk, K, D] = [{b}, Lk, {kh}, {d}], got {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_pos.shape != (lq,) or k_pos.shape != (lk,):
        raise ValueError(f"q_pos and k_pos must have shapes ({lq},) and ({lk},), got {q_pos.shape}, {k_pos.shape}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("q_seg and k_seg must be given together")
    if q_seg is not None and (q_seg.shape != (b, lq) or k_seg.shape != (b, lk)):
        raise ValueError(f"q_seg and k_seg must have shapes ({b}, {lq}), ({b}, {lk}), got {q_seg.shape}, {k_seg.shape}")
    if bias is not None and bias.shape != (b, lk):
        raise ValueError(f"bias must have shape ({b}, {lk}), got {bias.shape}")
    sizes = []
    for name, blk, n in (("block_q", block_q, lq), ("block_k", block_k, lk)):
        if not isinstance(blk, int) or blk < 1:
            raise ValueError(f"{name} must be a positive int, got {blk!r}")
        blk = min(blk, n)
        if n % blk:
            raise ValueError(f"{name}={blk} must divide the sequence length {n}")
        if not interpret and not pow2_tile(blk):
            raise ValueError(f"{name}={blk} must be a power of two >= 16 for Triton (tl.dot tiles)")
        sizes.append(blk)
    if not interpret and not pow2_tile(d):
        raise ValueError(f"head dim {d} must be a power of two >= 16 for Triton (tl.dot tiles)")
    return tuple(sizes)


def _kinds(spec: MaskSpec, q_pos, k_pos, q_seg, k_seg, batch: int, bq: int, bk: int):
    """[B, Lq/bq, Lk/bk] int32 tile kinds (SKIP/FULL/MASKED); None when nothing is ever masked."""
    if not spec.positional and q_seg is None:
        return None
    qp, kp = q_pos.reshape(-1, bq), k_pos.reshape(-1, bk)
    if q_seg is None:

        def pos_only(a, b):
            return classify(spec, a, b, None, None)

        table = jax.vmap(jax.vmap(pos_only, (None, 0)), (0, None))(qp, kp)
        return jnp.broadcast_to(table, (batch, *table.shape))

    def one(a, b, sa, sb):  # one batch element: classify's batch axis has size 1
        return classify(spec, a, b, sa[None], sb[None])

    per_q = jax.vmap(jax.vmap(one, (None, 0, None, 0)), (0, None, 0, None))
    per_b = jax.vmap(per_q, (None, None, 0, 0))
    return per_b(qp, kp, q_seg.reshape(batch, -1, bq), k_seg.reshape(batch, -1, bk))


def _by_kind(kind, carry, compute):
    """Skip the tile, or run `compute(masked)`: the mask is built only where the tile is mixed."""
    if kind is None:
        return compute(False)
    branches = {SKIP: lambda: carry, FULL: lambda: compute(False), MASKED: lambda: compute(True)}
    return lax.switch(kind, [branches[i] for i in range(3)])


def _varying(*xs) -> dict:
    """ShapeDtypeStruct keywords that make outputs vary over every manual mesh axis an input does.

    Under `shard_map` (with its default check_vma) pallas_call cannot infer how its outputs vary
    and refuses out shapes that do not say; a scalar probe summing one element of each input
    carries the union of their varying axes (and is dead code that XLA drops).
    """
    probe = sum(x[(0,) * x.ndim].astype(_F32) for x in xs if x is not None)
    like = jax.ShapeDtypeStruct.like(probe)
    if hasattr(like, "manual_axis_type"):  # jax >= 0.10
        mat = like.manual_axis_type
        return {"manual_axis_type": jax.sharding.ManualAxisType() if mat is None else mat}
    vma = getattr(jax.typeof(probe), "vma", None)  # earlier jax
    return {} if vma is None else {"vma": vma}


def _default_warps(d: int) -> int:
    return 4 if d <= 64 else 8


def _scores2(q, k, bias2, qp, kp, qs, ks, masked, spec, scale):
    """Scores times log2(e), with the bias (passed in pre-scaled) and, for mixed tiles, the mask."""
    s = _dot(q, k, _NT) * (scale * _LOG2E)
    if bias2 is not None:
        s = s + bias2[None, :]
    if masked:
        s = jnp.where(visible(spec, qp, kp, qs, ks), s, -jnp.inf)
    return s


# ---------------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, spec, scale, bk, nk, has_kinds, has_seg, has_bias):
    it = iter(refs)
    kinds_ref = next(it) if has_kinds else None
    q_ref, k_ref, v_ref, qpos_ref, kpos_ref = (next(it) for _ in range(5))
    qseg_ref, kseg_ref = (next(it), next(it)) if has_seg else (None, None)
    bias_ref = next(it) if has_bias else None
    o_ref, lse_ref = it

    q = q_ref[...]
    bq, d = q.shape

    def k_step(j, carry):
        sl = pl.ds(pl.multiple_of(j * bk, bk), bk)

        def compute(masked):
            acc, m, l = carry
            k, v = k_ref[sl, :], v_ref[sl, :]
            qp, kp = (qpos_ref[...], kpos_ref[sl]) if masked else (None, None)
            qs, ks = (qseg_ref[...], kseg_ref[sl]) if has_seg and masked else (None, None)
            s = _scores2(q, k, bias_ref[sl] if has_bias else None, qp, kp, qs, ks, masked, spec, scale)
            m_new = jnp.maximum(m, s.max(-1))
            # A row that has seen nothing keeps m = -inf; shifting by 0 there keeps exp2() at 0, not NaN.
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - m_use[:, None])
            alpha = jnp.exp2(m - m_use)
            l = alpha * l + p.sum(-1)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, l

        return _by_kind(kinds_ref[j] if has_kinds else None, carry, compute)

    init = (jnp.zeros((bq, d), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
    acc, m, l = lax.fori_loop(0, nk, k_step, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, m * _LN2 + jnp.log(l_safe), -jnp.inf)


def forward(
    q: Float[Array, "b lq kh g d"],
    k: Float[Array, "b lk kh d"],
    v: Float[Array, "b lk kh d"],
    q_pos: Int[Array, " lq"],
    k_pos: Int[Array, " lk"],
    q_seg: Int[Array, "b lq"] | None,
    k_seg: Int[Array, "b lk"] | None,
    bias: Float[Array, "b lk"] | None,
    *,
    spec: MaskSpec,
    scale: float,
    block_q: int = 128,
    block_k: int = 64,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Float[Array, "b lq kh g d"], Float[Array, "b kh g lq"]]:
    """Normalized attention of q against this k/v block alone, with its log-sum-exp.

    Normalized (not the raw accumulator) so that blocks combine with `merge` in any order; a row
    that sees no key here gets o = 0 and lse = -inf, which `merge` treats as "no contribution".
    Tiles: grid (B, H, Lq / block_q); each program streams the kv head's Lk / block_k tiles.
    Triton defaults for H100: block_q=128, block_k=64, 4 warps up to D=64 and 8 above, 3 stages
    for 16-bit inputs (2 for float32, whose tiles take twice the shared memory).
    """
    bq, bk = _check(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, block_q, block_k, interpret)
    b, lq, kh, g, d = q.shape
    lk = k.shape[1]
    nq, nk = lq // bq, lk // bk
    q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
    q_seg, k_seg = (None, None) if q_seg is None else (q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    kinds = _kinds(spec, q_pos, k_pos, q_seg, k_seg, b, bq, bk)

    def head(h):
        return lax.div(h, g), lax.rem(h, g)

    args, specs = [], []

    def add(x, block, index):
        args.append(x)
        specs.append(pl.BlockSpec(block, index))

    if kinds is not None:
        add(kinds, (None, None, nk), lambda bi, h, i: (bi, i, 0))
    add(q, (None, bq, None, None, d), lambda bi, h, i: (bi, i, *head(h), 0))
    add(k, (None, lk, None, d), lambda bi, h, i: (bi, 0, head(h)[0], 0))
    add(v, (None, lk, None, d), lambda bi, h, i: (bi, 0, head(h)[0], 0))
    add(q_pos, (bq,), lambda bi, h, i: (i,))
    add(k_pos, (lk,), lambda bi, h, i: (0,))
    if q_seg is not None:
        add(q_seg, (None, bq), lambda bi, h, i: (bi, i))
        add(k_seg, (None, lk), lambda bi, h, i: (bi, 0))
    if bias is not None:
        add(bias.astype(_F32) * _LOG2E, (None, lk), lambda bi, h, i: (bi, 0))

    kernel = partial(
        _fwd_kernel, spec=spec, scale=float(scale), bk=bk, nk=nk,
        has_kinds=kinds is not None, has_seg=q_seg is not None, has_bias=bias is not None,
    )
    if num_stages is None:
        num_stages = 3 if q.dtype.itemsize <= 2 else 2
    vary = _varying(*args)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kh * g, nq),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, None, d), lambda bi, h, i: (bi, i, *head(h), 0)),
            pl.BlockSpec((None, None, None, bq), lambda bi, h, i: (bi, *head(h), i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, _F32, **vary), jax.ShapeDtypeStruct((b, kh, g, lq), _F32, **vary)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or _default_warps(d), num_stages=num_stages),
        interpret=interpret,
        name="ring_attention_fwd",
    )(*args)
    return o, lse


def merge(
    o_a: Float[Array, "b lq kh g d"],
    lse_a: Float[Array, "b kh g lq"],
    o_b: Float[Array, "b lq kh g d"],
    lse_b: Float[Array, "b kh g lq"],
) -> tuple[Float[Array, "b lq kh g d"], Float[Array, "b kh g lq"]]:
    """Exact softmax over the union of two disjoint key sets, from each set's (o, lse).

    Weights are shifted by the larger lse so neither exp() overflows; a row empty on both sides
    (both lse = -inf) stays o = 0, lse = -inf instead of becoming 0/0.
    """
    m = jnp.maximum(lse_a, lse_b)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w_a, w_b = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)
    total = w_a + w_b
    seen = total > 0
    total_safe = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, m_safe + jnp.log(total_safe), -jnp.inf)

    def weight(w):  # [B, K, G, Lq] -> broadcastable against o [B, Lq, K, G, D]
        return (w / total_safe).transpose(0, 3, 1, 2)[..., None]

    return o_a * weight(w_a) + o_b * weight(w_b), lse


# --------------------------------------------------------------------------------------------- backward


def _probs(q, k, bias2, qp, kp, qs, ks, lse2, masked, spec, scale):
    """This tile's softmax probabilities, recomputed from the final lse (in base 2, like the scores)."""
    return jnp.exp2(_scores2(q, k, bias2, qp, kp, qs, ks, masked, spec, scale) - lse2[:, None])


def _dq_kernel(*refs, spec, scale, bk, nk, has_kinds, has_seg, has_bias):
    it = iter(refs)
    kinds_ref = next(it) if has_kinds else None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref = (next(it) for _ in range(8))
    qseg_ref, kseg_ref = (next(it), next(it)) if has_seg else (None, None)
    bias_ref = next(it) if has_bias else None
    (dq_ref,) = it

    q, do, lse2, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def k_step(j, dq):
        sl = pl.ds(pl.multiple_of(j * bk, bk), bk)

        def compute(masked):
            k, v = k_ref[sl, :], v_ref[sl, :]
            qs, ks = (qseg_ref[...], kseg_ref[sl]) if has_seg and masked else (None, None)
            kp = kpos_ref[sl] if masked else None
            bias = bias_ref[sl] if has_bias else None
            qp = qpos_ref[...] if masked else None
            p = _probs(q, k, bias, qp, kp, qs, ks, lse2, masked, spec, scale)
            ds = p * (_dot(do, v, _NT) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)

        return _by_kind(kinds_ref[j] if has_kinds else None, dq, compute)

    dq = lax.fori_loop(0, nk, k_step, jnp.zeros(q.shape, _F32))
    dq_ref[...] = dq * scale


def _dkv_kernel(*refs, spec, scale, bq, nq, g, has_kinds, has_seg, has_bias):
    it = iter(refs)
    kinds_ref = next(it) if has_kinds else None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref = (next(it) for _ in range(8))
    qseg_ref, kseg_ref = (next(it), next(it)) if has_seg else (None, None)
    bias_ref = next(it) if has_bias else None
    dk_ref, dv_ref, *db_ref = it

    k, v = k_ref[...], v_ref[...]
    bias = bias_ref[...] if has_bias else None
    bk, d = k.shape

    def q_step(i, carry):
        sl = pl.ds(pl.multiple_of(i * bq, bq), bq)

        def compute(masked):
            qp, kp = (qpos_ref[sl], kpos_ref[...]) if masked else (None, None)
            qs, ks = (qseg_ref[sl], kseg_ref[...]) if has_seg and masked else (None, None)

            def head(gi, carry):  # the G q heads that read this kv head
                dk, dv, db = carry
                q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
                p = _probs(q, k, bias, qp, kp, qs, ks, lse_ref[gi, sl], masked, spec, scale)
                dv = dv + _dot(p.astype(do.dtype), do, _TN)
                ds = p * (_dot(do, v, _NT) - delta_ref[gi, sl][:, None])
                dk = dk + _dot(ds.astype(q.dtype), q, _TN)
                return dk, dv, (db + ds.sum(0)) if has_bias else db

            return lax.fori_loop(0, g, head, carry)

        return _by_kind(kinds_ref[i] if has_kinds else None, carry, compute)

    init = (jnp.zeros((bk, d), _F32), jnp.zeros((bk, d), _F32), jnp.zeros((bk,), _F32))
    dk, dv, db = lax.fori_loop(0, nq, q_step, init)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv
    if has_bias:
        db_ref[0][...] = db


def backward(
    q: Float[Array, "b lq kh g d"],
    k: Float[Array, "b lk kh d"],
    v: Float[Array, "b lk kh d"],
    q_pos: Int[Array, " lq"],
    k_pos: Int[Array, " lk"],
    q_seg: Int[Array, "b lq"] | None,
    k_seg: Int[Array, "b lk"] | None,
    bias: Float[Array, "b lk"] | None,
    do: Float[Array, "b lq kh g d"],
    lse: Float[Array, "b kh g lq"],
    delta: Float[Array, "b kh g lq"],
    *,
    spec: MaskSpec,
    scale: float,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[
    Float[Array, "b lq kh g d"], Float[Array, "b lk kh d"], Float[Array, "b lk kh d"], Float[Array, "b lk"] | None
]:
    """This k/v block's share of (dq, dk, dv, dbias), given the lse and delta of the whole ring.

    With the final lse, each block's probabilities are already the global ones, so the shares
    just add up. Two kernels instead of one fused pass so that nothing is written by two programs
    (no atomics, deterministic): dq gridded over (B, H, q tiles), dk/dv over (B, K, k tiles), each
    looping over the G q heads of its kv head. dbias is summed over the K kv heads outside.
    Rows with lse = -inf see no key anywhere and get zero gradients.
    """
    bq, bk = _check(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, block_q, block_k, interpret)
    b, lq, kh, g, d = q.shape
    lk = k.shape[1]
    nq, nk = lq // bq, lk // bk
    q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
    q_seg, k_seg = (None, None) if q_seg is None else (q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    bias = None if bias is None else bias.astype(_F32) * _LOG2E
    do, delta = do.astype(q.dtype), delta.astype(_F32)
    # Rows with lse = -inf see no key: every score is -inf there, and shifting by 0 keeps p at 0.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse.astype(_F32) * _LOG2E)
    kinds = _kinds(spec, q_pos, k_pos, q_seg, k_seg, b, bq, bk)
    flags = dict(has_kinds=kinds is not None, has_seg=q_seg is not None, has_bias=bias is not None)
    vary = _varying(kinds, q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, bias)
    params = plgpu.CompilerParams(num_warps=num_warps or _default_warps(d), num_stages=num_stages)

    def call(kernel, grid, blocks, out_specs, out_shape, name):
        """`blocks`: per input, (block shape, index map); None entries are absent inputs."""
        inputs = (kinds, q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, bias)
        args = [x for x in inputs if x is not None]
        specs = [pl.BlockSpec(*blk) for x, blk in zip(inputs, blocks, strict=True) if x is not None]
        return pl.pallas_call(
            kernel, grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=params, interpret=interpret, name=name,
        )(*args)

    def head(h):
        return lax.div(h, g), lax.rem(h, g)

    def q_tile(bi, h, i):
        return (bi, i, *head(h), 0)

    def kv_all(bi, h, i):
        return (bi, 0, head(h)[0], 0)

    def stat_tile(bi, h, i):
        return (bi, *head(h), i)

    dq = call(
        partial(_dq_kernel, spec=spec, scale=float(scale), bk=bk, nk=nk, **flags),
        (b, kh * g, nq),
        [
            ((None, None, nk), lambda bi, h, i: (bi, i, 0)),
            ((None, bq, None, None, d), q_tile),
            ((None, lk, None, d), kv_all),
            ((None, lk, None, d), kv_all),
            ((None, bq, None, None, d), q_tile),
            ((None, None, None, bq), stat_tile),
            ((None, None, None, bq), stat_tile),
            ((bq,), lambda bi, h, i: (i,)),
            ((lk,), lambda bi, h, i: (0,)),
            ((None, bq), lambda bi, h, i: (bi, i)),
            ((None, lk), lambda bi, h, i: (bi, 0)),
            ((None, lk), lambda bi, h, i: (bi, 0)),
        ],
        pl.BlockSpec((None, bq, None, None, d), q_tile),
        jax.ShapeDtypeStruct(q.shape, _F32, **vary),
        "ring_attention_bwd_dq",
    )

    def q_all(bi, kv, j):
        return (bi, 0, kv, 0, 0)

    def kv_tile(bi, kv, j):
        return (bi, j, kv, 0)

    def stat_all(bi, kv, j):
        return (bi, kv, 0, 0)

    out_specs = [pl.BlockSpec((None, bk, None, d), kv_tile)] * 2
    out_shape = [jax.ShapeDtypeStruct(k.shape, _F32, **vary)] * 2
    if bias is not None:
        out_specs.append(pl.BlockSpec((None, None, bk), lambda bi, kv, j: (bi, kv, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, kh, lk), _F32, **vary))
    dk, dv, *db = call(
        partial(_dkv_kernel, spec=spec, scale=float(scale), bq=bq, nq=nq, g=g, **flags),
        (b, kh, nk),
        [
            ((None, nq, None), lambda bi, kv, j: (bi, 0, j)),
            ((None, lq, None, g, d), q_all),
            ((None, bk, None, d), kv_tile),
            ((None, bk, None, d), kv_tile),
            ((None, lq, None, g, d), q_all),
            ((None, None, g, lq), stat_all),
            ((None, None, g, lq), stat_all),
            ((lq,), lambda bi, kv, j: (0,)),
            ((bk,), lambda bi, kv, j: (j,)),
            ((None, lq), lambda bi, kv, j: (bi, 0)),
            ((None, bk), lambda bi, kv, j: (bi, j)),
            ((None, bk), lambda bi, kv, j: (bi, j)),
        ],
        out_specs,
        out_shape,
        "ring_attention_bwd_dkv",
    )
    dbias = db[0].sum(1) if db else None
    return dq, dk, dv, dbias
