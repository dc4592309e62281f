"""Attention features of current models through every path: chunked attention (Llama 4), sinks (gpt-oss),
logit softcapping (Gemma 2) and attention dropout.

Each equals the dense reference (itself checked against an independent float64 NumPy attention) in value and
gradients, alone and combined with causal / window / segments / GQA, on 1, 2, 4 and 8 devices, in float32 and
bfloat16, on the XLA and the (interpreted) fused paths and under every strategy.
"""

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, make_inputs, rel_err, ring_fn, segments, spread
from reference import dropout_kept, numpy_attention
from test_kernels import PALLAS_CPU, _transfers, check, split
from test_strategies import PLACES, strategy_fn

import eqx_ring
from eqx_ring._masks import dropout_keep, dropout_rows
from eqx_ring.sharding import make_mesh

# T = 256: 32 tokens per device on 8 devices, so chunks of 40, 48 and 96 cross shard boundaries.
CHUNKED = {
    "chunk": dict(causal=True, attention_chunk_size=48),
    "chunk_bidirectional": dict(attention_chunk_size=64),
    "chunk_window": dict(causal=True, attention_chunk_size=64, sliding_window=24),
    "chunk_segments": dict(causal=True, attention_chunk_size=40, segment_ids=segments([37, 90, 61, 68], roll=1)),
    "chunk_gqa": dict(causal=True, attention_chunk_size=96, q_heads=8, kv_heads=2),
}


def blockwise_fn(**static):
    return partial(eqx_ring.blockwise_attention, query_chunk_size=16, key_chunk_size=32, **static)


@pytest.mark.parametrize("case", list(CHUNKED))
def test_dense_chunked_matches_float64_numpy(case):
    (q, k, v), _, kw = make_inputs(CHUNKED[case])
    assert rel_err(eqx_ring.dot_product_attention(q, k, v, **kw), numpy_attention(q, k, v, **kw)) <= 1e-5


@pytest.mark.parametrize(("chunk", "steps"), [(32, 1), (33, 1), (48, 2), (100, 4), (256, 7)])
def test_causal_chunks_limit_the_contiguous_ring_like_a_window(chunk, steps):
    # 32 tokens per device: a causal query sees at most chunk - 1 keys back, so ceil((chunk - 1) / 32) blocks.
    (q, k, v), _, _ = make_inputs("causal")
    f = ring_fn(8, "contiguous", query_chunk_size=8, key_chunk_size=8, causal=True, attention_chunk_size=chunk)
    assert _transfers(jax.make_jaxpr(f)(q, k, v).jaxpr) == 2 * steps
    # Without causal, a chunk also sees the keys after it: every block still travels.
    both_ways = ring_fn(8, "contiguous", query_chunk_size=8, key_chunk_size=8, attention_chunk_size=chunk)
    assert _transfers(jax.make_jaxpr(both_ways)(q, k, v).jaxpr) == 2 * 7


def test_bad_chunk_size_is_named(no_hook):
    (q, k, v), _, _ = make_inputs("causal")
    with pytest.raises(ValueError, match="attention_chunk_size must be a positive int or None, got 0"):
        eqx_ring.dot_product_attention(q, k, v, attention_chunk_size=0)
    with pytest.raises(ValueError, match="attention_chunk_size must be a positive int or None, got 2.5"):
        eqx_ring.AttentionSpec(attention_chunk_size=2.5)



# ---- attention sinks (gpt-oss) ---------------------------------------------------------------------------------

SINK_CASES = {"causal": CASES["causal"], "window": {"causal": True, "sliding_window": 24},
              "segments": CASES["segments"], "gqa": CASES["gqa"], "chunk": CHUNKED["chunk"], "none": CASES["none"]}


def check_with_sinks(fn, case, *, dtype=jnp.float32, out_tol=1e-5, grad_tol=1e-4):
    """`fn(**static)(q, k, v, sinks=..., **data)` equals dense attention with the same sinks, gradients included."""
    qkv, ct, kw = make_inputs(case, dtype=dtype)
    static, data = split(kw)
    sinks = 2 * jax.random.normal(jax.random.key(7), (qkv[0].shape[2],))

    def value_and_grads(f, q, k, v):
        def loss(q, k, v, s):
            out = f(q, k, v, sinks=s, **data)
            return jnp.vdot(out.astype(jnp.float32), ct.astype(jnp.float32)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sinks)

    (_, out), grads = value_and_grads(fn(**static), *qkv)
    (_, ref), ref_grads = value_and_grads(partial(eqx_ring.dot_product_attention, **static),
                                          *(x.astype(jnp.float32) for x in qkv))
    assert out.dtype == dtype and rel_err(out, ref) <= out_tol
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, strict=True):
        assert rel_err(g, r) <= grad_tol, name
    # The sinks matter: without them the output is another one.
    assert rel_err(eqx_ring.dot_product_attention(*(x.astype(jnp.float32) for x in qkv), **static, **data),
                   ref) > 1e-2


