"""The fused path: a ring step as Pallas kernels (lowered to Triton on GPU), and its tile choice.

The XLA path (`_kernel_xla.py`) materializes each chunk pair's scores in HBM and pays a kernel launch
per chunk; these kernels keep one q tile in registers and stream the k/v tiles past it, so a ring
step costs one launch forward and two backward. They compute exactly what one ring step of the XLA
path contributes, so `PallasKernel` composes them over the ring (`_kernel.py`) unchanged:

    forward:   o, lse = merge(o, lse, *forward(q, kv block of step s, ...))   for every step s
    backward:  delta = rowsum(do * o) once; then per step dq += backward(...)[0], and the
               block's dk, dv, dbias (which travel with it) += backward(...)[1:]

Shapes (B batch, K kv heads, G q heads per kv head, D head dim, H = K * G):

    q, do        [B, Lq, K, G, D]   q's dtype          o, dq   [B, Lq, K, G, D]  float32
    k, v         [B, Lk, K, D]      q's dtype          dk, dv  [B, Lk, K, D]     float32
    lse, delta   [B, K, G, Lq]      float32            q_pos [Lq], k_pos [Lk]    int32
    rows         [B, K, G, Lq]      uint32, each query row's dropout hash (only with dropout)
    q_seg [B, Lq], k_seg [B, Lk] int32;  bias, dbias [B, Lk] float32

Which tile pairs to skip, and which need no mask, is decided before the kernels run: `classify`
reduces over the batch axis with `jnp.all`, which Triton cannot lower (no `reduce_and`), and one
table of kinds per (batch, q tile, k tile) then serves every head and all three kernels. Inside
the kernels `visible` builds the element mask of the mixed tiles, so the masks are the ones the
XLA path and the dense reference use.
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int, UInt32

from ._buffers import zeros_after
from ._kernel import Gradients, Kernel, KeyValueBlock, Queries, Upstream
from ._masks import MaskSpec, classify, dropout_keep, skip_or_compute, visible

_F32 = jnp.float32
_LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is one GPU instruction
_LN2 = 0.6931471805599453
_A_BT = (((1,), (1,)), ((), ()))  # dot_general dimensions of a @ b.T
_AT_B = (((0,), (0,)), ((), ()))  # a.T @ b


def _matmul(a, b, dims=(((1,), (0,)), ((), ()))):
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _is_triton_tile(n: int) -> bool:
    """Triton's rule for a `tl.dot` tile side (and the head dim): a power of two, 16 or more."""
    return n >= 16 and n & (n - 1) == 0


def interpreted() -> bool:
    """Whether the kernels run in Pallas's interpreter: everywhere but on a GPU (slow; for tests)."""
    return jax.default_backend() != "gpu"


def _check_step_args(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, block_q: int, block_k: int, interpret: bool):
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
    for name, tile, n in (("block_q", block_q, lq), ("block_k", block_k, lk)):
        if not isinstance(tile, int) or tile < 1:
            raise ValueError(f"{name} must be a positive int, got {tile!r}")
        tile = min(tile, n)
        if n % tile:
            raise ValueError(f"{name}={tile} must divide the sequence length {n}")
        if not interpret and not _is_triton_tile(tile):
            raise ValueError(f"{name}={tile} must be a power of two >= 16 for Triton (tl.dot tiles)")
        sizes.append(tile)
    if not interpret and not _is_triton_tile(d):
        raise ValueError(f"head dim {d} must be a power of two >= 16 for Triton (tl.dot tiles)")
    return tuple(sizes)


