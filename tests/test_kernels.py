"""blockwise_attention and ring_attention equal dense attention, in value and gradient."""

from functools import partial

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, T, make_inputs, rel_err, ring_fn, spread, value_and_grads

import eqx_ring

LAYOUTS = ["contiguous", "zigzag", "striped"]
# The fused Pallas path (issue 10), in Pallas's interpreter on CPU (see below).
PALLAS_CPU = jax.default_backend() != "gpu"
DATA_ARGS = ("segment_ids", "kv_segment_ids", "key_bias")


def split(kw):
    """(static mask arguments, per-token data arguments)."""
    return ({a: b for a, b in kw.items() if a not in DATA_ARGS}, {a: b for a, b in kw.items() if a in DATA_ARGS})


def check(f, case_or_kw, *, dtype=jnp.float32, out_tol=1e-5, grad_tol=1e-4, **input_kw):
    qkv, ct, kw = make_inputs(case_or_kw, dtype=dtype, **input_kw)
    static, data = split(kw)
    out, grads = value_and_grads(f(**static), qkv, ct, data)
    # The reference sees the same (possibly bf16-rounded) inputs, upcast to float32.
    ref_qkv = tuple(x.astype(jnp.float32) for x in qkv)
    ref, ref_grads = value_and_grads(partial(eqx_ring.dot_product_attention, **static), ref_qkv, ct, data)
    assert out.dtype == dtype and out.shape == qkv[0].shape
    assert rel_err(out, ref) <= out_tol
    for name, g, r, x in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, (*qkv, data.get("key_bias")),
                             strict=False):
        assert g.dtype == x.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_err(g, r) <= grad_tol, name


@pytest.mark.parametrize(("chunks", "case"), spread(CASES, [(16, 32), (32, 8), (512, 512)]))
def test_blockwise_f32(chunks, case):
    check(lambda **s: partial(eqx_ring.blockwise_attention, query_chunk_size=chunks[0],
                              key_chunk_size=chunks[1], **s), case)


# Every (ring size, layout) place runs some cases and every case runs on three places that differ in both
# (helpers.spread); causal starts on the 8-device zigzag ring, the long-context setting.
RING_PLACES = [(8, "zigzag"), (4, "contiguous"), (2, "striped"), (1, "zigzag"), (8, "contiguous"), (4, "striped"),
               (2, "zigzag"), (1, "contiguous"), (8, "striped"), (4, "zigzag"), (2, "contiguous"), (1, "striped")]
RING_ORDER = ["causal", "segments", "gqa", "block64", "none", "window", "key_bias"]


@pytest.mark.parametrize(("place", "case"), spread(RING_ORDER, RING_PLACES, 3))
def test_ring_f32(place, case):
    n, layout = place
    check(lambda **s: ring_fn(n, layout, query_chunk_size=8, key_chunk_size=4, **s), case)


# kv_pieces: each block travels in pieces, one ring per piece (T=256: 32 tokens per device on 8, 64 on 4).
@pytest.mark.parametrize(("place", "case"), spread(CASES, [(8, "zigzag", 2), (4, "zigzag", 4), (4, "contiguous", 8),
                                                      (2, "striped", 4), (1, "contiguous", 2)]))
def test_ring_in_kv_pieces_f32(place, case):
    n, layout, pieces = place
    check(lambda **s: ring_fn(n, layout, query_chunk_size=8, key_chunk_size=4, kv_pieces=pieces, **s), case)


def test_ring_in_kv_pieces_bf16_and_pallas():
    check(lambda **s: ring_fn(4, "zigzag", query_chunk_size=16, key_chunk_size=8, kv_pieces=4, **s), "segments",
          dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)
    check(lambda **s: ring_fn(4, "zigzag", check_vma=not PALLAS_CPU, implementation="pallas", kv_pieces=2, **s),
          "causal")


