"""Throughput of the synthetic video-text pipeline: MovingShapes → patch codes → LWM sequences → packed batches.

    python benchmarks/data_pipeline.py                 # 0 and 2 workers, 20 s each after warm-up
    python benchmarks/data_pipeline.py --seconds 5

Videos of 8 frames of 32 × 32 pixels, `PatchQuantizer(patch=8)` (16 codes per frame), both tasks mixed,
packed into rows of 2048 tokens, batches of 8 rows. Examples are counted as packed segments and tokens as
non-padding tokens of the batches that come out, so the figures are what training would receive.
"""

import argparse
import time

import absl.flags

from data_pipelines import ByteTokenizer, MovingShapes, PatchQuantizer, packed_batches, video_text_examples


def measure(workers: int, seconds: float, warmup_batches: int) -> tuple[float, float, float]:
    examples = video_text_examples(
        MovingShapes(1_000_000, num_frames=8, size=32), video_tokenizer=PatchQuantizer(patch=8),
        tasks={"video_to_text": 1.0, "text_to_video": 1.0}, process_index=0, process_count=1,
    )
    dataset = packed_batches(examples, seq_len=2048, batch_size=8, pad_id=ByteTokenizer.pad_id,
                             num_workers=workers)
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    count = tokens = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(iterator)
        count += int(batch["segment_ids"].max(axis=1).sum())
        tokens += int((batch["segment_ids"] > 0).sum())
    if hasattr(iterator, "close"):
        iterator.close()
    return count / elapsed, tokens / elapsed, tokens / (count or 1)


def source_rate(seconds: float) -> float:
    """MovingShapes records drawn per second, alone (no tokenizing or packing)."""
    source = MovingShapes(1_000_000, num_frames=8, size=32)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        source[count]
        count += 1
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--warmup-batches", type=int, default=5)
    args = parser.parse_args()
    absl.flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    print(f"MovingShapes alone (8 x 32 x 32 RGB): {source_rate(min(args.seconds, 5.0)):,.0f} examples/s")
    print(f"{'workers':>8}{'examples/s':>13}{'tokens/s':>12}{'tokens/example':>16}")
    for workers in args.workers:
        ex_s, tok_s, per = measure(workers, args.seconds, args.warmup_batches)
        print(f"{workers:>8}{ex_s:>13,.0f}{tok_s:>12,.0f}{per:>16.1f}", flush=True)


if __name__ == "__main__":
    main()