def _tile_kinds(spec: MaskSpec, q_pos, k_pos, q_seg, k_seg, batch: int, block_q: int, block_k: int):
    """[B, Lq/block_q, Lk/block_k] int32 tile kinds (SKIP/FULL/MASKED); None when nothing is ever masked."""
    if not spec.positional and q_seg is None:
        return None
    q_tiles, k_tiles = q_pos.reshape(-1, block_q), k_pos.reshape(-1, block_k)
    if q_seg is None:

        def by_position(q_tile, k_tile):
            return classify(spec, q_tile, k_tile, None, None)

        table = jax.vmap(jax.vmap(by_position, (None, 0)), (0, None))(q_tiles, k_tiles)
        return jnp.broadcast_to(table, (batch, *table.shape))

    def one_example(q_tile, k_tile, q_seg_tile, k_seg_tile):  # classify's batch axis has size 1
        return classify(spec, q_tile, k_tile, q_seg_tile[None], k_seg_tile[None])

    per_tile_pair = jax.vmap(jax.vmap(one_example, (None, 0, None, 0)), (0, None, 0, None))
    per_example = jax.vmap(per_tile_pair, (None, None, 0, 0))
    return per_example(q_tiles, k_tiles, q_seg.reshape(batch, -1, block_q), k_seg.reshape(batch, -1, block_k))


def _varying_like(*xs) -> dict:
    """ShapeDtypeStruct keywords that make outputs vary over every manual mesh axis an input does.

    Under `shard_map` (with its default check_vma) pallas_call cannot infer how its outputs vary
    and refuses out shapes that do not say; a scalar probe summing one element of each input
    carries the union of their varying axes (and is dead code that XLA drops).
    """
    probe = sum(x[(0,) * x.ndim].astype(_F32) for x in xs if x is not None)
    like = jax.ShapeDtypeStruct.like(probe)
    if hasattr(like, "manual_axis_type"):  # jax >= 0.10
        axis_type = like.manual_axis_type
        return {"manual_axis_type": jax.sharding.ManualAxisType() if axis_type is None else axis_type}
    vma = getattr(jax.typeof(probe), "vma", None)  # earlier jax
    return {} if vma is None else {"vma": vma}


def _compiler_params(head_dim: int, num_stages: int):
    """Triton's launch settings, tuned on an H100: 4 warps up to a head dim of 64, 8 above."""
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=num_stages)


def _scores_base2(q, k, bias_base2, q_pos, k_pos, q_seg, k_seg, masked, spec, scale):
    """Scores times log2(e), with the bias (passed in pre-scaled) and, for mixed tiles, the mask; and with a
    softcap the derivative of the cap, 1 - tanh², else None."""
    capped, softcap = None, spec.logit_softcap
    if softcap is None:
        s = _matmul(q, k, _A_BT) * (scale * _LOG2E)
    else:
        t = jnp.tanh(_matmul(q, k, _A_BT) * (scale / softcap))
        s, capped = t * (softcap * _LOG2E), 1.0 - t * t
    if bias_base2 is not None:
        s = s + bias_base2[None, :]
    if masked:
        s = jnp.where(visible(spec, q_pos, k_pos, q_seg, k_seg), s, -jnp.inf)
    return s, capped


# ---------------------------------------------------------------------------------------------- forward


def _dropped(x, rows, k_pos, spec: MaskSpec):
    """`x` ([q tile, k tile]) with dropout's dropped entries zeroed and the kept ones scaled; `x` without dropout."""
    if rows is None:
        return x
    rate = spec.dropout_rate
    return jnp.where(dropout_keep(rate, rows, k_pos), x * (1.0 / (1.0 - rate)), 0.0)