@pytest.mark.parametrize("case", list(SINK_CASES))
def test_dense_sinks_match_float64_numpy(case):
    (q, k, v), _, kw = make_inputs(SINK_CASES[case])
    sinks = 2 * jax.random.normal(jax.random.key(7), (q.shape[2],))
    out = eqx_ring.dot_product_attention(q, k, v, sinks=sinks, **kw)
    assert rel_err(out, numpy_attention(q, k, v, sinks=np.asarray(sinks), **kw)) <= 1e-5


def test_bad_sinks_are_named(no_hook):
    (q, k, v), _, _ = make_inputs("gqa")
    with pytest.raises(ValueError, match=r"sinks must have shape \(8,\) \(one logit per query head\), got \(2,\)"):
        eqx_ring.blockwise_attention(q, k, v, sinks=jnp.zeros(2))


@pytest.mark.parametrize("sp", [None, 4])
def test_module_sinks_train_and_decode(sp):
    attn = eqx_ring.RingAttention(32, 4, num_kv_heads=2, use_sinks=True, key=jax.random.key(0))
    assert attn.sinks.shape == (4,) and not attn.sinks.any()
    attn = eqx.tree_at(lambda a: a.sinks, attn, jnp.array([1.5, -1.0, 3.0, 0.0]))
    tuning = eqx_ring.KernelTuning(query_chunk_size=4, key_chunk_size=4)
    one = eqx_ring.AttentionSpec(tuning=tuning, sliding_window=6, logit_softcap=1.5)  # sinks with a softcap
    spec = one if sp is None else one.replace(mesh=make_mesh(fsdp=1, sp=sp, devices=jax.devices()[:sp]))
    x = jax.random.normal(jax.random.key(1), (16, 32))
    full = eqx.filter_jit(lambda a, x: a(x, spec=one))(attn, x)
    # The sinks' gradient, on the mesh and on one device.
    ct = jnp.cos(jnp.arange(16 * 32.0)).reshape(16, 32)
    grads = [eqx.filter_grad(lambda a, s: jnp.vdot(a(x, spec=s), ct))(attn, s).sinks for s in (spec, one)]
    assert rel_err(*grads) <= 1e-5 and float(jnp.abs(grads[1]).min()) > 0
    # Decoding token t over a cache of the whole sequence gives the full pass's row t.
    _, keys, values = eqx.filter_jit(lambda a, x: a.prefill(x, spec=spec))(attn, x)
    step = eqx.filter_jit(lambda a, x, k, v, t: a.decode_step(x, k, v, jnp.zeros(16, jnp.int32), index=t,
                                                                position=t, segment=jnp.int32(0), spec=spec))
    for t in (0, 5, 15):
        out, keys, values = step(attn, x[t], keys, values, jnp.int32(t))
        assert rel_err(out, full[t]) <= 1e-5, t


# ---- logit softcapping (Gemma 2) -------------------------------------------------------------------------------

# Scores here are about N(0, 1): a cap of 0.8 bends most of them.
SOFTCAP = {name: {**case, "logit_softcap": 0.8} for name, case in
           {**{k: CASES[k] for k in ("none", "causal", "segments", "gqa", "key_bias")},
            "window": {"causal": True, "sliding_window": 24}, "chunk": CHUNKED["chunk"]}.items()}


@pytest.mark.parametrize("case", list(SOFTCAP))
def test_dense_softcap_matches_float64_numpy(case):
    (q, k, v), _, kw = make_inputs(SOFTCAP[case])
    out = eqx_ring.dot_product_attention(q, k, v, **kw)
    assert rel_err(out, numpy_attention(q, k, v, **kw)) <= 1e-5
    uncapped = {a: b for a, b in kw.items() if a != "logit_softcap"}
    assert rel_err(eqx_ring.dot_product_attention(q, k, v, **uncapped), out) > 1e-2  # the cap matters here


def test_bad_softcap_is_named(no_hook):
    (q, k, v), _, _ = make_inputs("causal")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=f"logit_softcap must be a positive finite number or None, got {bad}"):
            eqx_ring.blockwise_attention(q, k, v, logit_softcap=bad)
    with pytest.raises(ValueError, match="logit_softcap must be a positive finite number or None, got 0"):
        eqx_ring.AttentionSpec(logit_softcap=0)


# ---- attention dropout -----------------------------------------------------------------------------------------

