"""The Pallas ring-step kernels equal dense attention, per block and composed over a ring (Triton on GPU).

The setting is the one the ring creates: device 1 of 4 in the zigzag layout holds the queries at
true positions 16..31 and 96..111 (chunks 1 and 6 of 8), and the four key/value blocks arrive in
ring order, each with its own non-contiguous positions. The reference below is written from
scratch (explicit masks from positions in NumPy, a plain softmax), not with the library's mask
functions that the kernels share.
"""

import re
from functools import partial
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_ring import _kernel_pallas as _pallas
from eqx_ring._layout import shard_positions
from eqx_ring._masks import MaskSpec

T, N, LAYOUT, SHARD = 128, 4, "zigzag", 1  # 32 local tokens per device
L = T // N
BLOCK = 16  # 2 x 2 tiles per block pair: the kernels' loops and tile skipping both run
B, D = 2, 16
EMPTY_ROW = 5  # a local query given a segment id no key has: it sees nothing at all

CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "causal_block4": dict(causal=True, causal_block_size=4),
    "window": dict(sliding_window=24),
    "segments": dict(segments=True),
    "bias": dict(bias=True),
    "all": dict(causal=True, sliding_window=40, segments=True, bias=True),
}


def positions(shard):
    return np.asarray(shard_positions(shard, L, LAYOUT, N, xp=np), np.int32)


def make_inputs(case, k_heads, groups, dtype, seed=0, d=D):
    kw = CASES[case]
    rng = np.random.default_rng(seed)

    def normal(*shape):  # rounded to `dtype` once: kernel and reference see the same values
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    x = dict(
        q=normal(B, L, k_heads, groups, d),
        k=normal(B, T, k_heads, d),  # keys and values in natural order; blocks gather from them
        v=normal(B, T, k_heads, d),
        do=normal(B, L, k_heads, groups, d),
        seg=None,
        q_seg=None,
        bias=None,
    )
    if kw.get("segments"):
        bounds = ([0, 20, 50, 90, 101], [0, 13, 64, 100, 118])  # packed documents, one layout per row
        seg = np.stack([np.searchsorted(b, np.arange(T), side="right") for b in bounds]).astype(np.int32)
        q_seg = seg[:, positions(SHARD)].copy()
        q_seg[0, EMPTY_ROW] = 99
        x.update(seg=seg, q_seg=q_seg)
    if kw.get("bias"):
        bias = rng.standard_normal((B, T)).astype(np.float32)
        bias[:, [7, 100]] = -np.inf  # padding keys
        x["bias"] = jnp.asarray(bias)
    spec = MaskSpec(bool(kw.get("causal")), kw.get("causal_block_size", 1), kw.get("sliding_window"))
    return spec, x


