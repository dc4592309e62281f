"""Every way to split attention over devices (ring_attention's `strategy=`) equals dense attention.

"allgather" gathers the keys and values (a slice of kv heads at a time), "ulysses" re-shards sequence ↔
heads with two all-to-alls, "hybrid" runs Ulysses over one mesh axis inside a ring over another; the
reference is `dot_product_attention` on the whole, naturally ordered sequence, in value and gradients.
"""

import jax
import jax.numpy as jnp
import pytest
from helpers import CASES, make_inputs, ring_fn, spread
from test_kernels import PALLAS_CPU, _transfers, check

import eqx_ring

# Devices and layouts: every device count once, zigzag and contiguous on the full mesh.
PLACES = [(1, "contiguous"), (2, "striped"), (4, "zigzag"), (8, "contiguous"), (8, "zigzag")]
# Ulysses splits the query heads over the axis: 8 of them (and 8 kv heads, or 2 for the GQA case).
EIGHT_HEADS = {case: {**CASES[case], "q_heads": 8, "kv_heads": CASES[case].get("kv_heads", 8)} for case in CASES}


def strategy_fn(strategy, n, layout, usp=None, **kw):
    return lambda **s: ring_fn(n, layout, usp=usp, strategy=strategy, query_chunk_size=8, key_chunk_size=8,
                               **kw, **s)


# Each case on two or three places, the places in turn (helpers.spread); the full product is 91 compilations.
@pytest.mark.parametrize(("place", "case"), spread(CASES, PLACES, 3))
def test_allgather_f32(place, case):
    n, layout = place
    check(strategy_fn("allgather", n, layout), case)


@pytest.mark.parametrize(("place", "case"), spread(CASES, PLACES[::-1], 3))
def test_ulysses_f32(place, case):
    n, layout = place
    check(strategy_fn("ulysses", n, layout), EIGHT_HEADS[case])


@pytest.mark.parametrize(("place", "case"), spread(CASES, [(2, 4, "zigzag"), (4, 2, "contiguous"), (2, 2, "striped")]))
def test_hybrid_f32(place, case):
    sp, usp, layout = place
    check(strategy_fn("hybrid", sp * usp, layout, usp=usp), EIGHT_HEADS[case])


@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
@pytest.mark.parametrize("case", ["causal", "segments", "gqa", "window"])
def test_strategies_bf16(strategy, case):
    fn = strategy_fn(strategy, 8, "zigzag", usp=2 if strategy == "hybrid" else None)
    check(fn, EIGHT_HEADS[case], dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)


def test_ulysses_repeats_gqa_kv_heads_only_as_far_as_the_axis_needs():
    # 2 kv heads over 8 devices: each repeated 4 times; 4 kv heads over 2 devices: none repeated.
    for heads, n in (({"q_heads": 8, "kv_heads": 2}, 8), ({"q_heads": 8, "kv_heads": 4}, 2),
                     ({"q_heads": 12, "kv_heads": 3}, 4)):
        check(strategy_fn("ulysses", n, "zigzag"), {"causal": True, **heads})


@pytest.mark.parametrize("pieces", [1, 2])
def test_allgather_in_pieces_of_kv_heads(pieces):
    check(strategy_fn("allgather", 4, "zigzag", kv_pieces=pieces), "gqa")


def test_strategies_on_the_fused_kernel():
    for strategy, usp in (("allgather", None), ("ulysses", None), ("hybrid", 2)):
        fn = (lambda s, u: lambda **st: ring_fn(4, "zigzag", usp=u, strategy=s, check_vma=not PALLAS_CPU,
                                                 implementation="pallas", **st))(strategy, usp)
        check(fn, EIGHT_HEADS["causal"])


def _collectives(jaxpr, names, mult=1):
    """How many times the primitives in `names` run in a jaxpr, loops unrolled."""
    total = 0
    for eqn in jaxpr.eqns:
        total += mult * (eqn.primitive.name in names)
        inner = mult * eqn.params["length"] if eqn.primitive.name == "scan" else mult
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _collectives(sub, names, inner)
    return total


def test_what_each_strategy_moves():
    (q, k, v), ct, _ = make_inputs(EIGHT_HEADS["gqa"])  # 8 query heads, 2 kv heads
    jaxpr = {s: jax.make_jaxpr(ring_fn(8, "zigzag", causal=True, strategy=s, usp=2 if s == "hybrid" else None))(
        q, k, v).jaxpr for s in ("allgather", "ulysses", "hybrid")}
    # One all-gather of k and v per kv head (kv_pieces defaults to one head at a time), no ring.
    assert _collectives(jaxpr["allgather"], {"all_gather"}) == 2 * 2
    assert _collectives(jaxpr["allgather"], {"ppermute"}) == 0
    # q, k, v to heads and the output back; no ring.
    assert _collectives(jaxpr["ulysses"], {"all_to_all"}) == 4
    assert _collectives(jaxpr["ulysses"], {"ppermute"}) == 0
    # The hybrid: the same all-to-alls, and a ring of 4 groups (k and v sent 3 times).
    assert _collectives(jaxpr["hybrid"], {"all_to_all"}) == 4
    assert _transfers(jaxpr["hybrid"]) == 2 * 3


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(strategy="tree"), r"strategy must be one of \('ring', 'allgather', 'ulysses', 'hybrid'\), got 'tree'"),
    (dict(strategy="ulysses", heads=(6, 6)), "splits the 6 query heads over the 4 devices of axis 'sp' "
                                             r"\(all-to-all\): 4 must divide 6"),
    (dict(strategy="allgather", kv_pieces=3), "kv_pieces=3 must divide the 2 kv heads"),
    (dict(strategy="ulysses", kv_pieces=2), "strategy='ulysses' has none"),
    (dict(strategy="hybrid"), r"axis_name must be a pair \(ring_axis, all_to_all_axis\), got 'sp'"),
])
def test_bad_strategy_arguments_are_named(no_hook, kwargs, message):
    heads = kwargs.pop("heads", (8, 2))
    (q, k, v), _, _ = make_inputs({"q_heads": heads[0], "kv_heads": heads[1]})
    with pytest.raises(ValueError, match=message):
        ring_fn(4, "contiguous", **kwargs)(q, k, v)


def test_hybrid_needs_two_bound_axes(no_hook):
    (q, k, v), _, _ = make_inputs("causal")
    with pytest.raises(ValueError, match="'usp' is not a bound mesh axis"):
        jax.shard_map(lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name=("sp", "usp"), strategy="hybrid"),
                      mesh=jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                                         devices=jax.devices()[:4]),
                      in_specs=jax.sharding.PartitionSpec(None, "sp"),
                      out_specs=jax.sharding.PartitionSpec(None, "sp"))(q, k, v)
