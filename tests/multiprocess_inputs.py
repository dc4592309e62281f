"""Inputs shared by the multi-process workers and the tests that check them."""

import numpy as np


def attention_inputs(t: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, t, 4, 16)).astype(np.float32) for _ in range(3))