@pytest.mark.parametrize(("layout", "pieces", "message"), [
    ("contiguous", 3, "kv_pieces=3 must divide the local kv_seq = 64"),
    ("zigzag", 1.5, "kv_pieces must be a positive int, got 1.5"),
    ("zigzag", 0, "kv_pieces must be a positive int, got 0"),
])
def test_bad_kv_pieces_are_named(no_hook, layout, pieces, message):
    qkv, ct, kw = make_inputs("causal")
    static, data = split(kw)
    with pytest.raises(ValueError, match=message):
        value_and_grads(ring_fn(4, layout, kv_pieces=pieces, **static), qkv, ct, data)


@pytest.mark.parametrize(("layout", "case"), spread(["causal", "segments", "gqa", "window"], LAYOUTS))
def test_ring_bf16(layout, case):
    check(lambda **s: ring_fn(4, layout, query_chunk_size=16, key_chunk_size=16, **s), case,
          dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)


@pytest.mark.parametrize("case", ["none", "causal", "segments", "gqa", "key_bias"])
def test_blockwise_bf16(case):
    check(lambda **s: partial(eqx_ring.blockwise_attention, query_chunk_size=32, key_chunk_size=64, **s), case,
          dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)


# The fused Pallas path in Pallas's interpreter on CPU: the same checks as above. On a GPU the tests above
# already run it, as implementation=None picks it there.
@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_pallas(case):
    check(lambda **s: partial(eqx_ring.blockwise_attention, implementation="pallas", **s), case)


@pytest.mark.parametrize(("layout", "case"), [("zigzag", c) for c in CASES] + [
    ("contiguous", "causal"), ("contiguous", "segments"), ("striped", "causal"), ("striped", "gqa")])
def test_ring_pallas(layout, case):
    check(lambda **s: ring_fn(4, layout, check_vma=not PALLAS_CPU, implementation="pallas", **s), case)


@pytest.mark.parametrize("case", ["causal", "segments"])
def test_pallas_bf16(case):
    check(lambda **s: partial(eqx_ring.blockwise_attention, implementation="pallas", **s), case,
          dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)
    check(lambda **s: ring_fn(4, "zigzag", check_vma=not PALLAS_CPU, implementation="pallas", **s), case,
          dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)


def test_implementation_switch():
    (q, k, v), _, _ = make_inputs("causal")

    def kernels(**kw):
        def loss(q):
            return eqx_ring.blockwise_attention(q, k, v, causal=True, **kw).sum()

        return "pallas_call" in str(jax.make_jaxpr(jax.grad(loss))(q))

    assert kernels(implementation="pallas") and not kernels(implementation="xla")
    assert kernels() == (jax.default_backend() == "gpu")  # the default follows the backend
    with pytest.raises(ValueError, match="implementation must be one of"):
        eqx_ring.blockwise_attention(q, k, v, implementation="triton")
    if not PALLAS_CPU:
        with pytest.raises(ValueError, match="power of two"):
            eqx_ring.blockwise_attention(q[..., :12], k[..., :12], v[..., :12], implementation="pallas")


def test_fused_path_chooses_its_own_tiles():
    """The fused path ignores the chunk sizes, and refuses by name lengths that no tile it has divides."""
    (q, k, v), _, _ = make_inputs("causal")
    fused = partial(eqx_ring.blockwise_attention, causal=True, implementation="pallas")
    # 24 does not divide the 256 queries: only the XLA path, which uses the chunk sizes, refuses it.
    assert jax.eval_shape(partial(fused, query_chunk_size=24), q, k, v).shape == q.shape
    with pytest.raises(ValueError, match="query_chunk_size=24 must divide q_seq=256"):
        eqx_ring.blockwise_attention(q, k, v, implementation="xla", query_chunk_size=24)
    # No power of two >= 16 divides 200 (nor, interpreted, do the preferred tiles of 128 and 64).
    with pytest.raises(ValueError, match=r'implementation="pallas" needs .*\(got q_seq=200, kv_seq=200\)'):
        fused(q[:, :200], k[:, :200], v[:, :200])
    # On a ring the error names the lengths one step sees: here half of a zigzag shard of 800 / 4 tokens.
    (q, k, v), _, _ = make_inputs("causal", t=800)
    half = r"kv_seq \(the local shard of 4 devices on axis 'sp'\)/2 \(one zigzag half\)=100"
    with pytest.raises(ValueError, match=half):
        ring_fn(4, "zigzag", check_vma=False, causal=True, implementation="pallas")(q, k, v)


