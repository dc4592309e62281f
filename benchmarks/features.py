"""What each attention feature costs over plain causal attention, on the 8-device CPU mesh.

    python benchmarks/features.py                         # T = 8192, 5 interleaved rounds
    python benchmarks/features.py --seq 16384 --rounds 3 --json features.json
    python benchmarks/features.py --seq 1024 --rounds 1   # quick look

Causal ring attention (zigzag, the layout that balances causal work), B=1, H=8 query and 2 kv heads, D=64,
float32, chunks of 512 (or the zigzag half, if shorter), forward and forward+backward, against the same call
with one feature more: learnable sinks, a logit softcap of 30, chunked attention in chunks of T/4, dropout of
0.1. Times are medians of interleaved rounds (each round runs every row once), so machine drift hits all
rows alike; "× causal" is a row's time over the causal row's.
"""

import argparse
import json
import os
import statistics
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from _common import fwd_bwd, median_seconds

import eqx_ring

N_DEV, B, H, KV, D, CHUNK = 8, 1, 8, 2, 64, 512


def features(t: int) -> dict[str, dict]:
    """Row name -> the extra keyword arguments of `ring_attention`."""
    return {
        "causal": {},
        "+ sinks": {"sinks": jnp.linspace(-1.0, 1.0, H)},
        "+ softcap 30": {"logit_softcap": 30.0},
        f"+ chunks of {t // 4:,}": {"attention_chunk_size": t // 4},
        "+ dropout 0.1": {"dropout_rate": 0.1, "dropout_key": jax.random.key(1)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1, help="calls per round (their median is the round's time)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    t = args.seq
    chunk = min(CHUNK, t // N_DEV // 2)
    mesh = jax.make_mesh((N_DEV,), ("sp",), axis_types=(AxisType.Auto,))
    seq = NamedSharding(mesh, P(None, "sp"))
    keys = jax.random.split(jax.random.key(0), 4)
    q, ct = (jax.device_put(jax.random.normal(k, (B, t, H, D)), seq) for k in keys[:2])
    k, v = (jax.device_put(jax.random.normal(kk, (B, t, KV, D)), seq) for kk in keys[2:])

    calls = {}
    for name, extra in features(t).items():
        def attend(q, k, v, extra=extra):
            # Sinks and the dropout key are closed over: replicated constants on every device.
            return eqx_ring.ring_attention(q, k, v, axis_name="sp", layout="zigzag", causal=True,
                                           query_chunk_size=chunk, key_chunk_size=chunk, **extra)

        ring = jax.shard_map(attend, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
        calls[(name, "fwd")] = (jax.jit(ring), (q, k, v))
        calls[(name, "fwd+bwd")] = (jax.jit(fwd_bwd(ring)), (q, k, v, ct))
    for fn, call_args in calls.values():
        jax.block_until_ready(fn(*call_args))  # compile and warm up outside the timing
    times = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, (fn, call_args) in calls.items():
            times[key].append(median_seconds(lambda fn=fn, a=call_args: fn(*a), args.reps))
    medians = {key: statistics.median(ts) for key, ts in times.items()}

    print(f"T={t:,}, B={B}, H={H}/{KV} (q/kv), D={D}, float32, ring zigzag on {N_DEV} CPU devices, chunks {chunk}; "
          f"medians of {args.rounds} rounds")
    print(f"{'feature':<22}{'fwd':>10}{'× causal':>10}{'fwd+bwd':>10}{'× causal':>10}")
    rows = []
    for name in features(t):
        fwd, both = medians[(name, "fwd")], medians[(name, "fwd+bwd")]
        ratio_fwd, ratio_both = fwd / medians[("causal", "fwd")], both / medians[("causal", "fwd+bwd")]
        print(f"{name:<22}{fwd:>9.3f}s{ratio_fwd:>10.3f}{both:>9.3f}s{ratio_both:>10.3f}")
        rows.append(dict(feature=name, fwd_s=fwd, fwd_ratio=ratio_fwd, fwd_bwd_s=both, fwd_bwd_ratio=ratio_both,
                         fwd_rounds=times[(name, "fwd")], fwd_bwd_rounds=times[(name, "fwd+bwd")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(seq=t, rounds=args.rounds, chunk=chunk, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
