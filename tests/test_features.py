"""Attention features of current models through every path: chunked attention (Llama 4).

Each equals the dense reference (itself checked against an independent float64 NumPy attention) in value and
gradients, alone and combined with causal / window / segments / GQA, on 1, 2, 4 and 8 devices, in float32 and
bfloat16, on the XLA and the (interpreted) fused paths and under every strategy.
"""

import jax
import jax.numpy as jnp
import pytest
from helpers import make_inputs, rel_err, ring_fn, segments
from reference import numpy_attention
from test_kernels import PALLAS_CPU, _transfers, check

import eqx_ring

# T = 256: 32 tokens per device on 8 devices, so chunks of 40, 48 and 96 cross shard boundaries.
CHUNKED = {
    "chunk": dict(causal=True, attention_chunk_size=48),
    "chunk_bidirectional": dict(attention_chunk_size=64),
    "chunk_window": dict(causal=True, attention_chunk_size=64, sliding_window=24),
    "chunk_segments": dict(causal=True, attention_chunk_size=40, segment_ids=segments([37, 90, 61, 68], roll=1)),
    "chunk_gqa": dict(causal=True, attention_chunk_size=96, q_heads=8, kv_heads=2),
}
PLACES = [(1, "contiguous"), (2, "striped"), (4, "zigzag"), (8, "contiguous"), (8, "zigzag")]


@pytest.mark.parametrize("case", list(CHUNKED))
def test_dense_chunked_matches_float64_numpy(case):
    (q, k, v), _, kw = make_inputs(CHUNKED[case])
    assert rel_err(eqx_ring.dot_product_attention(q, k, v, **kw), numpy_attention(q, k, v, **kw)) <= 1e-5


@pytest.mark.parametrize("case", list(CHUNKED))
def test_blockwise_chunked(case):
    check(lambda **s: lambda *a, **d: eqx_ring.blockwise_attention(*a, query_chunk_size=16, key_chunk_size=32,
                                                                    **s, **d), CHUNKED[case])


@pytest.mark.parametrize("case", list(CHUNKED))
@pytest.mark.parametrize(("n", "layout"), PLACES)
def test_ring_chunked(n, layout, case):
    check(lambda **s: ring_fn(n, layout, query_chunk_size=8, key_chunk_size=8, **s), CHUNKED[case])


@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
def test_chunked_under_each_strategy(strategy):
    case = {**CHUNKED["chunk_gqa"], "q_heads": 8}
    check(lambda **s: ring_fn(8, "zigzag", usp=2 if strategy == "hybrid" else None, strategy=strategy,
                              query_chunk_size=8, key_chunk_size=8, **s), case)


def test_chunked_bf16_and_fused():
    check(lambda **s: ring_fn(4, "zigzag", query_chunk_size=16, key_chunk_size=16, **s), CHUNKED["chunk_segments"],
          dtype=jnp.bfloat16, out_tol=2e-2, grad_tol=2e-2)
    for case in ("chunk", "chunk_window"):
        check(lambda **s: ring_fn(4, "zigzag", check_vma=not PALLAS_CPU, implementation="pallas", **s),
              CHUNKED[case])


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
