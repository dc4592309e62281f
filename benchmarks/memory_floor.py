"""The memory floor of ring attention and of a train step, beside what XLA compiles, per device.

    python benchmarks/memory_floor.py --json memory_floor.json

Everything is compiled ahead of time on 8 simulated CPU devices (nothing runs); a footprint is XLA's
`memory_analysis()`: arguments + outputs + temp, minus what outputs alias (donated inputs).

1. Causal ring attention fwd+bwd, `(q, k, v, dO) -> (dq, dk, dv)` (B=1, H=8, D=64, float32, zigzag, chunks of 512,
   8 devices), for each `kv_pieces` (`ring_attention(kv_pieces=m)`: each device's key/value block goes round the ring
   in m pieces). The floor is what the algorithm cannot avoid on one device, for L = T/8 local tokens:
   q, o, dO, dq (L·H·D each), k, v, dk, dv (L·Hkv·D each), the log-sum-exp (L·H floats), and in flight, the key/value
   piece in hand and the one arriving (2 × 2 × L/m·Hkv·D) and their float32 gradient accumulators (the same again).
   With whole blocks (m = 1) the last accumulator to arrive is the device's dk/dv, so dk, dv are not counted again.
   With the inputs donated (`donate_argnums`, as a train step frees them) dk, dv can take k, v's place piece by
   piece, and whole blocks can travel themselves, so that floor is lower. Measured without and with donation, and
   the longest T that fits --budget GiB (a multiple of 8·m·1024; doubling, then bisection to 1/16).
2. One train step of the Table 3 model (`benchmarks/max_context.py`: 2 layers, d_model 512, 8 heads, SwiGLU 2048,
   vocab 1024, float32 master weights and AdamW, remat "nothing_saveable"; the loss in vocab chunks of 128, so that
   its logits, [tokens per device, chunk], stay below one activation) at T = 1,048,576 on 8 devices. Its floor:
   parameters, gradients and both AdamW moments (4 × 4 bytes a parameter), the saved input of every layer (L·d
   each), and one layer's backward: the attention floor above as for donated inputs (the layer's k and v are its
   own) plus the cotangents of the layer's output and input (2 × L·d). Again with bfloat16 compute from the same
   float32 master weights (as `TrainConfig(compute_dtype="bfloat16")` trains): activations and their floor take 2
   bytes an element.
"""

import argparse
import functools
import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import max_context
from _common import fwd_bwd

import eqx_ring

B, H, D, CHUNK, N = 1, 8, 64, 512, 8
GIB = 2**30


def attention_floor(t: int, pieces: int, *, heads: int = H, kv_heads: int = H, head_dim: int = D, n: int = N,
                    itemsize: int = 4, donated: bool = False) -> dict[str, int]:
    """The bytes per device that causal ring attention fwd+bwd cannot avoid, by component.

    With whole blocks travelling (`pieces == 1`) the last dk/dv accumulator to arrive is this device's dk/dv. With
    donated inputs (or inside a train step, where k and v are the layer's own temporaries) dk/dv can take k/v's
    place piece by piece, each piece once its ring is done, and whole blocks can travel themselves.
    """
    local = t // n
    q_size, kv_size = local * heads * head_dim * itemsize, local * kv_heads * head_dim * itemsize
    piece = kv_size // pieces
    travelling = n > 1
    whole = travelling and pieces == 1
    return {
        "q, o, dO, dq": 4 * q_size,
        "k, v": 0 if whole and donated else 2 * kv_size,
        "dk, dv": 0 if whole or donated else 2 * kv_size,
        "log-sum-exp": local * heads * 4,
        "k/v pieces in flight (2)": 2 * 2 * piece if travelling else 0,
        "their dk/dv accumulators (2, float32)": 2 * 2 * piece * 4 // itemsize if travelling else 0,
    }


def attention_footprint(t: int, pieces: int, *, donate: bool) -> int:
    mesh = jax.make_mesh((N,), ("sp",), axis_types=(AxisType.Auto,))
    ring = functools.partial(eqx_ring.ring_attention, axis_name="sp", layout="zigzag", causal=True,
                             query_chunk_size=CHUNK, key_chunk_size=CHUNK, kv_pieces=pieces)
    f = jax.shard_map(ring, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    shape = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32, sharding=NamedSharding(mesh, P(None, "sp")))
    compiled = jax.jit(fwd_bwd(f), donate_argnums=(0, 1, 2, 3) if donate else ()).lower(*[shape] * 4).compile()
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


def longest_fitting(pieces: int, budget: float, *, donate: bool) -> int:
    """The longest T (a multiple of N·pieces·1024) whose footprint fits `budget` GiB."""
    unit = N * max(pieces, 2) * 1024
    sizes: dict[int, int] = {}

    def fits(units: int) -> bool:
        if units not in sizes:
            sizes[units] = attention_footprint(units * unit, pieces, donate=donate)
        return sizes[units] <= budget * GIB

    lo, hi = 0, 64
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit


def train_step_floor(t: int, pieces: int, args) -> dict[str, int]:
    d, layers, vocab, hidden = args.d_model, args.layers, args.vocab, 4 * args.d_model
    params = 2 * vocab * d + layers * (4 * d * d + 3 * d * hidden + 2 * d) + d
    local = t // N
    itemsize = jnp.dtype(args.compute_dtype).itemsize
    activation = local * d * itemsize
    return {
        "parameters, gradients, AdamW moments": 4 * params * 4,
        f"saved inputs of {layers} layers": layers * activation,
        "one layer's attention floor": sum(attention_floor(t, pieces, heads=args.heads, kv_heads=args.heads,
                                                           head_dim=d // args.heads, itemsize=itemsize,
                                                           donated=True).values()),
        "the cotangents of the layer's output and input": 2 * activation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2**20, help="T of the footprint rows (default 1,048,576)")
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--budget", type=float, default=4.0, help="GiB per device for the longest T")
    parser.add_argument("--search-pieces", type=int, nargs="*", default=[1, 8],
                        help="kv_pieces whose longest T is searched (slow: a compile per step)")
    parser.add_argument("--vocab-chunk", type=int, default=128,
                        help="the train step's loss vocab_chunk_size: its logits are [tokens per device, this]")
    parser.add_argument("--compute-dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"],
                        help="the train step's compute dtypes (master weights and AdamW stay float32)")
    parser.add_argument("--skip-attention", action="store_true", help="only the train step")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results: dict = {"seq": args.seq, "budget_gib": args.budget, "attention": {}, "train_step": {}}

    if not args.skip_attention:
        print(f"Causal ring attention fwd+bwd, B={B}, H={H}, D={D}, float32, {N} devices, T={args.seq:,}, per device")
        print(f"{'kv_pieces':>9} {'floor':>10} {'measured':>10} {'ratio':>6} {'floor':>10} {'donated':>10} "
              f"{'ratio':>6}")
        for pieces in args.pieces:
            floor, floor_donated = (attention_floor(args.seq, pieces, donated=d) for d in (False, True))
            kept = attention_footprint(args.seq, pieces, donate=False)
            donated = attention_footprint(args.seq, pieces, donate=True)
            total, total_donated = sum(floor.values()), sum(floor_donated.values())
            results["attention"][pieces] = {"floor": floor, "measured": kept, "floor_donated": floor_donated,
                                            "measured_donated": donated}
            print(f"{pieces:>9} {total / GIB:>6.2f} GiB {kept / GIB:>6.2f} GiB {kept / total:>6.2f} "
                  f"{total_donated / GIB:>6.2f} GiB {donated / GIB:>6.2f} GiB {donated / total_donated:>6.2f}",
                  flush=True)
        print("floor of kv_pieces=1: " + ", ".join(f"{k} {v / GIB:.3f} GiB"
                                                    for k, v in attention_floor(args.seq, 1).items()))
        for pieces in args.search_pieces:
            for donate in (False, True):
                longest = longest_fitting(pieces, args.budget, donate=donate)
                results["attention"].setdefault(pieces, {})[f"longest_t_{'donated' if donate else 'kept'}"] = longest
                print(f"longest T within {args.budget:g} GiB, kv_pieces={pieces}, inputs "
                      f"{'donated' if donate else 'kept'}: {longest:,}", flush=True)

    for compute in args.compute_dtypes:
        step_args = argparse.Namespace(vocab=1024, d_model=512, layers=2, heads=8, chunk=CHUNK, ffn_chunk=2048,
                                       vocab_chunk=args.vocab_chunk, compute_dtype=compute)
        print(f"\nTrain step (Table 3 model, {compute} compute, float32 master weights and AdamW, remat "
              f"nothing_saveable, loss vocab chunks of {args.vocab_chunk}), {N} devices, T={args.seq:,}")
        for pieces in args.pieces:
            step_args.kv_pieces = pieces
            floor = train_step_floor(args.seq, pieces, step_args)
            measured = max_context.step_bytes("ring attention", N, args.seq, step_args)
            results["train_step"].setdefault(compute, {})[pieces] = {"floor": floor, "measured": measured}
            print(f"kv_pieces={pieces}: floor {sum(floor.values()) / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB "
                  f"({measured / sum(floor.values()):.2f}x)", flush=True)
        print("floor of kv_pieces=8: " + ", ".join(f"{k} {v / GIB:.3f} GiB"
                                                    for k, v in train_step_floor(args.seq, 8, step_args).items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