# A key given as a static argument is a constant inside the jitted shard_map, the same on every device.
DROPOUT = {name: {**case, "dropout_rate": 0.3, "dropout_key": jax.random.key(11)} for name, case in
           {**{k: CASES[k] for k in ("none", "causal", "segments", "gqa", "key_bias")},
            "window": {"causal": True, "sliding_window": 24}, "chunk": CHUNKED["chunk"]}.items()}


@pytest.mark.parametrize("case", ["causal", "gqa", "key_bias"])
def test_dense_dropout_matches_float64_numpy(case):
    # The NumPy reference hashes each (row seed, i, j) from the definition, one Python int at a time.
    (q, k, v), _, kw = make_inputs(DROPOUT[case], t=48)
    seeds = np.asarray(jax.random.bits(kw["dropout_key"], (q.shape[0], q.shape[2]), jnp.uint32))
    kw_np = {a: b for a, b in kw.items() if not a.startswith("dropout")}
    out = eqx_ring.dot_product_attention(q, k, v, **kw)
    assert rel_err(out, numpy_attention(q, k, v, dropout=(0.3, seeds), **kw_np)) <= 1e-5
    assert rel_err(out, numpy_attention(q, k, v, **kw_np)) > 0.1  # dropout matters here


def test_dropout_drops_its_rate_independently_of_position():
    rows = dropout_rows(jax.random.bits(jax.random.key(3), (4, 8), jnp.uint32), jnp.arange(256))
    keep = np.asarray(dropout_keep(0.3, rows, jnp.arange(512)), np.float64)  # 4.2M draws
    assert abs(1 - keep.mean() - 0.3) < 2e-3
    # Neighbours along either axis, and the same (i, j) in two heads, are uncorrelated.
    centred = keep - keep.mean()
    for a, b in ((centred[..., 1:, :], centred[..., :-1, :]), (centred[..., 1:], centred[..., :-1]),
                 (centred[:, 1:], centred[:, :-1])):
        assert abs((a * b).mean() / centred.var()) < 5e-3
    # The NumPy definition agrees on a sample.
    seeds = np.asarray(jax.random.bits(jax.random.key(3), (4, 8), jnp.uint32))
    for bi, h, i, j in ((0, 0, 0, 0), (3, 7, 255, 511), (1, 4, 17, 300), (2, 2, 100, 3)):
        assert bool(keep[bi, h, i, j]) == dropout_kept(0.3, int(seeds[bi, h]), i, j)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_dropout_drops_the_same_set_whatever_the_split(n):
    # Forward outputs for one key, compared directly with each other (not only with the dense reference).
    (q, k, v), _, kw = make_inputs(DROPOUT["gqa"])  # 8 query heads: Ulysses splits them over up to 8 devices
    static, _ = split(kw)
    outs = [blockwise_fn(**static)(q, k, v), blockwise_fn(**{**static, "dropout_key": jax.random.key(11)})(q, k, v)]
    outs += [jax.jit(strategy_fn(s, n, layout, usp=2 if s == "hybrid" else None)(**static))(q, k, v)
             for s, layout in (("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"),
                               ("allgather", "zigzag"), ("ulysses", "striped"), ("hybrid", "zigzag"))
             if not (s == "hybrid" and n == 2)]
    for out in outs[1:]:
        assert rel_err(out, outs[0]) <= 1e-5
    # Another key drops another set.
    other = blockwise_fn(**{**static, "dropout_key": jax.random.key(12)})(q, k, v)
    assert rel_err(other, outs[0]) > 0.1


def test_dropout_off_is_no_dropout_exactly():
    (q, k, v), _, kw = make_inputs(DROPOUT["gqa"])
    static, _ = split(kw)
    plain = {a: b for a, b in static.items() if not a.startswith("dropout")}
    for f in (eqx_ring.dot_product_attention, blockwise_fn()):
        assert (f(q, k, v, **plain, dropout_rate=0.0, dropout_key=jax.random.key(1)) == f(q, k, v, **plain)).all()


def test_bad_dropout_is_named(no_hook):
    (q, k, v), _, _ = make_inputs("causal")
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=f"dropout_rate must be a number in \\[0, 1\\) .*, got {bad}"):
            eqx_ring.blockwise_attention(q, k, v, dropout_rate=bad, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match="dropout_rate=0.1 needs dropout_key, a jax.random key"):
        eqx_ring.dot_product_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout must be a number in \\[0, 1\\), got 1.5"):
        eqx_ring.AttentionSpec(dropout=1.5)
    attn = eqx_ring.RingAttention(8, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"AttentionSpec\(dropout=0.1\) needs key= to drop attention probabilities"):
        attn(jnp.zeros((4, 8)), spec=eqx_ring.AttentionSpec(dropout=0.1))


