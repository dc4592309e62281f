"""The window-aware ring against the full ring: bytes each device sends and time, causal attention with a window.

    python benchmarks/window_ring.py --seq 32768 --json window_ring.json

Causal attention fwd+bwd with `sliding_window = T/8, T/4, T/2` (B=1, H=8, D=64, float32, chunks of 512, the
contiguous layout, 8 simulated CPU devices). The window-aware ring runs only the ring steps whose blocks a window can
see (`ceil((w - 1) / L)` of the n - 1, L = T/8 tokens per device); the full ring is the same kernel with every step
run (as before the window-aware ring, by patching its step count), whose extra steps the mask then skips block by
block, so both compute the same chunk pairs and the difference is the transfers and the steps. Bytes: what one
device sends through `ppermute`, counted in the traced program (each array's size times the trip count of the loops
around it). Time: median of --reps interleaved rounds, each program compiled first. Run it on a quiet machine.
"""

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from unittest import mock

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.extend.core
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from _common import fwd_bwd

import eqx_ring
from eqx_ring import _kernel

B, H, D, CHUNK, N = 1, 8, 64, 512, 8


def sent_bytes(jaxpr, mult: int = 1) -> int:
    """Bytes one device sends by `ppermute` in `jaxpr`, loops counted by their trip counts."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ppermute":
            total += mult * sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
        inner = mult * eqn.params["length"] if eqn.primitive.name == "scan" else mult
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += sent_bytes(sub, inner)
    return total


def program(t: int, window: int | None):
    jax.clear_caches()  # traced loops are cached per function: the full ring must be traced anew
    mesh = jax.make_mesh((N,), ("sp",), axis_types=(AxisType.Auto,))
    ring = partial(eqx_ring.ring_attention, axis_name="sp", layout="contiguous", causal=True, sliding_window=window,
                   query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    f = fwd_bwd(jax.shard_map(ring, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp")))
    sharding = NamedSharding(mesh, P(None, "sp"))
    args = [jax.device_put(jax.random.normal(jax.random.key(i), (B, t, H, D)), sharding) for i in range(4)]
    # The local sends sit inside shard_map: count them in its body, once per device.
    return jax.jit(f), args, sent_bytes(jax.make_jaxpr(f)(*args).jaxpr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    t = args.seq
    windows = [t // 8, t // 4, t // 2]
    full_steps = mock.patch.object(_kernel, "_steps", lambda settings, n, block_len: n - 1)
    runs = {}
    for window in windows:
        runs[(window, "window-aware")] = program(t, window)
        with full_steps:
            runs[(window, "full ring")] = program(t, window)
            jax.block_until_ready(runs[(window, "full ring")][0](*runs[(window, "full ring")][1]))
        jax.block_until_ready(runs[(window, "window-aware")][0](*runs[(window, "window-aware")][1]))
    times: dict = {key: [] for key in runs}
    for _ in range(args.reps):
        for key, (f, inputs, _) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*inputs))
            times[key].append(time.perf_counter() - start)
    print(f"Causal attention fwd+bwd with a sliding window, T={t:,}, {N} devices (L={t // N:,} per device), "
          f"contiguous, H={H}, D={D}, float32; median of {args.reps}")
    print(f"{'window':>8} {'ring':>13} {'MiB sent':>9} {'seconds':>8} {'bytes full/aware':>17} {'time full/aware':>16}")
    results = []
    for window in windows:
        aware, full = (window, "window-aware"), (window, "full ring")
        row = {"window": window}
        for key in (full, aware):
            seconds = statistics.median(times[key])
            row[key[1]] = {"bytes_sent": runs[key][2], "seconds": seconds}
            print(f"{window:>8,} {key[1]:>13} {runs[key][2] / 2**20:>9.1f} {seconds:>8.3f}", end="")
            print("" if key == full else f" {runs[full][2] / runs[aware][2]:>17.2f} "
                  f"{statistics.median(times[full]) / seconds:>16.2f}")
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq": t, "devices": N, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
