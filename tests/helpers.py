"""Shared inputs, runners and error measures for the tests."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import eqx_ring

T = 256  # global sequence length: 32 tokens per device on 8 devices


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def segments(lengths, batch=2, roll=0):
    """[batch, sum(lengths)] int32 ids of consecutive segments; each row rolled by `roll` more lengths."""
    rows = [np.repeat(np.arange(len(lengths)) + 10 * r, np.roll(lengths, r * roll)) for r in range(batch)]
    return jnp.asarray(np.stack(rows), jnp.int32)


# Mask configurations named in the kernels issue; T=256 so causal_block_size=64 spans several blocks.
CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "block64": dict(causal=True, causal_block_size=64),
    "segments": dict(causal=True, segment_ids=segments([37, 90, 61, 68], roll=1)),
    "window": dict(sliding_window=24),
    "gqa": dict(causal=True, q_heads=8, kv_heads=2),
    "key_bias": dict(key_bias=True),
}


def _flat(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def spread(cases, places, per_case=2):
    """pytest params (place, case): each case on `per_case` places, consecutive cases on the next places, so every
    place meets several cases and every case several places. The full products compiled |places|·|cases| programs,
    about a third of the suite's time on the CPU; what is given up is a bug that shows only for a (place, case) pair
    left out."""
    places, cases = list(places), list(cases)
    pairs = [(places[(i * per_case + j) % len(places)], c) for i, c in enumerate(cases) for j in range(per_case)]
    return [pytest.param(p, c, id="-".join(map(str, (*_flat(p), *_flat(c))))) for p, c in pairs]


def make_inputs(case, *, dtype=jnp.float32, t=T, batch=2, head_dim=16, seed=0):
    kw = dict(CASES[case]) if isinstance(case, str) else dict(case)
    hq, hk = kw.pop("q_heads", 2), kw.pop("kv_heads", 2)
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (batch, t, hq, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, t, hk, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, t, hk, head_dim)).astype(dtype)
    ct = jax.random.normal(keys[3], (batch, t, hq, head_dim)).astype(dtype)
    if kw.get("key_bias") is True:
        kw["key_bias"] = jax.random.normal(keys[4], (batch, t))
    return (q, k, v), ct, kw


def ring_fn(n, layout, *, check_vma=True, usp=None, **static):
    """Global natural-order attention through ring_attention on an n-device 'sp' mesh.

    With `usp`, the mesh is (n / usp) × usp devices with axes ("sp", "usp"), the sequence split
    over both (pass `strategy="hybrid"`). Pallas's interpreter (the fused path off GPU) trips
    shard_map's varying-axes check on jax 0.10 inside its own loops, so interpreted runs pass
    `check_vma=False`.
    """
    shape, names = ((n,), ("sp",)) if usp is None else ((n // usp, usp), ("sp", "usp"))
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=jax.devices()[:n])
    axis = names[0] if usp is None else names
    seq = P(None, axis)

    def local(q, k, v, seg, kv_seg, bias, sinks):
        return eqx_ring.ring_attention(q, k, v, axis_name=axis, layout=layout, segment_ids=seg,
                                       kv_segment_ids=kv_seg, key_bias=bias, sinks=sinks, **static)

    # Sinks are per head, replicated on every device.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 6 + (P(),), out_specs=seq, check_vma=check_vma)

    def f(q, k, v, *, segment_ids=None, kv_segment_ids=None, key_bias=None, sinks=None):
        def tl(x):
            return None if x is None else eqx_ring.to_layout(x, layout, n, axis=1)

        out = sharded(tl(q), tl(k), tl(v), tl(segment_ids), tl(kv_segment_ids), tl(key_bias), sinks)
        return eqx_ring.from_layout(out, layout, n, axis=1)

    return f


def value_and_grads(f, qkv, ct, kw):
    """Output and gradients of <f(q, k, v), ct> w.r.t. q, k, v (and key_bias when given), jitted."""
    bias = kw.get("key_bias")
    rest = {a: b for a, b in kw.items() if a != "key_bias"}

    def loss(q, k, v, bias):
        out = f(q, k, v, key_bias=bias, **rest)
        return jnp.vdot(out.astype(jnp.float32), ct.astype(jnp.float32)), out

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*qkv, bias)
    return out, grads


# The real `eqx-ring` entry point, in a fresh interpreter (it sets the simulated device count itself).
CLI = [sys.executable, "-c", "from models._cli import main; raise SystemExit(main())"]
# A toy recipe: 2-frame videos, a 1-layer LM, rows of 128 tokens on a (dp=2, sp=4) mesh.
TOY = ["--frames", "2", "--train-videos", "48", "--eval-videos", "6", "--vq-steps", "3", "--batch-size", "4",
       "--d-model", "32", "--layers", "1", "--mesh", "2,1,1,4", "--no-progress"]