@pytest.mark.parametrize("sp", [None, 4])
def test_module_dropout_trains_with_a_key_and_is_off_in_inference(sp):
    attn = eqx_ring.RingAttention(32, 4, num_kv_heads=2, key=jax.random.key(0))
    one = eqx_ring.AttentionSpec(dropout=0.25, tuning=eqx_ring.KernelTuning(query_chunk_size=4, key_chunk_size=4))
    mesh = None if sp is None else make_mesh(fsdp=1, sp=sp, devices=jax.devices()[:sp])
    spec = one if sp is None else one.replace(layout="zigzag", mesh=mesh)
    x = jax.random.normal(jax.random.key(1), (16, 32))
    x_laid = eqx_ring.to_layout(x, spec.layout, spec.ring_size, axis=0)

    def run(a, x, key, spec):
        return eqx_ring.from_layout(a(x, spec=spec, key=key), spec.layout, spec.ring_size, axis=0)

    key = jax.random.key(5)
    # Same key: the same probabilities dropped on the mesh as on one device, in value and gradient.
    outs = [eqx.filter_jit(run)(attn, xs, key, s) for xs, s in ((x_laid, spec), (x, one))]
    assert rel_err(*outs) <= 1e-5
    ct = jnp.cos(jnp.arange(16 * 32.0)).reshape(16, 32)
    grads = [eqx.filter_grad(lambda a, xs, s: jnp.vdot(run(a, xs, key, s), ct))(attn, xs, s).query_proj.weight
             for xs, s in ((x_laid, spec), (x, one))]
    assert rel_err(*grads) <= 1e-5
    # Equinox's convention: inference=True is the layer without dropout, exactly; so is a spec without it.
    want = eqx.filter_jit(lambda a, x, s: a(x, spec=s))(attn, x_laid, spec.replace(dropout=0.0))  # layout order
    assert (eqx.filter_jit(lambda a, x: a(x, spec=spec, inference=True))(attn, x_laid) == want).all()
    assert rel_err(outs[1], eqx_ring.from_layout(want, spec.layout, spec.ring_size, axis=0)) > 0.05
    # vmapped with one key per example, examples get different masks.
    both = jax.vmap(lambda x, k: attn(x, spec=one, key=k))(jnp.stack([x, x]), jax.random.split(key, 2))
    assert rel_err(both[0], both[1]) > 0.05


# ---- each feature through every path ---------------------------------------------------------------------------

FEATURES = {**{f"chunked-{name}": (check, case) for name, case in CHUNKED.items()},
            **{f"sinks-{name}": (check_with_sinks, case) for name, case in SINK_CASES.items()},
            **{f"softcap-{name}": (check, case) for name, case in SOFTCAP.items()},
            "softcap-with-sinks": (check_with_sinks, SOFTCAP["causal"]),
            **{f"dropout-{name}": (check, case) for name, case in DROPOUT.items()},
            "dropout-with-sinks-softcap": (check_with_sinks, {**DROPOUT["window"], "logit_softcap": 0.8})}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_blockwise(feature):
    checker, case = FEATURES[feature]
    checker(blockwise_fn, case)


# Each feature on one place, the places in turn (helpers.spread), so every place runs every kind of feature;
# the full product is 5 × 27 compilations.
@pytest.mark.parametrize(("place", "feature"), spread(FEATURES, PLACES, 1))
def test_ring(place, feature):
    n, layout = place
    checker, case = FEATURES[feature]
    checker(strategy_fn("ring", n, layout), case)


@pytest.mark.parametrize("feature", ["chunked-chunk_gqa", "sinks-gqa", "softcap-gqa", "dropout-gqa"])
@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
def test_under_each_strategy(strategy, feature):
    checker, case = FEATURES[feature]
    checker(strategy_fn(strategy, 8, "zigzag", usp=2 if strategy == "hybrid" else None), case)


@pytest.mark.parametrize("feature", ["chunked-chunk_segments", "sinks-segments", "softcap-segments",
                                     "dropout-segments"])
def test_bf16(feature):
    checker, case = FEATURES[feature]
    checker(lambda **s: ring_fn(4, "zigzag", query_chunk_size=16, key_chunk_size=16, **s), case, dtype=jnp.bfloat16,
            out_tol=2e-2, grad_tol=2e-2)


@pytest.mark.parametrize("feature", ["chunked-chunk", "chunked-chunk_window", "sinks-causal", "softcap-causal",
                                     "softcap-key_bias", "dropout-gqa", "dropout-key_bias",
                                     "dropout-with-sinks-softcap"])
def test_fused_kernel(feature):
    checker, case = FEATURES[feature]
    checker(lambda **s: ring_fn(4, "zigzag", check_vma=not PALLAS_CPU, implementation="pallas", **s), case)