def _forward_kernel(*refs, spec, scale, block_k, num_k_tiles, has_kinds, has_seg, has_bias, has_dropout):
    refs = iter(refs)  # the inputs present, in pallas_call order, then the outputs
    kinds_ref = next(refs) if has_kinds else None
    q_ref, k_ref, v_ref, q_pos_ref, k_pos_ref = (next(refs) for _ in range(5))
    q_seg_ref, k_seg_ref = (next(refs), next(refs)) if has_seg else (None, None)
    bias_ref = next(refs) if has_bias else None
    rows = next(refs)[...] if has_dropout else None
    o_ref, lse_ref = refs

    q = q_ref[...]
    block_q, d = q.shape

    def key_step(j, carry):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)

        def compute(masked):
            acc, m, l = carry
            k, v = k_ref[tile, :], v_ref[tile, :]
            q_pos, k_pos = (q_pos_ref[...], k_pos_ref[tile]) if masked else (None, None)
            q_seg, k_seg = (q_seg_ref[...], k_seg_ref[tile]) if has_seg and masked else (None, None)
            bias = bias_ref[tile] if has_bias else None
            s, _ = _scores_base2(q, k, bias, q_pos, k_pos, q_seg, k_seg, masked, spec, scale)
            m_new = jnp.maximum(m, s.max(-1))
            # A row that has seen nothing keeps m = -inf; shifting by 0 there keeps exp2() at 0, not NaN.
            m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp2(s - m_shift[:, None])
            rescale = jnp.exp2(m - m_shift)
            l = rescale * l + p.sum(-1)  # the denominator counts every probability, dropped or not
            p = _dropped(p, rows, k_pos_ref[tile], spec)
            acc = acc * rescale[:, None] + _matmul(p.astype(v.dtype), v)
            return acc, m_new, l

        return skip_or_compute(kinds_ref[j] if has_kinds else None, carry, compute)

    init = (jnp.zeros((block_q, d), _F32), jnp.full((block_q,), -jnp.inf, _F32), jnp.zeros((block_q,), _F32))
    acc, m, l = lax.fori_loop(0, num_k_tiles, key_step, init)
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
    rows: UInt32[Array, "b kh g lq"] | None = None,
    *,
    spec: MaskSpec,
    scale: float,
    block_q: int = 128,
    block_k: int = 64,
    interpret: bool = False,
) -> tuple[Float[Array, "b lq kh g d"], Float[Array, "b kh g lq"]]:
    """Normalized attention of q against this k/v block alone, with its log-sum-exp (before dropout, which
    `rows` asks for with `spec.dropout_rate`).

    Normalized (not the raw accumulator) so that blocks combine with `merge` in any order; a row
    that sees no key here gets o = 0 and lse = -inf, which `merge` treats as "no contribution".
    Tiles: grid (B, H, Lq / block_q); each program streams the kv head's Lk / block_k tiles.
    Triton settings for an H100: 4 warps up to D=64 and 8 above, 3 pipeline stages for 16-bit
    inputs (2 for float32, whose tiles take twice the shared memory).
    """
    block_q, block_k = _check_step_args(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, block_q, block_k, interpret)
    b, lq, kh, g, d = q.shape
    lk = k.shape[1]
    num_q_tiles, num_k_tiles = lq // block_q, lk // block_k
    q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
    q_seg, k_seg = (None, None) if q_seg is None else (q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    kinds = _tile_kinds(spec, q_pos, k_pos, q_seg, k_seg, b, block_q, block_k)

    def head(h):  # grid index over the H = K * G q heads -> (kv head, q head within its group)
        return lax.div(h, g), lax.rem(h, g)

    args, specs = [], []

    def add(x, block, index):
        args.append(x)
        specs.append(pl.BlockSpec(block, index))

    # Index maps take the grid position (batch, q head, q tile).
    if kinds is not None:
        add(kinds, (None, None, num_k_tiles), lambda bi, h, i: (bi, i, 0))
    add(q, (None, block_q, None, None, d), lambda bi, h, i: (bi, i, *head(h), 0))
    add(k, (None, lk, None, d), lambda bi, h, i: (bi, 0, head(h)[0], 0))
    add(v, (None, lk, None, d), lambda bi, h, i: (bi, 0, head(h)[0], 0))
    add(q_pos, (block_q,), lambda bi, h, i: (i,))
    add(k_pos, (lk,), lambda bi, h, i: (0,))
    if q_seg is not None:
        add(q_seg, (None, block_q), lambda bi, h, i: (bi, i))
        add(k_seg, (None, lk), lambda bi, h, i: (bi, 0))
    if bias is not None:
        add(bias.astype(_F32) * _LOG2E, (None, lk), lambda bi, h, i: (bi, 0))
    if rows is not None:
        add(rows, (None, None, None, block_q), lambda bi, h, i: (bi, *head(h), i))

    kernel = partial(
        _forward_kernel, spec=spec, scale=float(scale), block_k=block_k, num_k_tiles=num_k_tiles,
        has_kinds=kinds is not None, has_seg=q_seg is not None, has_bias=bias is not None,
        has_dropout=rows is not None,
    )
    vary = _varying_like(*args)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kh * g, num_q_tiles),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, block_q, None, None, d), lambda bi, h, i: (bi, i, *head(h), 0)),
            pl.BlockSpec((None, None, None, block_q), lambda bi, h, i: (bi, *head(h), i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, _F32, **vary), jax.ShapeDtypeStruct((b, kh, g, lq), _F32, **vary)],
        compiler_params=_compiler_params(d, num_stages=3 if q.dtype.itemsize <= 2 else 2),
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


