"""Attention on one GPU: eqx-ring's fused Pallas kernel against cuDNN and eqx-ring's XLA blockwise path.

    python benchmarks/attention_gpu.py                       # T = 4K-32K, D = 64 and 128, bf16, causal and full
    python benchmarks/attention_gpu.py --seq 4096 --head-dims 128 --json gpu.json
    python benchmarks/attention_gpu.py --smoke               # tiny sizes on any backend: does the script run?

Every configuration holds 32K tokens x 2048 model width (B = 32768 / T; H = 2048 / D), bf16 inputs.
TFLOP/s counts fwd as 4·B·H·T²·D (half that when causal) and fwd+bwd as 3.5× fwd, the usual
FlashAttention convention, and is also shown as a fraction of the bf16 matmul rate measured in the
same run (an 8192³ product). Times are medians of interleaved repetitions, each read after
`block_until_ready`. Every implementation is first checked against a float32 dense reference on the
same inputs (||out − ref|| / ||ref||); a failed check is reported and its row is not timed.
cuDNN is `jax.nn.dot_product_attention(implementation="cudnn")`; the comparison is multi-head
attention (as many kv heads as query heads), causal or full, which every implementation supports.
The "vs cuDNN" column is the fwd+bwd rate over cuDNN's.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import fwd_bwd, median_seconds

import eqx_ring

TOKENS, WIDTH = 32768, 2048


def attention_fns(causal: bool):
    def pallas(q, k, v):
        return eqx_ring.blockwise_attention(q, k, v, causal=causal, implementation="pallas")

    def xla(q, k, v):
        return eqx_ring.blockwise_attention(q, k, v, causal=causal, implementation="xla")

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    fns = {"eqx-ring pallas": pallas, "eqx-ring xla": xla}
    if jax.default_backend() == "gpu":
        fns["cudnn"] = cudnn
    return fns


def reference(q, k, v, causal):
    """Dense float32 attention, one (batch element, head) at a time: its [T, T] scores fit (4 GiB at 32K)."""
    one = jax.jit(lambda q, k, v: eqx_ring.dot_product_attention(q, k, v, causal=causal))
    b, _, h, _ = q.shape
    return jnp.stack([jnp.concatenate([one(*(x[i : i + 1, :, j : j + 1].astype(jnp.float32) for x in (q, k, v)))[0]
                                       for j in range(h)], axis=1) for i in range(b)])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def matmul_tflops(n: int, reps: int) -> float:
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    return 2 * n**3 / median_seconds(lambda: f(a, b), reps) / 1e12


def run_config(t, d, causal, reps, tokens, width, check):
    b, h = max(1, tokens // t), width // d
    keys = jax.random.split(jax.random.key(t + d + causal), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(jnp.bfloat16) for kk in keys)
    flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
    rows, ready = [], {}
    ref = reference(q, k, v, causal) if check else None
    for name, f in attention_fns(causal).items():
        fwd = jax.jit(f)
        both = jax.jit(fwd_bwd(f))
        try:
            out = jax.block_until_ready(fwd(q, k, v))
            jax.block_until_ready(both(q, k, v, ct))
        except Exception as e:  # noqa: BLE001 - a backend that cannot run a config is a row, not a crash
            rows.append(dict(impl=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        err = rel(out, ref) if check else None
        if check and not err < 2e-2:
            rows.append(dict(impl=name, error=f"wrong result: rel err {err:.2e}"))
            continue
        ready[name] = (fwd, both, err)
    times = {name: {"fwd": [], "fwd_bwd": []} for name in ready}
    for _ in range(reps):  # interleaved: drift hits every implementation alike
        for name, (fwd, both, _) in ready.items():
            for kind, fn, args in (("fwd", fwd, (q, k, v)), ("fwd_bwd", both, (q, k, v, ct))):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name][kind].append(time.perf_counter() - t0)
    for name, (_, _, err) in ready.items():
        fwd_s, both_s = (statistics.median(times[name][kind]) for kind in ("fwd", "fwd_bwd"))
        rows.append(dict(impl=name, fwd_ms=fwd_s * 1e3, fwd_bwd_ms=both_s * 1e3, fwd_tflops=flops / fwd_s / 1e12,
                         fwd_bwd_tflops=3.5 * flops / both_s / 1e12, rel_err=err))
    return dict(seq=t, head_dim=d, causal=causal, batch=b, heads=h, rows=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-check", action="store_true", help="skip the float32 reference check")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any backend (Pallas interpreted off GPU)")
    args = parser.parse_args()
    tokens, width, mm = TOKENS, WIDTH, 8192
    if args.smoke:
        args.seq, args.head_dims, args.reps, tokens, width, mm = [128], [16], 2, 256, 32, 256
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    peak = matmul_tflops(mm, max(args.reps, 5))
    print(f"bf16 matmul {mm}^3: {peak:.1f} TFLOP/s")
    results = []
    for d in args.head_dims:
        for t in args.seq:
            for mask in args.masks:
                results.append(run_config(t, d, mask == "causal", args.reps, tokens, width, not args.no_check))
    print(f"\n{'T':>6} {'D':>4} {'mask':>6}  {'implementation':<16} {'fwd TF/s':>9} {'fwd+bwd TF/s':>13} "
          f"{'of matmul':>9} {'vs cuDNN':>9} {'rel err':>8}")
    for r in results:
        cudnn = next((x for x in r["rows"] if x["impl"] == "cudnn" and "error" not in x), None)
        for x in r["rows"]:
            head = f"{r['seq']:>6} {r['head_dim']:>4} {'causal' if r['causal'] else 'full':>6}  {x['impl']:<16}"
            if "error" in x:
                print(f"{head} {x['error']}")
                continue
            ratio = f"{x['fwd_bwd_tflops'] / cudnn['fwd_bwd_tflops']:.2f}x" if cudnn else "-"
            err = "-" if x["rel_err"] is None else f"{x['rel_err']:.1e}"
            print(f"{head} {x['fwd_tflops']:>9.1f} {x['fwd_bwd_tflops']:>13.1f} "
                  f"{x['fwd_bwd_tflops'] / peak:>9.0%} {ratio:>9} {err:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, matmul_tflops=peak,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
