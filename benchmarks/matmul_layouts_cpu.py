"""Why the kernel computes dvᵀ = dOᵀ·p and dkᵀ = qᵀ·ds: XLA:CPU speed of batched matmul operand layouts.

    python benchmarks/matmul_layouts_cpu.py

One attention block's shapes (8 heads, 512 × 512 scores, head_dim 64, f32) on one CPU device.
"NN" contracts the last axis of the left operand; "TN" contracts its first (the p^T·dO form).
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from _common import median_seconds

H, C, D, REPS = 8, 512, 64, 20


def main():
    p, x = jnp.ones((H, C, C)), jnp.ones((H, C, D))
    cases = {
        "NN  p·x     [q,p]x[p,d]": (lambda p, x: jnp.einsum("bqp,bpd->bqd", p, x), p, x),
        "NT  x·xᵀ    [q,d]x[p,d]": (lambda a, b: jnp.einsum("bqd,bpd->bqp", a, b), x, x),
        "TN  pᵀ·x    [q,p]x[q,d]": (lambda p, x: jnp.einsum("bqp,bqd->bpd", p, x), p, x),
        "transpose   [8,512,64]": (lambda x: x.transpose(0, 2, 1) + 0.0, x),
    }
    print(f"jax {jax.__version__} on {os.cpu_count()} cores; median of {REPS} calls")
    times = {}
    for name, (f, *args) in cases.items():
        g = jax.jit(f)
        jax.block_until_ready(g(*args))
        times[name] = median_seconds(lambda g=g, args=args: g(*args), REPS)
    nn = times["NN  p·x     [q,p]x[p,d]"]
    for name, sec in times.items():
        print(f"{name:26} {sec * 1e3:7.2f} ms   {sec / nn:5.2f}x NN")


if __name__ == "__main__":
    main()