def _probabilities(q, k, bias_base2, q_pos, k_pos, q_seg, k_seg, lse_base2, masked, spec, scale):
    """This tile's softmax probabilities, recomputed from the final lse (in base 2, like the scores), and the
    softcap's derivative (None without one)."""
    s, capped = _scores_base2(q, k, bias_base2, q_pos, k_pos, q_seg, k_seg, masked, spec, scale)
    return jnp.exp2(s - lse_base2[:, None]), capped


def _backward_refs(refs, has_kinds, has_seg, has_bias, has_dropout):
    """The backward kernels' input refs by name (absent inputs as None), then an iterator over the outputs."""
    refs = iter(refs)
    kinds_ref = next(refs) if has_kinds else None
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref = (next(refs) for _ in range(8))
    q_seg_ref, k_seg_ref = (next(refs), next(refs)) if has_seg else (None, None)
    bias_ref = next(refs) if has_bias else None
    rows_ref = next(refs) if has_dropout else None
    inputs = (kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref,
              bias_ref, rows_ref)
    return inputs, refs


def _dq_kernel(*refs, spec, scale, block_k, num_k_tiles, has_kinds, has_seg, has_bias, has_dropout):
    inputs, outputs = _backward_refs(refs, has_kinds, has_seg, has_bias, has_dropout)
    (kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, bias_ref,
     rows_ref) = inputs
    (dq_ref,) = outputs

    q, do, lse_base2, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = rows_ref[...] if has_dropout else None

    def key_step(j, dq):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)

        def compute(masked):
            k, v = k_ref[tile, :], v_ref[tile, :]
            q_seg, k_seg = (q_seg_ref[...], k_seg_ref[tile]) if has_seg and masked else (None, None)
            k_pos = k_pos_ref[tile] if masked else None
            bias = bias_ref[tile] if has_bias else None
            q_pos = q_pos_ref[...] if masked else None
            p, capped = _probabilities(q, k, bias, q_pos, k_pos, q_seg, k_seg, lse_base2, masked, spec, scale)
            ds = p * (_dropped(_matmul(do, v, _A_BT), rows, k_pos_ref[tile], spec) - delta[:, None])
            ds = ds if capped is None else ds * capped
            return dq + _matmul(ds.astype(k.dtype), k)

        return skip_or_compute(kinds_ref[j] if has_kinds else None, dq, compute)

    dq = lax.fori_loop(0, num_k_tiles, key_step, jnp.zeros(q.shape, _F32))
    dq_ref[...] = dq * scale


