import jax.numpy as jnp
import numpy as np
import pytest

import eqx_ring


def test_positions_small_examples():
    assert eqx_ring.layout_positions(8, "contiguous", 2).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert eqx_ring.layout_positions(8, "zigzag", 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert eqx_ring.layout_positions(8, "striped", 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_roundtrip_and_permutation(layout, n):
    x = np.arange(3 * 64 * 2).reshape(3, 64, 2)
    pos = eqx_ring.layout_positions(64, layout, n)
    assert sorted(pos.tolist()) == list(range(64))
    y = eqx_ring.to_layout(x, layout, n, axis=1)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, x[:, pos])
    np.testing.assert_array_equal(eqx_ring.from_layout(y, layout, n, axis=1), x)
    yj = eqx_ring.to_layout(jnp.asarray(x), layout, n, axis=1)
    np.testing.assert_array_equal(np.asarray(eqx_ring.from_layout(yj, layout, n, axis=1)), x)


def test_zigzag_balances_causal_work():
    # Causal pairs (i >= j) owned by each device's queries: zigzag makes them equal.
    n, t = 4, 64
    pos = eqx_ring.layout_positions(t, "zigzag", n).reshape(n, -1)
    work = [(p[:, None] + 1).sum() for p in pos]
    assert len(set(work)) == 1


def test_layout_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        eqx_ring.layout_positions(8, "diagonal", 2)
    with pytest.raises(ValueError, match=r"seq_len=12 must be divisible by 8 \(2 × 4 shards\)"):
        eqx_ring.layout_positions(12, "zigzag", 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        eqx_ring.layout_slot(3, 16, "bogus", 4)
    with pytest.raises(ValueError, match=r"seq_len=15 must be divisible by 4 \(4 shards\)"):
        eqx_ring.layout_slot(3, 15, "striped", 4)
