"""Bad input gets an error that names the argument and the expected and actual values."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import eqx_ring

q = jnp.ones((1, 64, 4, 8))
kv = jnp.ones((1, 64, 2, 8))


def ring_on(n, **kw):
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    return jax.shard_map(lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name="sp", **kw), mesh=mesh,
                         in_specs=P(None, "sp"), out_specs=P(None, "sp"))


def test_heads_not_divisible():
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of kv heads \(3\)"):
        eqx_ring.blockwise_attention(q, jnp.ones((1, 64, 3, 8)), jnp.ones((1, 64, 3, 8)))


def test_mismatched_dtypes():
    with pytest.raises(TypeError, match="q, k and v must share one dtype, got q=float32, k=bfloat16"):
        eqx_ring.blockwise_attention(q, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16))


def test_chunk_does_not_divide():
    with pytest.raises(ValueError, match="query_chunk_size=24 must divide q_seq=64"):
        eqx_ring.blockwise_attention(q, kv, kv, query_chunk_size=24)


def test_ring_chunk_does_not_divide_local_shard():
    with pytest.raises(ValueError, match=r"key_chunk_size=3 must divide kv_seq \(the local shard of 4 devices"):
        ring_on(4, key_chunk_size=3)(q, kv, kv)


def test_sequence_not_divisible_for_zigzag():
    # 8 devices × 2 zigzag chunks need a multiple of 16 tokens; 8 per device makes 64 = 16·4, so use 40.
    x, y = jnp.ones((1, 40, 4, 8)), jnp.ones((1, 40, 2, 8))
    with pytest.raises(ValueError, match=r"must be divisible by 16 \(2 × 8 shards\) for layout='zigzag'"):
        ring_on(8, layout="zigzag")(x, y, y)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of .* got 'spiral'"):
        ring_on(2, layout="spiral")(q, kv, kv)


def test_axis_not_bound():
    with pytest.raises(ValueError, match="axis_name='sp' is not a bound mesh axis: call ring_attention inside"):
        eqx_ring.ring_attention(q, kv, kv, axis_name="sp")


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match="causal_block_size must be a positive int, got 0"):
        eqx_ring.blockwise_attention(q, kv, kv, causal=True, causal_block_size=0)
    with pytest.raises(ValueError, match="sliding_window must be a positive int or None, got -2"):
        eqx_ring.blockwise_attention(q, kv, kv, sliding_window=-2)
    # With jaxtyping's hook on, the Int[...] contract answers first; both errors name the argument.
    with pytest.raises(TypeError, match="segment_ids"):
        eqx_ring.blockwise_attention(q, kv, kv, segment_ids=jnp.zeros((1, 64), jnp.float32))
    with pytest.raises(ValueError, match="kv_segment_ids needs segment_ids"):
        eqx_ring.blockwise_attention(q, kv, kv, kv_segment_ids=jnp.zeros((1, 64), jnp.int32))