@pytest.mark.parametrize("cq", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("ck", [1, 3, 16])
def test_blockwise_any_chunk_size(cq, ck):
    case = dict(causal=True, segment_ids=jnp.asarray([[0] * 5 + [1] * 4 + [2] * 7, [3] * 16], jnp.int32))
    t = 48 if ck == 3 else 16
    if t == 48:
        case["segment_ids"] = jnp.repeat(case["segment_ids"], 3, axis=1)
    check(lambda **s: partial(eqx_ring.blockwise_attention, query_chunk_size=cq, key_chunk_size=ck, **s), case, t=t)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_chunk_size_one(layout):
    check(lambda **s: ring_fn(4, layout, query_chunk_size=1, key_chunk_size=2, **s),
          dict(causal=True, sliding_window=5), t=32)


def _blind_rows_case():
    # Queries of segment 7 find no key of segment 7; batch row 1 also has every key biased to -inf.
    seg = jnp.asarray(np.repeat([[0, 7, 1, 2], [3, 3, 7, 4]], [30, 50, 60, 116], axis=1), jnp.int32)
    kv_seg = jnp.where(seg == 7, 8, seg)
    bias = jnp.zeros((2, T)).at[1].set(-jnp.inf)
    return dict(causal=True, segment_ids=seg, kv_segment_ids=kv_seg, key_bias=bias)


@pytest.mark.parametrize("runner", ["blockwise", "ring"])
def test_rows_that_see_nothing(runner):
    case = _blind_rows_case()
    if runner == "blockwise":
        def f(**s):
            return partial(eqx_ring.blockwise_attention, query_chunk_size=32, key_chunk_size=16, **s)
    else:
        def f(**s):
            return ring_fn(8, "zigzag", query_chunk_size=8, key_chunk_size=8, **s)
    check(f, case)
    qkv, ct, kw = make_inputs(case)
    static, data = split(kw)
    out, _ = value_and_grads(f(**static), qkv, ct, data)
    blind = np.asarray((case["segment_ids"] == 7)[..., None, None] | (jnp.arange(2) == 1)[:, None, None, None])
    np.testing.assert_array_equal(np.where(blind, np.asarray(out), 0.0), 0.0)


def test_blockwise_memory_is_linear_in_sequence():
    def temp(t):
        shape = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)

        def loss(q, k, v):
            return eqx_ring.blockwise_attention(q, k, v, causal=True, query_chunk_size=256, key_chunk_size=256).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    small, large = temp(2048), temp(8192)
    assert large < 4.5 * small  # linear growth; O(T²) would be 16×
    assert large < 8192 * 8192 * 2 * 4 / 16  # far below one [T, T] score matrix per head


