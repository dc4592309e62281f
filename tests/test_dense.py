import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, make_inputs, rel_err
from reference import numpy_attention

import eqx_ring


@pytest.mark.parametrize("case", list(CASES))
def test_dense_matches_float64_numpy(case):
    (q, k, v), _, kw = make_inputs(case)
    out = eqx_ring.dot_product_attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, numpy_attention(q, k, v, **kw)) <= 1e-5


def test_dense_rows_that_see_nothing_are_zero():
    (q, k, v), _, _ = make_inputs("none", t=32, batch=1)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [8, 8, 16], axis=1), jnp.int32)
    kv_seg = jnp.asarray(np.repeat([[0, 1, 5]], [8, 8, 16], axis=1), jnp.int32)
    out = eqx_ring.dot_product_attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg)
    np.testing.assert_array_equal(np.asarray(out[0, 16:]), 0.0)
    ref = numpy_attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg)
    assert rel_err(out, ref) <= 1e-5


def test_dense_scale_and_bias_broadcast():
    (q, k, v), _, _ = make_inputs("none", t=16, batch=2)
    bias = jnp.linspace(-2.0, 2.0, 16)
    out = eqx_ring.dot_product_attention(q, k, v, key_bias=bias, scale=0.3)
    ref = numpy_attention(q, k, v, key_bias=np.broadcast_to(bias, (2, 16)), scale=0.3)
    assert rel_err(out, ref) <= 1e-5
