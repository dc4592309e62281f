"""Attention on an 8-device CPU mesh: eqx-ring against the seed `ringattention`, dense XLA and jax.nn.

    python benchmarks/attention_cpu.py                 # causal f32, T = 8192, 16384 timed; memory at 8K-32K
    python benchmarks/attention_cpu.py --seq 4096 8192 --masks causal full --dtypes f32 bf16 --json attn.json
    python benchmarks/attention_cpu.py --seq 4096 --mem-seq 4096 --reps 2   # quick look

B=1, H=8, D=64, query/key chunks of 512 for every blockwise implementation; causal or full (no mask);
float32 or bfloat16 inputs. Times are medians of interleaved repetitions (each round runs every
implementation once), so machine drift hits all rows alike. GFLOP/s counts fwd as 4·T²·H·D (half that
when causal) and fwd+bwd as 3.5× fwd, and is shown as a fraction of the matmul throughput (same dtype)
the same device set reaches in this run. Memory is XLA's compiled temp size per device (causal, f32).
The seed is `ringattention==0.1.2` (pip install -e ".[bench]"); its package __init__ fails on
current JAX, so its `ringattention_jax.py` is loaded by path.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from _common import fmt_bytes, fwd_bwd, median_seconds, temp_bytes

import eqx_ring

N_DEV, B, H, D, CHUNK = 8, 1, 8, 64, 512
LAYOUTS = ("contiguous", "zigzag", "striped")


def load_seed():
    spec = importlib.util.find_spec("ringattention")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "ringattention_jax.py")
    file_spec = importlib.util.spec_from_file_location("seed_ringattention_jax", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def implementations(mesh, seed, causal=True, dtype=jnp.float32):
    """name -> (attention function of global [B, T, H, D] arrays, device set)."""
    seq = P(None, "sp")
    impls = {}
    for layout in LAYOUTS if causal else ("contiguous",):  # without a mask every layout does the same work
        # Inputs are already in `layout` (the data pipeline permutes once), so nothing is permuted here.
        impls[f"ring {layout}"] = (jax.shard_map(
            lambda q, k, v, layout=layout: eqx_ring.ring_attention(
                q, k, v, axis_name="sp", layout=layout, causal=causal, query_chunk_size=CHUNK,
                key_chunk_size=CHUNK),
            mesh=mesh, in_specs=seq, out_specs=seq), "mesh")
    if seed is not None:
        kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                      query_chunk_size=CHUNK, key_chunk_size=CHUNK, policy=jax.checkpoint_policies.nothing_saveable,
                      dtype=dtype, precision=None, prevent_cse=True)
        impls["seed ringattention"] = (jax.shard_map(
            lambda q, k, v: seed.ring_attention(q, k, v, None, None, None, "sp", causal, kwargs),
            mesh=mesh, in_specs=seq, out_specs=seq, check_vma=False), "mesh")
    impls["blockwise (1 device)"] = (lambda q, k, v: eqx_ring.blockwise_attention(
        q, k, v, causal=causal, query_chunk_size=CHUNK, key_chunk_size=CHUNK), "one")
    impls["dense XLA (1 device)"] = (lambda q, k, v: eqx_ring.dot_product_attention(q, k, v, causal=causal), "one")
    impls["jax.nn.dpa (1 device)"] = (lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla"), "one")
    return impls


def inputs(t, where, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    arrays = [jax.random.normal(kk, (B, t, H, D), dtype) for kk in keys]
    return [jax.device_put(a, where) for a in arrays]


def matmul_gflops(mesh, one, reps, dtype=jnp.float32):
    """Throughput of a plain matmul in `dtype`, per device set (all 8 devices at once, or one)."""
    n = 1024
    a = jax.device_put(jnp.ones((N_DEV, n, n), dtype), NamedSharding(mesh, P("sp")))
    mm8 = jax.jit(jax.shard_map(lambda x: x @ x, mesh=mesh, in_specs=P("sp"), out_specs=P("sp")))
    b = jax.device_put(jnp.ones((2 * n, 2 * n), dtype), one)
    mm1 = jax.jit(lambda x: x @ x)
    mm8(a).block_until_ready(), mm1(b).block_until_ready()
    return {"mesh": 2 * N_DEV * n**3 / median_seconds(lambda: mm8(a), reps) / 1e9,
            "one": 2 * (2 * n) ** 3 / median_seconds(lambda: mm1(b), reps) / 1e9}


DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def time_rows(impls, t, where, dtype, causal, peak, reps, max_temp, mem):
    """(T, mask, dtype, pass, name, median s, fraction of matmul peak) rows, interleaved rounds."""
    runs, rows = {}, []
    for name, (f, dev) in impls.items():
        if mem.get((name, t), 0) > max_temp * 2**30:
            rows.append((t, name, None))
            continue
        q, k, v, ct = inputs(t, where[dev], dtype)
        for mode, g in (("fwd", jax.jit(f)), ("fwd+bwd", jax.jit(fwd_bwd(f)))):
            call = (lambda g=g, q=q, k=k, v=v: g(q, k, v)) if mode == "fwd" else (
                lambda g=g, q=q, k=k, v=v, ct=ct: g(q, k, v, ct))
            jax.block_until_ready(call())  # compile and warm up
            runs[name, mode] = (call, dev, [])
    for _ in range(reps):  # interleaved rounds
        for call, _, times in runs.values():
            times.append(median_seconds(call, 1))
    flops = {"fwd": 4 * B * H * D * t * t / (2 if causal else 1)}
    flops["fwd+bwd"] = 3.5 * flops["fwd"]
    return [(t, name, mode, statistics.median(times), flops[mode] / statistics.median(times) / 1e9 / peak[dev])
            for (name, mode), (_, dev, times) in runs.items()] + rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="*", default=[8192, 16384], help="sequence lengths to time")
    ap.add_argument("--mem-seq", type=int, nargs="+", default=[8192, 16384, 32768], help="lengths for memory")
    ap.add_argument("--masks", nargs="+", default=["causal"], choices=["causal", "full"])
    ap.add_argument("--dtypes", nargs="+", default=["f32"], choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impls", nargs="+", help="only implementations whose name contains one of these words")
    ap.add_argument("--max-temp-gib", type=float, default=12.0, help="skip timing a program needing more temp")
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args()

    mesh = jax.make_mesh((N_DEV,), ("sp",), axis_types=(AxisType.Auto,))
    where = {"mesh": NamedSharding(mesh, P(None, "sp")), "one": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    seed = load_seed()
    if seed is None:
        print("seed ringattention not installed (pip install -e '.[bench]'): its rows are left out")

    def select(impls):
        return {k: f for k, f in impls.items() if not args.impls or any(w in k for w in args.impls)}

    peaks = {d: matmul_gflops(mesh, where["one"], args.reps, DTYPES[d]) for d in args.dtypes}
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices on {os.cpu_count()} cores; matmul GFLOP/s: "
          + "; ".join(f"{d} {p['mesh']:.1f} on the 8-device mesh, {p['one']:.1f} on one device"
                      for d, p in peaks.items()))

    # Memory (causal, f32): compile only, nothing runs. Timed lengths too: their size decides what may run.
    impls = select(implementations(mesh, seed))
    mem = {}
    for t in sorted(set(args.mem_seq) | set(args.seq)):
        for name, (f, dev) in impls.items():
            shapes = [jax.ShapeDtypeStruct((B, t, H, D), jnp.float32, sharding=where[dev])] * 4
            mem[name, t] = temp_bytes(fwd_bwd(f), *shapes)

    results = []
    for dtype in args.dtypes:
        for mask in args.masks:
            impls = select(implementations(mesh, seed, causal=mask == "causal", dtype=DTYPES[dtype]))
            for t in args.seq:
                for row in time_rows(impls, t, where, DTYPES[dtype], mask == "causal", peaks[dtype], args.reps,
                                     args.max_temp_gib, mem):
                    results.append({"T": row[0], "mask": mask, "dtype": dtype, "impl": row[1],
                                    "pass": row[2] if len(row) > 3 else None,
                                    "seconds": row[3] if len(row) > 3 else None,
                                    "of_peak": row[4] if len(row) > 3 else None})

    print(f"\n{'T':>6} {'mask':6} {'dtype':5} {'pass':8} {'implementation':22} {'median s':>9} {'vs seed':>8}"
          f" {'of matmul peak':>15}")
    key = lambda r: (r["dtype"], r["mask"], r["T"], r["pass"] or "")  # noqa: E731
    for r in sorted(results, key=key):
        head = f"{r['T']:>6} {r['mask']:6} {r['dtype']:5}"
        if r["seconds"] is None:
            print(f"{head} {'-':8} {r['impl']:22} {'skipped: temp memory > --max-temp-gib':>34}")
            continue
        ref = next((x["seconds"] for x in results if key(x) == key(r) and x["impl"] == "seed ringattention"), None)
        ratio = f"{ref / r['seconds']:7.2f}x" if ref else "       -"
        print(f"{head} {r['pass']:8} {r['impl']:22} {r['seconds']:9.3f} {ratio} {r['of_peak']:14.1%}")

    print(f"\nPer-device compiled temp memory of causal fwd+bwd (B={B}, H={H}, D={D}, f32)")
    print(f"{'implementation':22} " + " ".join(f"{'T=' + str(t):>14}" for t in args.mem_seq) + "   vs seed at T="
          + str(args.mem_seq[-1]))
    last = args.mem_seq[-1]
    for name in dict.fromkeys(n for n, _ in mem):
        ref = mem.get(("seed ringattention", last))
        ratio = f"{mem[name, last] / ref:.2f}x" if ref else "-"
        print(f"{name:22} " + " ".join(f"{fmt_bytes(mem[name, t]):>14}" for t in args.mem_seq) + f"   {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "peaks_gflops": peaks, "rows": results,
                       "memory": [{"impl": n, "T": t, "bytes": b} for (n, t), b in mem.items()]}, f, indent=2)


if __name__ == "__main__":
    main()
