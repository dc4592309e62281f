"""The ring on one GPU: `ring_attention` over a 1-device mesh axis, and the demo LM's train step, fused vs XLA.

    python benchmarks/ring_gpu.py --json ring_gpu.json     # on a GPU
    python benchmarks/ring_gpu.py --smoke                  # tiny sizes on any backend: does the script run?

Part 1 runs `ring_attention` inside `jax.shard_map` over a one-device `sp` axis (the ring's own driver,
merge and backward ring, with one step) at T = 16K, B = 2, 16 heads of D = 128, bf16, causal, with
`implementation="pallas"` and `"xla"`, beside `blockwise_attention` (no ring) and cuDNN; each is first
checked against a float32 dense reference. Part 2 times the loss-and-gradient of a `RingTransformer` with
the video-text demo LM's dimensions (4 layers, d_model 128, 4/2 heads, hidden 384, vocab 519, zigzag,
8 rows x 1024 tokens, one device) with each implementation, and checks that both give the same loss.
Times are medians of interleaved repetitions after warm-up, each read after `block_until_ready`, on fresh
random inputs (never zeros).
"""

import argparse
import json
import os
import sys
import time
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from _common import fwd_bwd

import eqx_ring


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def interleaved_medians(fns: dict, reps: int) -> dict:
    """Median seconds of each zero-argument compiled function, timed in turn so drift hits all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def ring_part(t: int, b: int, h: int, d: int, reps: int) -> list[dict]:
    mesh = jax.make_mesh((1,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16) for kk in keys)

    def ring(impl):
        body = lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name="sp", causal=True, implementation=impl)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"),
                             check_vma=impl != "pallas" or jax.default_backend() == "gpu")

    fns = {"ring pallas (1 device)": ring("pallas"), "ring xla (1 device)": ring("xla"),
           "blockwise pallas": lambda q, k, v: eqx_ring.blockwise_attention(q, k, v, causal=True,
                                                                            implementation="pallas"),
           "blockwise xla": lambda q, k, v: eqx_ring.blockwise_attention(q, k, v, causal=True, implementation="xla")}
    if jax.default_backend() == "gpu":
        fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jnp.concatenate([jax.jit(lambda q, k, v: eqx_ring.dot_product_attention(q, k, v, causal=True))(
        *(x[i : i + 1] for x in f32)) for i in range(b)])
    flops = 4 * b * h * t * t * d * 0.5
    rows, ready = [], {}
    for name, f in fns.items():
        fwd, both = jax.jit(f), jax.jit(fwd_bwd(f))
        try:
            err = rel(fwd(q, k, v), ref)
        except Exception as e:  # noqa: BLE001 - a path that cannot run is a row, not a crash
            rows.append(dict(impl=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            continue
        if not err < 2e-2:
            rows.append(dict(impl=name, error=f"wrong result: rel err {err:.2e}"))
            continue
        ready[name] = (fwd, both, err)
    calls = {}
    for name, (fwd, both, _) in ready.items():
        calls[f"{name}|fwd"] = partial(fwd, q, k, v)
        calls[f"{name}|fwd_bwd"] = partial(both, q, k, v, ct)
    medians = interleaved_medians(calls, reps)
    for name, (_, _, err) in ready.items():
        fwd_s, both_s = medians[f"{name}|fwd"], medians[f"{name}|fwd_bwd"]
        rows.append(dict(impl=name, fwd_ms=fwd_s * 1e3, fwd_bwd_ms=both_s * 1e3, fwd_tflops=flops / fwd_s / 1e12,
                         fwd_bwd_tflops=3.5 * flops / both_s / 1e12, rel_err=err))
    return rows


def lm_part(seq: int, rows: int, reps: int, d_model: int = 128, chunk: int = 256) -> list[dict]:
    keys = jax.random.split(jax.random.key(2), 2)
    vocab = 519  # the demo LM: 263 byte-tokenizer ids + 256 VQ codes
    tokens = jax.random.randint(keys[0], (rows, seq), 0, vocab)
    labels = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones((rows, seq), bool)

    def build(impl):
        tuning = eqx_ring.KernelTuning(query_chunk_size=chunk, key_chunk_size=chunk, implementation=impl)
        spec = eqx_ring.AttentionSpec(layout="zigzag", tuning=tuning)
        return eqx_ring.RingTransformer(vocab, d_model, 4, 4, spec=spec, num_kv_heads=2, hidden_size=3 * d_model,
                                        remat_policy=None, key=keys[1])

    def loss_fn(model):
        hidden = jax.vmap(model)(tokens)
        return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, labels, mask)

    step = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))
    models = {impl: build(impl) for impl in ("pallas", "xla")}
    losses = {impl: float(step(m)[0]) for impl, m in models.items()}
    medians = interleaved_medians({impl: partial(step, m) for impl, m in models.items()}, reps)
    return [dict(impl=impl, step_ms=medians[impl] * 1e3, tokens_per_s=rows * seq / medians[impl], loss=losses[impl],
                 loss_rel_diff_vs_xla=abs(losses[impl] - losses["xla"]) / abs(losses["xla"])) for impl in models]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any backend (Pallas interpreted off GPU)")
    args = parser.parse_args()
    ring_shape, lm_shape, reps = (16384, 2, 16, 128), (1024, 8), args.reps
    if args.smoke:
        ring_shape, lm_shape, reps = (256, 1, 2, 16), (128, 2), 2
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    ring = ring_part(*ring_shape, reps)
    print(f"\nring_attention on one device: T={ring_shape[0]}, B={ring_shape[1]}, H={ring_shape[2]}, "
          f"D={ring_shape[3]}, bf16, causal")
    print(f"{'implementation':<24} {'fwd ms':>8} {'fwd+bwd ms':>11} {'fwd TF/s':>9} {'fwd+bwd TF/s':>13} "
          f"{'rel err':>8}")
    for r in ring:
        if "error" in r:
            print(f"{r['impl']:<24} {r['error']}")
        else:
            print(f"{r['impl']:<24} {r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>11.2f} {r['fwd_tflops']:>9.1f} "
                  f"{r['fwd_bwd_tflops']:>13.1f} {r['rel_err']:>8.1e}")
    lm = lm_part(*lm_shape, reps)
    print(f"\ndemo LM loss-and-gradient, one device: {lm_shape[1]} rows x {lm_shape[0]} tokens")
    print(f"{'implementation':<10} {'step ms':>8} {'tokens/s':>10} {'loss':>8} {'vs xla':>8}")
    for r in lm:
        print(f"{r['impl']:<10} {r['step_ms']:>8.2f} {r['tokens_per_s']:>10,.0f} {r['loss']:>8.4f} "
              f"{r['loss_rel_diff_vs_xla']:>8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, ring=ring, lm=lm), f, indent=1)


if __name__ == "__main__":
    main()
