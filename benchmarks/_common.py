"""Shared timing and memory helpers for the benchmark scripts."""

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `reps` calls of an already-compiled `fn` (blocking on its result)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def temp_bytes(fn: Callable, *args) -> int:
    """Per-device temporary memory of `jax.jit(fn)` as XLA compiled it (excludes arguments and outputs)."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def fwd_bwd(f: Callable) -> Callable:
    """Gradients of `f(q, k, v)` against a cotangent `ct`: `(q, k, v, ct) -> (dq, dk, dv)`, the forward included."""
    return jax.grad(lambda q, k, v, ct: jnp.vdot(f(q, k, v), ct), argnums=(0, 1, 2))