def visible_np(spec, q_pos, k_pos, q_seg, k_seg):
    """[B, Lq, Lk] bool, straight from the definitions of the masks."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    ok = np.ones((B, len(q_pos), len(k_pos)), bool)
    if spec.causal:
        frame = spec.causal_block_size
        ok &= kp // frame <= qp // frame
    if spec.sliding_window is not None:
        ok &= (kp > qp - spec.sliding_window) & (kp <= qp)
    if q_seg is not None:
        ok &= q_seg[:, :, None] == k_seg[:, None, :]
    return ok


@partial(jax.jit, static_argnames="scale")
def dense(q, k, v, bias, mask, scale):
    """(o [B, Lq, K, G, D], lse [B, K, G, Lq]) in float32; rows that see nothing: o = 0, lse = -inf."""
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    s = jnp.einsum("bqkgd,bpkd->bkgqp", q.astype(f32), k.astype(f32), precision=hi) * scale
    if bias is not None:
        s = s + bias[:, None, None, None, :]
    s = jnp.where(jnp.asarray(mask)[:, None, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    e = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
    den = e.sum(-1, keepdims=True)
    seen = den > 0
    den = jnp.where(seen, den, 1.0)
    o = jnp.einsum("bkgqp,bpkd->bqkgd", e / den, v.astype(f32), precision=hi)
    lse = jnp.where(seen, m + jnp.log(den), -jnp.inf)[..., 0]
    return o, lse


@partial(jax.jit, static_argnames="scale")
def dense_grads(q, k, v, do, bias, mask, scale):
    """Gradients of sum(o * do) with respect to q, k, v (and bias when there is one)."""

    def loss(q, k, v, bias):
        return jnp.sum(dense(q, k, v, bias, mask, scale)[0] * do)

    return jax.grad(loss, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2))(q, k, v, bias)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# On a GPU the kernels run compiled by Triton; elsewhere in Pallas's interpreter.
INTERPRET = jax.default_backend() != "gpu"


# The kernels' matmuls take the default precision, which on a GPU may be TF32 for float32 inputs;
# the float32 tolerances below are for true float32 products, so ask for them (no-op on CPU).
@partial(jax.jit, static_argnames=("spec", "scale"))
def ring_step_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, *, spec, scale):
    with jax.default_matmul_precision("highest"):
        return _pallas.forward(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, spec=spec, scale=scale,
                               block_q=BLOCK, block_k=BLOCK, interpret=INTERPRET)


@partial(jax.jit, static_argnames=("spec", "scale"))
def ring_step_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, do, lse, delta, *, spec, scale):
    with jax.default_matmul_precision("highest"):
        return _pallas.backward(q, k, v, q_pos, k_pos, q_seg, k_seg, bias, do, lse, delta, spec=spec,
                                scale=scale, block_q=BLOCK, block_k=BLOCK, interpret=INTERPRET)


def block(x, name, kv_pos):
    """The key-side data of the ring block at true positions `kv_pos` (None stays None)."""
    val = x[name]
    return None if val is None else jnp.asarray(val)[:, kv_pos]


def opt(x):
    return None if x is None else jnp.asarray(x)


def run_ring(case, k_heads, groups, dtype, *, fwd_tol, grad_tol, d=D):
    """Forward per block and merged over the ring, then backward composed over the ring, vs dense."""
    spec, x = make_inputs(case, k_heads, groups, dtype, d=d)
    scale = d**-0.5
    q_pos = positions(SHARD)
    q, q_seg = x["q"], opt(x["q_seg"])
    kv_shards = [(SHARD - s) % N for s in range(N)]  # the order blocks arrive in on the ring

    # Forward: each block alone, then the running merge.
    o = lse = None
    empty_in_block = 0
    for r in kv_shards:
        kp = positions(r)
        args = (q, block(x, "k", kp), block(x, "v", kp), jnp.asarray(q_pos), jnp.asarray(kp), q_seg,
                block(x, "seg", kp), block(x, "bias", kp))
        o_r, lse_r = ring_step_fwd(*args, spec=spec, scale=scale)
        mask = visible_np(spec, q_pos, kp, x["q_seg"], None if x["seg"] is None else x["seg"][:, kp])
        want_o, want_lse = dense(args[0], args[1], args[2], args[7], mask, scale)
        assert o_r.dtype == lse_r.dtype == jnp.float32
        assert np.abs(np.asarray(o_r - want_o)).max() <= fwd_tol * np.abs(np.asarray(args[2], np.float32)).max()
        sees = (mask & np.isfinite(np.asarray(args[7]))[:, None] if x["bias"] is not None else mask).any(-1)
        np.testing.assert_array_equal(np.isneginf(lse_r), np.broadcast_to(~sees[:, None, None], lse_r.shape))
        np.testing.assert_allclose(lse_r, want_lse, rtol=1e-5, atol=1e-5)  # -inf where want_lse is
        assert not np.asarray(o_r)[~sees].any()  # rows that see nothing here: 0
        empty_in_block += int((~sees).any() and sees.any())
        o, lse = (o_r, lse_r) if o is None else _pallas.merge(o, lse, o_r, lse_r)

    mask = visible_np(spec, q_pos, np.arange(T), x["q_seg"], x["seg"])
    want_o, want_lse = dense(q, x["k"], x["v"], x["bias"], mask, scale)
    assert np.abs(np.asarray(o - want_o)).max() <= fwd_tol * np.abs(np.asarray(x["v"], np.float32)).max()
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    if spec.positional or q_seg is not None:
        assert empty_in_block, "some block should leave some rows with nothing to see"
    if q_seg is not None:
        assert not mask[0, EMPTY_ROW].any() and np.isneginf(lse[0, :, :, EMPTY_ROW]).all()
        assert not np.asarray(o)[0, EMPTY_ROW].any()

    # Backward: delta once from the merged output, then each block's share.
    do = x["do"]
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(jnp.float32), o, precision=jax.lax.Precision.HIGHEST)
    dq = 0.0
    grads_kv = {}
    for r in kv_shards:
        kp = positions(r)
        got = ring_step_bwd(q, block(x, "k", kp), block(x, "v", kp), jnp.asarray(q_pos), jnp.asarray(kp), q_seg,
                            block(x, "seg", kp), block(x, "bias", kp), do, lse, delta, spec=spec, scale=scale)
        for name, g in zip(("dq", "dk", "dv", "dbias"), got, strict=True):
            assert (g is None) == (name == "dbias" and x["bias"] is None), name
            if g is not None:
                assert g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all(), name
        dq = dq + got[0]
        grads_kv[r] = got[1:]

    f32 = [a.astype(jnp.float32) for a in (q, x["k"], x["v"], do)]
    want = dense_grads(*f32, x["bias"], mask, scale)
    assert rel_err(dq, want[0]) <= grad_tol, "dq"
    if q_seg is not None:
        assert not np.asarray(dq)[0, EMPTY_ROW].any()
    for r, (dk, dv, db) in grads_kv.items():
        kp = positions(r)
        assert rel_err(dk, want[1][:, kp]) <= grad_tol, ("dk", r)
        assert rel_err(dv, want[2][:, kp]) <= grad_tol, ("dv", r)
        if db is not None:
            np.testing.assert_allclose(db, want[3][:, kp], atol=grad_tol * np.abs(np.asarray(want[3])).max())


# float32: the kernels and the reference differ only in summation order.
@pytest.mark.parametrize("case", list(CASES))
def test_ring_step_gqa_f32(case):
    run_ring(case, 2, 2, jnp.float32, fwd_tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("case", ["causal", "all"])
def test_ring_step_mha_f32(case):
    run_ring(case, 4, 1, jnp.float32, fwd_tol=1e-5, grad_tol=1e-5)


# bfloat16 inputs (the reference sees the same rounded inputs, in float32). Scores are exact up to
# float32 summation (bf16 products are exact in f32); what the kernels round is p (for p @ v and
# dv) and ds (for dq, dk) to bf16, relative error <= 2**-9 per term. o = sum p v / l then errs by at
# most 2**-9 max|v|: fwd_tol = 2**-8 (relative to max|v|) leaves a factor of 2. A gradient sum errs
# by at most 2**-9 sum|terms|; 2e-2 of its largest entry allows a cancellation factor of 10.
@pytest.mark.parametrize(("case", "heads"), [("causal", (2, 2)), ("all", (4, 1))])
def test_ring_step_bf16(case, heads):
    run_ring(case, *heads, jnp.bfloat16, fwd_tol=2**-8, grad_tol=2e-2)


# The GPU matrix: every mask x dtype x head_dim with GQA (and MHA for two masks), Triton-compiled at
# tiles of 16 (each block pair is 2 x 2 tiles). float16 rounds p and ds to within 2**-11 (bf16: 2**-9),
# so its tolerances are the bf16 ones scaled by 2**-2. Interpreted on CPU only one cell runs (float16,
# D = 64; no other test covers float16 there): the interpreter would take minutes for the whole grid.
TOLERANCES = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2**-8, 2e-2), jnp.float16: (2**-10, 5e-3)}
MATRIX = [(case, dtype, d, heads) for dtype in TOLERANCES for d in (64, 128)
          for case, heads in [(c, (2, 2)) for c in CASES] + [("causal", (4, 1)), ("all", (4, 1))]]
ON_CPU = ("causal", jnp.float16, 64, (2, 2))


@pytest.mark.parametrize(("case", "dtype", "d", "heads"), [ON_CPU] if INTERPRET else MATRIX)
def test_ring_step_matrix(case, dtype, d, heads):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    run_ring(case, *heads, dtype, fwd_tol=fwd_tol, grad_tol=grad_tol, d=d)


def test_merge_empty_and_one_sided():
    rng = np.random.default_rng(1)
    o_a = jnp.asarray(rng.standard_normal((1, 3, 1, 1, 16)), jnp.float32)
    o_b = jnp.asarray(rng.standard_normal((1, 3, 1, 1, 16)), jnp.float32)
    zero = jnp.zeros_like(o_a)
    lse_a = jnp.asarray([[[[0.5, -jnp.inf, -jnp.inf]]]], jnp.float32)
    lse_b = jnp.asarray([[[[-jnp.inf, 2.0, -jnp.inf]]]], jnp.float32)
    o, lse = _pallas.merge(o_a.at[:, 1:].set(0.0), lse_a, o_b.at[:, ::2].set(0.0), lse_b)
    np.testing.assert_array_equal(lse, [[[[0.5, 2.0, -np.inf]]]])
    np.testing.assert_array_equal(o[:, 0], o_a[:, 0])
    np.testing.assert_array_equal(o[:, 1], o_b[:, 1])
    np.testing.assert_array_equal(o[:, 2], zero[:, 2])
    # Two equal halves: lse grows by log 2 and o is their mean.
    o, lse = _pallas.merge(o_a, lse_a[..., :1].repeat(3, -1), o_b, lse_a[..., :1].repeat(3, -1))
    np.testing.assert_allclose(lse, 0.5 + np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(o, (o_a + o_b) / 2, rtol=1e-6, atol=1e-7)


def test_refuses_bad_shapes():
    spec = MaskSpec(False, 1, None)
    q = jnp.zeros((1, 32, 1, 1, 16), jnp.float32)
    k = jnp.zeros((1, 32, 1, 16), jnp.float32)
    pos = jnp.arange(32, dtype=jnp.int32)
    call = partial(_pallas.forward, q, k, k, pos, pos, None, None, None, spec=spec, scale=1.0)
    with pytest.raises(ValueError, match="block_q=24 must divide"):
        call(block_q=24, block_k=16, interpret=True)
    with pytest.raises(ValueError, match="power of two"):  # Triton's tl.dot needs tiles >= 16
        call(block_q=8, block_k=16, interpret=False)
    with pytest.raises(ValueError, match="head dim 8"):
        _pallas.forward(q[..., :8], k[..., :8], k[..., :8], pos, pos, None, None, None, spec=spec, scale=1.0)
    with pytest.raises(ValueError, match="together"):
        _pallas.forward(q, k, k, pos, pos, jnp.zeros((1, 32), jnp.int32), None, None, spec=spec, scale=1.0)


def _triton_lowering_available():
    # jaxlib <= 0.10.2 puts the Triton IR into the HLO uncompiled, so any machine can check that
    # the kernels lower; later versions may compile it while lowering, which needs a GPU.
    release = re.match(r"(\d+)\.(\d+)\.(\d+)", metadata.version("jaxlib"))
    return jax.default_backend() == "gpu" or tuple(map(int, release.groups())) <= (0, 10, 2)


@pytest.mark.skipif(not _triton_lowering_available(), reason="lowering Pallas to Triton needs a GPU here")
@pytest.mark.parametrize(("dtype", "d", "masked"), [(jnp.bfloat16, 64, True), (jnp.float32, 128, False)])
def test_lowers_to_triton(dtype, d, masked):
    """At their GPU defaults, inside shard_map as in the ring, the kernels pass the Triton lowering.

    That checks what interpret mode cannot: power-of-two tiles, ops Triton supports, and outputs
    declared varying over the mesh axis (shard_map's check_vma). On a GPU it compiles them too.
    """
    S = jax.ShapeDtypeStruct
    b, lq, kh, g = 2, 256, 2, 2
    spec = MaskSpec(masked, 1, 128 if masked else None)
    mesh = jax.make_mesh((1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])

    def step(q, kv, seg, bias, stat):
        pos = shard_positions(jax.lax.axis_index("sp"), lq, LAYOUT, 1)  # varies over the mesh axis
        seg, bias = (seg, bias) if masked else (None, None)
        o, lse = _pallas.forward(q, kv, kv, pos, pos, seg, seg, bias, spec=spec, scale=0.125)
        grads = _pallas.backward(q, kv, kv, pos, pos, seg, seg, bias, q, stat, stat, spec=spec, scale=0.125)
        return o, lse, grads

    args = (S((b, lq, kh, g, d), dtype), S((b, lq, kh, d), dtype), S((b, lq), jnp.int32), S((b, lq), jnp.float32),
            S((b, kh, g, lq), jnp.float32))
    batch = jax.sharding.PartitionSpec("sp")  # every argument and result is batch-major
    sharded = jax.shard_map(step, mesh=mesh, in_specs=batch, out_specs=batch)
    text = jax.jit(sharded).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3  # forward, dq and dk/dv kernels