def _transfers(jaxpr, mult=1):
    """Number of ppermute'd arrays a jaxpr sends, loops unrolled."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            total += mult * len(eqn.invars)
        inner_mult = mult * eqn.params["length"] if eqn.primitive.name == "scan" else mult
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _transfers(sub, inner_mult)
    return total


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_sends_each_block_n_minus_1_times(n):
    (q, k, v), ct, _ = make_inputs("gqa")
    f = ring_fn(n, "contiguous", causal=True)
    fwd = jax.make_jaxpr(f)(q, k, v)
    assert _transfers(fwd.jaxpr) == 2 * (n - 1)  # k and v, at kv_heads (never repeated to q heads)
    bwd = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.vdot(f(q, k, v), ct), argnums=(0, 1, 2)))(q, k, v)
    # forward ring, then backward: k, v n-1 times and dk, dv n times (home after the last step).
    assert _transfers(bwd.jaxpr) == 2 * (n - 1) + 2 * (n - 1) + 2 * n


@pytest.mark.parametrize(("n", "window", "steps"), [(8, 24, 1), (8, 33, 1), (8, 34, 2), (8, 100, 4), (8, 256, 7),
                                                     (4, 1, 0)])
def test_window_aware_ring_sends_only_the_blocks_a_window_can_see(n, window, steps):
    # T=256: 32 tokens per device on 8 (64 on 4); a window of w needs the ceil((w - 1) / 32) blocks behind.
    (q, k, v), ct, kw = make_inputs(dict(sliding_window=window, causal=True))
    f = ring_fn(n, "contiguous", query_chunk_size=8, key_chunk_size=8, causal=True, sliding_window=window)
    fwd = jax.make_jaxpr(f)(q, k, v)
    assert _transfers(fwd.jaxpr) == 2 * steps
    grad = jax.grad(lambda q, k, v: jnp.vdot(f(q, k, v), ct), argnums=(0, 1, 2))
    # k, v `steps` times forward and backward, dk, dv as often plus one send home (none on a ring of one).
    assert _transfers(jax.make_jaxpr(grad)(q, k, v).jaxpr) == 2 * steps + 2 * steps + 2 * (steps + (n > 1))
    if window > 1:  # (a window of 1 sees the token itself only: dq is 0, and a relative error undefined)
        check(lambda **s: ring_fn(n, "contiguous", query_chunk_size=8, key_chunk_size=8, **s),
              dict(sliding_window=window, causal=True))
    # The other layouts spread every shard over the sequence: all n - 1 blocks still travel.
    zigzag = ring_fn(n, "zigzag", query_chunk_size=8, key_chunk_size=8, causal=True, sliding_window=window)
    assert _transfers(jax.make_jaxpr(zigzag)(q, k, v).jaxpr) == 2 * (n - 1)


def test_vmap_folds_into_the_batch_inside_shard_map():
    """vmap over examples with sharded segment ids: exact, per-example grads too, and blocks still skipped."""
    (q, k, v), ct, kw = make_inputs("segments", batch=2)
    seg = kw["segment_ids"]
    mesh = jax.make_mesh((2, 4), ("dp", "sp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = jax.sharding.PartitionSpec("sp")

    def one(q, k, v, seg):
        f = partial(eqx_ring.ring_attention, axis_name="sp", causal=True, query_chunk_size=16, key_chunk_size=16)
        return jax.shard_map(lambda q, k, v, s: f(q, k, v, segment_ids=s), mesh=mesh, in_specs=(spec,) * 4,
                             out_specs=spec)(q, k, v, seg)

    def loss(attend, q, k, v, seg, ct):
        return jnp.vdot(attend(q, k, v, seg), ct)

    batched = jax.vmap(one, spmd_axis_name="dp")
    ref = jax.vmap(lambda q, k, v, s: eqx_ring.dot_product_attention(q, k, v, causal=True, segment_ids=s))
    out = jax.jit(batched)(q, k, v, seg)
    assert rel_err(out, ref(q, k, v, seg)) <= 1e-5
    ref_grads = jax.grad(partial(loss, ref), argnums=(0, 1, 2))(q, k, v, seg, ct)
    grad_of_vmap = jax.jit(jax.grad(partial(loss, batched), argnums=(0, 1, 2)))(q, k, v, seg, ct)
    per_example = jax.jit(jax.vmap(jax.grad(partial(loss, one), argnums=(0, 1, 2)), spmd_axis_name="dp"))
    for grads in (grad_of_vmap, per_example(q, k, v, seg, ct)):
        for g, r in zip(grads, ref_grads, strict=True):
            assert rel_err(g, r) <= 1e-4
    # The mapped axis is folded into the kernel's batch: the per-block switch survives batching.
    hlo = jax.jit(batched).lower(q, k, v, seg).as_text()
    assert "stablehlo.case" in hlo and "select_n" not in hlo
