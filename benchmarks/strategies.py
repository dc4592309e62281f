"""The four ways to split attention over devices, side by side: memory, bytes moved and time per device.

    python benchmarks/strategies.py --json strategies.json

Causal attention fwd+bwd, returning the output and dq, dk, dv (B=1, D=64, float32, zigzag layout, chunks of 512),
on 8 simulated CPU devices with `ring_attention(strategy=...)`: `"ring"`, `"allgather"` (one kv head's keys and
values gathered at a time, the default `kv_pieces`), `"ulysses"` (all-to-all over the 8 devices) and `"hybrid"`
(all-to-all within groups of 4 on axis "usp", a ring of 2 groups on "sp"), for 32 query heads over 8 kv heads
(GQA) and over 32 (MHA), at each --seqs.

- Memory: per-device arguments + outputs + temporaries of the compiled program (`memory_analysis()`).
- Bytes moved: what one device sends, read from the compiled HLO's collectives (each collective's size times the
  trip counts of the loops around it): a collective-permute sends its operand; an all-gather, all-to-all or
  reduce-scatter over a group of g devices sends (g - 1) / g of the gathered / exchanged / reduced (unscattered)
  array; an all-reduce 2 (g - 1) / g of it (a ring all-reduce).
- Time: median of --reps interleaved rounds, each program compiled and run once first (not with --no-warmup), for
  the lengths in --time-seqs only (one fwd+bwd at 32K tokens and 32 heads takes minutes on 2 cores). Run it on a
  quiet machine.
"""

import argparse
import json
import re
import statistics
import time
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_ring

B, D, CHUNK, N, LAYOUT = 1, 64, 512, 8, "zigzag"
STRATEGIES = ("ring", "allgather", "ulysses", "hybrid")
HEADS = {"GQA 32/8": (32, 8), "MHA 32": (32, 32)}
HYBRID = (2, 4)  # ring of 2 groups × all-to-all within 4 devices

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(collective-permute|all-gather|all-to-all|reduce-scatter|all-reduce)"
                         r"(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _array_bytes(shapes: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shapes):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    return len(listed.group(1).split(",")) if listed else N


def sent_bytes(hlo: str) -> int:
    """Bytes one device sends through the collectives of a compiled HLO module, loops counted by their trip counts."""
    bodies: dict[str, list[str]] = {}
    name, entry = None, None
    for line in hlo.splitlines():
        header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{$", line.strip())
        if header:
            name = header.group(2)
            bodies[name] = []
            entry = name if header.group(1) else entry
        elif name is not None:
            bodies[name].append(line)

    def total(comp: str) -> float:
        sent = 0.0
        for line in bodies.get(comp, []):
            found = _COLLECTIVE.search(line)
            if found:
                size, op, g = _array_bytes(found.group(1)), found.group(2), _group_size(line)
                if op == "reduce-scatter":  # its result is one device's 1/g of the reduced array
                    size *= g
                sent += size if op == "collective-permute" else size * (g - 1) / g * (2 if op == "all-reduce" else 1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body = re.search(r"body=%?([\w.\-]+)", line)
            if body:
                sent += (int(trips.group(1)) if trips else 1) * total(body.group(1))
            for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                sent += total(callee)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                sent += max(total(b.strip().lstrip("%")) for b in branches.group(1).split(","))
        return sent

    return int(total(entry))


def program(strategy: str, t: int, heads: tuple[int, int]):
    """(compiled fwd+bwd, its inputs' shapes) for one strategy."""
    if strategy == "hybrid":
        mesh = jax.make_mesh(HYBRID, ("sp", "usp"), axis_types=(AxisType.Auto,) * 2)
        axis = ("sp", "usp")
    else:
        mesh, axis = jax.make_mesh((N,), ("sp",), axis_types=(AxisType.Auto,)), "sp"
    attend = partial(eqx_ring.ring_attention, axis_name=axis, layout=LAYOUT, causal=True, strategy=strategy,
                     query_chunk_size=CHUNK, key_chunk_size=CHUNK)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=P(None, axis), out_specs=P(None, axis))

    def f(q, k, v, ct):  # the output too, as in a train step where it feeds the next layer
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(ct)

    sharding = NamedSharding(mesh, P(None, axis))
    hq, hk = heads
    shapes = [jax.ShapeDtypeStruct((B, t, h, D), jnp.float32, sharding=sharding) for h in (hq, hk, hk, hq)]
    return jax.jit(f).lower(*shapes).compile(), shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--time-seqs", type=int, nargs="*", default=[8192], help="the lengths to time")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the first run after compiling (where one run takes minutes, a warm-up run "
                             "doubles the wall time)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows, timed = [], {}
    for t in args.seqs:
        for label, heads in HEADS.items():
            for strategy in STRATEGIES:
                compiled, shapes = program(strategy, t, heads)
                mem = compiled.memory_analysis()
                row = {"seq": t, "heads": label, "strategy": strategy, "sent_bytes": sent_bytes(compiled.as_text()),
                       "memory_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes}
                rows.append(row)
                if t in args.time_seqs:
                    inputs = [jax.device_put(jax.random.normal(jax.random.key(i), s.shape), s.sharding)
                              for i, s in enumerate(shapes)]
                    if not args.no_warmup:
                        jax.block_until_ready(compiled(*inputs))
                    timed[len(rows) - 1] = (compiled, inputs, [])
    for _ in range(args.reps):
        for compiled, inputs, times in timed.values():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - start)
    for i, (_, _, times) in timed.items():
        rows[i]["seconds"] = statistics.median(times)
    print(f"Causal attention fwd+bwd, {N} devices, B={B}, D={D}, float32, {LAYOUT}; hybrid = ring of {HYBRID[0]} × "
          f"all-to-all in {HYBRID[1]}; median of {args.reps}; ratios against the ring of the same row group")
    print(f"{'T':>8} {'heads':>9} {'strategy':>10} {'memory MiB':>11} {'/ring':>6} {'sent MiB':>9} {'/ring':>6} "
          f"{'seconds':>8} {'/ring':>6}")
    for row in rows:
        ring = next(r for r in rows if (r["seq"], r["heads"], r["strategy"]) == (row["seq"], row["heads"], "ring"))
        seconds = row.get("seconds")
        timing = f"{seconds:>8.2f} {seconds / ring['seconds']:>6.2f}" if seconds else f"{'-':>8} {'-':>6}"
        print(f"{row['seq']:>8,} {row['heads']:>9} {row['strategy']:>10} {row['memory_bytes'] / 2**20:>11.1f} "
              f"{row['memory_bytes'] / ring['memory_bytes']:>6.2f} {row['sent_bytes'] / 2**20:>9.1f} "
              f"{row['sent_bytes'] / ring['sent_bytes']:>6.2f} {timing}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": N, "head_dim": D, "layout": LAYOUT, "hybrid": HYBRID, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
