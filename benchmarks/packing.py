"""Our `PackIterDataset` against grain's `FirstFitPackIterDataset` / `BestFitPackIterDataset`, on the same examples.

    python benchmarks/packing.py            # 20,000 examples per case, rows of 2,048 tokens, best of 3 passes
    python benchmarks/packing.py --quick    # 2,000 examples, rows of 512, one pass

Examples are dicts of `"tokens"` (int32), `"loss_mask"` and `"vision_mask"` (bool), as `lwm_sequence` makes them,
of lengths drawn uniformly from [1, max_len]. Two cases: short examples (`max_len = seq_len / 4`, many per row)
and long ones (`max_len = 2 · seq_len`). grain's packers raise on an example longer than the row, so every packer
reads the long case's examples already cut into `seq_len` pieces (the script checks first that ours yields the
same rows from the uncut examples, which it splits itself). grain's rows carry per-key segment ids and positions
(`tokens_segment_ids`, ...); the timed pipeline renames them to our `"segment_ids"`/`"positions"`, as a switch
would have to.

Columns: examples/s and rows/s of one full pass (the best of `--reps`, the packers interleaved), rows emitted,
fill (non-padding tokens / all tokens), speed relative to ours, and what the rows are compared with ours:
"identical" (every array of every row), "same segments" (every example packed once, intact, positions from 0 in
each segment, but placed in other rows) or "DIFFERENT".
"""

import argparse
import time
from collections import Counter
from collections.abc import Callable

import grain
import grain.experimental as ge
import numpy as np

from data_pipelines import ByteTokenizer, PackIterDataset

KEYS = ("tokens", "loss_mask", "vision_mask")
PAD = ByteTokenizer.pad_id


def make_examples(count: int, max_len: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, count)
    return [{"tokens": rng.integers(0, 256, n).astype(np.int32), "loss_mask": rng.random(n) < 0.5,
             "vision_mask": np.full(n, i % 2 == 0)} for i, n in enumerate(lengths)]


def cut(examples: list[dict[str, np.ndarray]], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Each example as consecutive pieces of at most `seq_len` tokens, as our `overflow="split"` cuts it."""
    return [{k: v[at : at + seq_len] for k, v in ex.items()}
            for ex in examples for at in range(0, len(ex["tokens"]), seq_len)]


def ours(seq_len: int) -> Callable[[grain.IterDataset], grain.IterDataset]:
    return lambda parent: PackIterDataset(parent, seq_len, PAD)


def as_our_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A grain packer's row with our keys: its per-key segment ids and positions are the same for every key."""
    return {**{k: row[k] for k in KEYS}, "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"]}


def grain_packer(cls: type, seq_len: int, bins: int) -> Callable[[grain.IterDataset], grain.IterDataset]:
    def build(parent: grain.IterDataset) -> grain.IterDataset:
        packed = cls(parent, length_struct={k: seq_len for k in KEYS}, num_packing_bins=bins, shuffle_bins=False,
                     padding_struct={"tokens": PAD, "loss_mask": False, "vision_mask": False})
        return packed.map(as_our_row)

    return build


def segments(rows: list[dict[str, np.ndarray]]) -> Counter | None:
    """The packed segments as a multiset of their bytes, or None if a segment's positions do not restart at 0."""
    found = Counter()
    for row in rows:
        for s in range(1, int(row["segment_ids"].max()) + 1):
            where = row["segment_ids"] == s
            if not np.array_equal(row["positions"][where], np.arange(where.sum())):
                return None
            found[tuple(row[k][where].tobytes() for k in KEYS)] += 1
    return found


def compare(rows: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]) -> str:
    if len(rows) == len(reference) and all(a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
                                           for a, b in zip(rows, reference, strict=True)):
        return "identical"
    same = segments(rows)
    return "same segments" if same is not None and same == segments(reference) else "DIFFERENT"


def one_pass(build: Callable, examples: list) -> tuple[float, list[dict[str, np.ndarray]]]:
    parent = grain.MapDataset.source(examples).to_iter_dataset()
    start = time.perf_counter()
    rows = list(build(parent))
    return time.perf_counter() - start, rows


def run_case(name: str, raw: list, seq_len: int, packers: dict[str, Callable], reps: int) -> None:
    examples = cut(raw, seq_len)
    tokens = sum(len(e["tokens"]) for e in examples)
    print(f"{name}: {len(raw):,} examples ({len(examples):,} pieces of <= {seq_len}), {tokens:,} tokens")
    if len(examples) != len(raw):  # ours must not care whether the examples come cut or whole
        _, whole = one_pass(ours(seq_len), raw)
        _, pieces = one_pass(ours(seq_len), examples)
        assert compare(whole, pieces) == "identical", "our packer splits differently from cutting ahead"
        try:
            one_pass(packers["grain first-fit, 1 bin"], raw)
            print("  grain's first-fit packed the uncut examples too")
        except ValueError as error:
            print(f"  grain's first-fit on the uncut examples: ValueError ({str(error).split('. ')[0]})")
    best, rows = {}, {}
    for _ in range(reps):
        for label, build in packers.items():
            seconds, rows[label] = one_pass(build, examples)
            best[label] = min(best.get(label, np.inf), seconds)
    print(f"  {'packer':<25}{'examples/s':>12}{'rows/s':>10}{'rows':>8}{'fill':>8}{'speed vs ours':>15}  rows vs ours")
    reference = rows["ours (PackIterDataset)"]
    for label, seconds in best.items():
        fill = tokens / (len(rows[label]) * seq_len)
        ratio = best["ours (PackIterDataset)"] / seconds
        print(f"  {label:<25}{len(raw) / seconds:>12,.0f}{len(rows[label]) / seconds:>10,.0f}{len(rows[label]):>8,}"
              f"{fill:>8.3f}{ratio:>14.2f}x  {compare(rows[label], reference)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bins", type=int, nargs="+", default=[8, 64], help="grain's num_packing_bins besides 1")
    parser.add_argument("--quick", action="store_true", help="2,000 examples, rows of 512, one pass")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.seq_len, args.reps = 2_000, 512, 1
    seq_len = args.seq_len
    packers = {"ours (PackIterDataset)": ours(seq_len),
               "grain first-fit, 1 bin": grain_packer(ge.FirstFitPackIterDataset, seq_len, 1)}
    for bins in args.bins:
        packers[f"grain first-fit, {bins} bins"] = grain_packer(ge.FirstFitPackIterDataset, seq_len, bins)
        packers[f"grain best-fit, {bins} bins"] = grain_packer(ge.BestFitPackIterDataset, seq_len, bins)
    print(f"rows of {seq_len} tokens, best of {args.reps} pass(es); timings are of this machine as it is loaded")
    run_case(f"short (lengths 1..{seq_len // 4})", make_examples(args.examples, seq_len // 4, seed=0), seq_len,
             packers, args.reps)
    run_case(f"long (lengths 1..{2 * seq_len})", make_examples(args.examples, 2 * seq_len, seed=1), seq_len,
             packers, args.reps)


if __name__ == "__main__":
    main()
