"""Real multi-process JAX: 2 processes x 4 CPU devices on 127.0.0.1, against one process with 8 devices."""

import numpy as np
import pytest
from helpers import ring_fn
from multiprocess import launch
from multiprocess_inputs import attention_inputs

import eqx_ring


def test_ring_attention_spanning_two_processes_equals_one_process(tmp_path):
    launch("ring_attention_across_processes", tmp_path)
    shards = sorted(tmp_path.glob("slots_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(shards) == 8  # each device's slots, written by the process that owns the device
    laid_out = np.concatenate([np.load(p) for p in shards], axis=1)
    q, k, v = attention_inputs()
    got = eqx_ring.from_layout(laid_out, "zigzag", 8, axis=1)
    expected = np.asarray(ring_fn(8, "zigzag", causal=True, query_chunk_size=8, key_chunk_size=8)(q, k, v))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_a_failing_or_hanging_peer_fails_the_test_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)process \d of 2 exited with 1 .*no_such_worker"):
        launch("no_such_worker", tmp_path, timeout=120)
    with pytest.raises(AssertionError, match="process 1 of 2 did not finish within 20 s"):
        launch("hang_in_process_1", tmp_path, timeout=20)