def _dk_dv_kernel(*refs, spec, scale, block_q, num_q_tiles, g, has_kinds, has_seg, has_bias, has_dropout):
    inputs, outputs = _backward_refs(refs, has_kinds, has_seg, has_bias, has_dropout)
    (kinds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref, bias_ref,
     rows_ref) = inputs
    dk_ref, dv_ref, *dbias_ref = outputs

    k, v = k_ref[...], v_ref[...]
    bias = bias_ref[...] if has_bias else None
    block_k, d = k.shape

    def query_step(i, carry):
        tile = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)

        def compute(masked):
            q_pos, k_pos = (q_pos_ref[tile], k_pos_ref[...]) if masked else (None, None)
            q_seg, k_seg = (q_seg_ref[tile], k_seg_ref[...]) if has_seg and masked else (None, None)

            def head(gi, carry):  # the G q heads that read this kv head
                dk, dv, dbias = carry
                q, do = q_ref[tile, gi, :], do_ref[tile, gi, :]
                p, capped = _probabilities(q, k, bias, q_pos, k_pos, q_seg, k_seg, lse_ref[gi, tile], masked, spec,
                                           scale)
                rows = rows_ref[gi, tile] if has_dropout else None
                dv = dv + _matmul(_dropped(p, rows, k_pos_ref[...], spec).astype(do.dtype), do, _AT_B)
                ds = p * (_dropped(_matmul(do, v, _A_BT), rows, k_pos_ref[...], spec) - delta_ref[gi, tile][:, None])
                dk = dk + _matmul((ds if capped is None else ds * capped).astype(q.dtype), q, _AT_B)
                return dk, dv, (dbias + ds.sum(0)) if has_bias else dbias  # the bias is added after the cap

            return lax.fori_loop(0, g, head, carry)

        return skip_or_compute(kinds_ref[i] if has_kinds else None, carry, compute)

    init = (jnp.zeros((block_k, d), _F32), jnp.zeros((block_k, d), _F32), jnp.zeros((block_k,), _F32))
    dk, dv, dbias = lax.fori_loop(0, num_q_tiles, query_step, init)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv
    if has_bias:
        dbias_ref[0][...] = dbias


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
    rows: UInt32[Array, "b kh g lq"] | None = None,
    *,
    spec: MaskSpec,
    scale: float,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
) -> tuple[
    Float[Array, "b lq kh g d"], Float[Array, "b lk kh d"], Float[Array, "b lk kh d"], Float[Array, "b lk"] | None
]:
    """This k/v block's share of (dq, dk, dv, dbias), given the lse and delta of the whole ring.

    With the final lse, each block's probabilities are already the global ones, so the shares
    just add up. Two kernels instead of one fused pass so that nothing is written by two programs
    (no atomics, deterministic): dq gridded over (B, H, q tiles), dk/dv over (B, K, k tiles), each
    looping over the G q heads of its kv head. dbias is summed over the K kv heads outside.
    Rows with lse = -inf see no key anywhere and get zero gradients. Triton settings: as `forward`'s,
    with 2 pipeline stages.
    """
    block_q, block_k = _check_step_args(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, block_q, block_k, interpret)
    b, lq, kh, g, d = q.shape
    lk = k.shape[1]
    num_q_tiles, num_k_tiles = lq // block_q, lk // block_k
    q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
    q_seg, k_seg = (None, None) if q_seg is None else (q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    bias = None if bias is None else bias.astype(_F32) * _LOG2E
    do, delta = do.astype(q.dtype), delta.astype(_F32)
    # Rows with lse = -inf see no key: every score is -inf there, and shifting by 0 keeps p at 0.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse.astype(_F32) * _LOG2E)
    kinds = _tile_kinds(spec, q_pos, k_pos, q_seg, k_seg, b, block_q, block_k)
    flags = dict(has_kinds=kinds is not None, has_seg=q_seg is not None, has_bias=bias is not None,
                 has_dropout=rows is not None)
    vary = _varying_like(kinds, q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, bias, rows)
    params = _compiler_params(d, num_stages=2)

    def call(kernel, grid, blocks, out_specs, out_shape, name):
        """`blocks`: per input, (block shape, index map); None entries are absent inputs."""
        inputs = (kinds, q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, bias, rows)
        args = [x for x in inputs if x is not None]
        specs = [pl.BlockSpec(*blk) for x, blk in zip(inputs, blocks, strict=True) if x is not None]
        return pl.pallas_call(
            kernel, grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=params, interpret=interpret, name=name,
        )(*args)

    # The dq kernel's grid position is (batch, q head, q tile).
    def head(h):  # q head -> (kv head, q head within its group)
        return lax.div(h, g), lax.rem(h, g)

    def q_tile(bi, h, i):
        return (bi, i, *head(h), 0)

    def kv_all(bi, h, i):
        return (bi, 0, head(h)[0], 0)

    def stat_tile(bi, h, i):
        return (bi, *head(h), i)

    dq = call(
        partial(_dq_kernel, spec=spec, scale=float(scale), block_k=block_k, num_k_tiles=num_k_tiles, **flags),
        (b, kh * g, num_q_tiles),
        [
            ((None, None, num_k_tiles), lambda bi, h, i: (bi, i, 0)),
            ((None, block_q, None, None, d), q_tile),
            ((None, lk, None, d), kv_all),
            ((None, lk, None, d), kv_all),
            ((None, block_q, None, None, d), q_tile),
            ((None, None, None, block_q), stat_tile),
            ((None, None, None, block_q), stat_tile),
            ((block_q,), lambda bi, h, i: (i,)),
            ((lk,), lambda bi, h, i: (0,)),
            ((None, block_q), lambda bi, h, i: (bi, i)),
            ((None, lk), lambda bi, h, i: (bi, 0)),
            ((None, lk), lambda bi, h, i: (bi, 0)),
            ((None, None, None, block_q), stat_tile),
        ],
        pl.BlockSpec((None, block_q, None, None, d), q_tile),
        jax.ShapeDtypeStruct(q.shape, _F32, **vary),
        "ring_attention_bwd_dq",
    )

    # The dk/dv kernel's grid position is (batch, kv head, k tile).
    def q_all(bi, kv, j):
        return (bi, 0, kv, 0, 0)

    def kv_tile(bi, kv, j):
        return (bi, j, kv, 0)

    def stat_all(bi, kv, j):
        return (bi, kv, 0, 0)

    out_specs = [pl.BlockSpec((None, block_k, None, d), kv_tile)] * 2
    out_shape = [jax.ShapeDtypeStruct(k.shape, _F32, **vary)] * 2
    if bias is not None:
        out_specs.append(pl.BlockSpec((None, None, block_k), lambda bi, kv, j: (bi, kv, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, kh, lk), _F32, **vary))
    dk, dv, *dbias_per_head = call(
        partial(_dk_dv_kernel, spec=spec, scale=float(scale), block_q=block_q, num_q_tiles=num_q_tiles, g=g,
                **flags),
        (b, kh, num_k_tiles),
        [
            ((None, num_q_tiles, None), lambda bi, kv, j: (bi, 0, j)),
            ((None, lq, None, g, d), q_all),
            ((None, block_k, None, d), kv_tile),
            ((None, block_k, None, d), kv_tile),
            ((None, lq, None, g, d), q_all),
            ((None, None, g, lq), stat_all),
            ((None, None, g, lq), stat_all),
            ((lq,), lambda bi, kv, j: (0,)),
            ((block_k,), lambda bi, kv, j: (j,)),
            ((None, lq), lambda bi, kv, j: (bi, 0)),
            ((None, block_k), lambda bi, kv, j: (bi, j)),
            ((None, block_k), lambda bi, kv, j: (bi, j)),
            ((None, None, g, lq), stat_all),
        ],
        out_specs,
        out_shape,
        "ring_attention_bwd_dkv",
    )
    dbias = dbias_per_head[0].sum(1) if dbias_per_head else None
    return dq, dk, dv, dbias


# ------------------------------------------------------------------------------------- the path


# The preferred tiles (forward q, k; backward q, k), for an H100; a shorter sequence takes the
# largest power of two that divides it.
_PREFERRED_TILES = (128, 64, 64, 64)


def _tile(preferred: int, length: int, interpret: bool) -> int | None:
    """The largest Triton tile (a power of two >= 16) up to `preferred` dividing `length`, or None.

    Interpreted (off GPU) any tile works, so a short sequence is one tile.
    """
    tile = preferred
    while _is_triton_tile(tile):
        if length % tile == 0:
            return tile
        tile //= 2
    return min(preferred, length) if interpret and length % min(preferred, length) == 0 else None


def _maybe_add(total, share):
    return None if total is None else total + share


@dataclass(frozen=True)
class PallasKernel(Kernel):
    """Fused kernels with (q, k) tiles `forward_tiles` and `backward_tiles`, in Pallas's interpreter
    when `interpret`."""

    forward_tiles: tuple[int, int]
    backward_tiles: tuple[int, int]
    interpret: bool

    @classmethod
    def for_shapes(cls, q_len: int, kv_len: int, head_dim: int, *, where: str,
                   required: bool) -> "PallasKernel | None":
        """The tiles for these shapes; None if they do not suit Triton, or a ValueError if `required`.

        `q_len`/`kv_len` are the lengths one ring step sees (half a zigzag shard); `where` says so
        in the error, after the sequence's name.
        """
        interpret = interpreted()
        tiles = tuple(_tile(t, n, interpret) for t, n in zip(_PREFERRED_TILES, (q_len, kv_len) * 2, strict=True))
        if None not in tiles and (interpret or _is_triton_tile(head_dim)):
            return cls(tiles[:2], tiles[2:], interpret)
        if not required:
            return None
        raise ValueError(
            f'implementation="pallas" needs a head_dim that is a power of two >= 16 (got {head_dim}) and local '
            f"sequence lengths divisible by 16 or more (got q_seq{where}={q_len}, kv_seq{where}={kv_len}); "
            'use implementation="xla"'
        )

    def start_forward(self, q):
        b, lq, kh, g, d = q.shape
        return jnp.full_like(q, 0.0, _F32), jnp.full_like(q, -jnp.inf, _F32, shape=(b, kh, g, lq))

    def forward_step(self, masks, scale, queries: Queries, block: KeyValueBlock, key_positions, state):
        block_q, block_k = self.forward_tiles
        step = forward(queries.q, block.k, block.v, queries.positions, key_positions, queries.segment_ids,
                       block.segment_ids, block.bias, queries.dropout, spec=masks, scale=scale, block_q=block_q,
                       block_k=block_k, interpret=self.interpret)
        return merge(*state, *step)

    def finish_forward(self, state):
        return state  # merge keeps (o, lse) normalized after every block

    def start_backward(self, queries: Queries, upstream: Upstream, block: KeyValueBlock):
        dkv = tuple(None if x is None else jnp.full_like(x, 0.0, _F32) for x in (block.k, block.v, block.bias))
        return upstream, zeros_after(upstream.do, queries.q), dkv

    def backward_step(self, masks, scale, queries: Queries, upstream: Upstream, block: KeyValueBlock,
                      key_positions, dq, dkv):
        block_q, block_k = self.backward_tiles
        dq_share, *dkv_share = backward(queries.q, block.k, block.v, queries.positions, key_positions,
                                        queries.segment_ids, block.segment_ids, block.bias, *upstream,
                                        queries.dropout, spec=masks,
                                        scale=scale, block_q=block_q, block_k=block_k, interpret=self.interpret)
        return dq + dq_share, tuple(_maybe_add(total, share) for total, share in zip(dkv, dkv_share, strict=True))

    def finish_backward(self, scale, dq, dkv):
        return Gradients(dq, *dkv)  # the kernels apply `scale` themselves
