"""Per-device memory of causal attention fwd+bwd versus T: dense, blockwise and ring attention on n devices.

    python benchmarks/attention_memory.py --seq 4096 16384 65536 262144 --devices 1 2 4 8 --plot attention_memory.png

B=1, H=8, D=64, float32, chunks of 512, zigzag layout for the ring. Each program is compiled, not run:
the figure is XLA's temp size per device (scores, softmax statistics, gradients being built; the q/k/v
inputs and the outputs are excluded, and are T·H·D·4 bytes each, split over the ring). Dense and blockwise
attention hold the whole sequence on every device, whatever n, so they have one row each; ring attention
holds T/n of it. Dense rows above --max-dense-gib are not compiled (the T x T scores alone are 8·T²·4 bytes).
"""

import argparse
import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
from _common import fwd_bwd, temp_bytes

import eqx_ring

B, H, D, CHUNK = 1, 8, 64, 512
GIB = 2**30


def ring_bytes(n: int, t: int) -> int:
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    f = jax.shard_map(
        lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name="sp", layout="zigzag", causal=True,
                                                query_chunk_size=CHUNK, key_chunk_size=CHUNK),
        mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    shape = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32, sharding=NamedSharding(mesh, P(None, "sp")))
    return temp_bytes(fwd_bwd(f), *[shape] * 4)


def one_device_bytes(name: str, t: int) -> int:
    f = {"dense": lambda q, k, v: eqx_ring.dot_product_attention(q, k, v, causal=True),
         "blockwise": lambda q, k, v: eqx_ring.blockwise_attention(q, k, v, causal=True, query_chunk_size=CHUNK,
                                                                   key_chunk_size=CHUNK)}[name]
    shape = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)
    return temp_bytes(fwd_bwd(f), *[shape] * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-dense-gib", type=float, default=64.0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a log-log PNG here")
    args = parser.parse_args()

    rows: dict[str, list[int | None]] = {}
    rows["dense (any n)"] = [one_device_bytes("dense", t) if 8 * t * t * 4 <= args.max_dense_gib * GIB else None
                             for t in args.seq]
    rows["blockwise (any n)"] = [one_device_bytes("blockwise", t) for t in args.seq]
    for n in args.devices:
        rows[f"ring, n={n}"] = [ring_bytes(n, t) for t in args.seq]

    print(f"Causal attention fwd+bwd, per-device temp memory (B={B}, H={H}, D={D}, f32, chunks {CHUNK})")
    print(f"{'':<18}" + "".join(f"{f'T={t}':>13}" for t in args.seq))
    for name, sizes in rows.items():
        cells = "".join(f"{'-':>13}" if s is None else f"{s / 2**20:>9,.0f} MiB" for s in sizes)
        print(f"{name:<18}{cells}")
    ring1 = rows.get("ring, n=1")
    if ring1:
        for n in args.devices[1:]:
            ratio = ring1[-1] / rows[f"ring, n={n}"][-1]
            print(f"ring at T={args.seq[-1]}: n=1 needs {ratio:.2f}x the per-device memory of n={n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq": args.seq, "rows": rows}, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for name, sizes in rows.items():
            points = [(t, s / 2**20) for t, s in zip(args.seq, sizes, strict=True) if s is not None]
            ax.plot(*zip(*points, strict=True), "o-" if name.startswith("ring") else "s--", label=name,
                    linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="MiB per device (temp)",
               title="Causal attention fwd+bwd memory per device")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
