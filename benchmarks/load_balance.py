"""Causal load balance of the ring layouts: attention blocks each device computes at each ring step.

At ring step s, device d holds its own queries and the key/value block of device (d - s) mod n. The kernel
computes a (query chunk, key chunk) pair unless the mask hides it entirely; which pairs it skips is decided by
`eqx_ring._masks.classify` on the chunks' true positions, and this script calls that same function on the same
positions (`eqx_ring._layout.shard_positions`). A ring step lasts as long as its busiest device, so the cost of a
layout is the sum over steps of the per-step maximum; `max/mean` is that over the work actually needed. For the
contiguous layout it tends to (2n - 1)/n: at step s > 0 the s devices whose incoming block is all in their future idle
while the others compute a full block.

    python benchmarks/load_balance.py [--devices 4 8] [--seq-len 65536] [--chunk 512]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from eqx_ring._layout import shard_positions
from eqx_ring._masks import SKIP, MaskSpec, classify

LAYOUTS = ("contiguous", "zigzag", "striped")


def computed_blocks(layout: str, n: int, seq_len: int, chunk: int, spec: MaskSpec) -> np.ndarray:
    """`[step, device]` counts of the chunk pairs the kernel computes (not skipped)."""
    local = seq_len // n
    chunks = jnp.stack([shard_positions(d, local, layout, n).reshape(-1, chunk) for d in range(n)])  # [n, c, chunk]

    def kind(q, k):
        return classify(spec, q, k, None, None)

    pairs = jax.jit(jax.vmap(jax.vmap(kind, (None, 0)), (0, None)))  # [q chunks, k chunks]
    counts = np.zeros((n, n), np.int64)
    for step in range(n):
        for device in range(n):
            kinds = pairs(chunks[device], chunks[(device - step) % n])
            counts[step, device] = int((kinds != SKIP).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()
    spec = MaskSpec(causal=True, causal_block_size=1, sliding_window=None)
    print(f"causal attention, T={args.seq_len}, chunks of {args.chunk}: chunk pairs computed per device and ring step")
    print(f"{'n':>3} {'layout':<11} {'busiest/step':>13} {'mean/step':>10} {'max/mean':>9} {'(2n-1)/n':>9}"
          f" {'ring time vs zigzag':>20}")
    for n in args.devices:
        rows = {}
        for layout in LAYOUTS:
            counts = computed_blocks(layout, n, args.seq_len, args.chunk, spec)
            rows[layout] = (counts.max(axis=1).sum(), counts.mean(axis=1).sum())
        for layout, (busiest, mean) in rows.items():
            print(f"{n:>3} {layout:<11} {busiest / n:>13.1f} {mean / n:>10.1f} {busiest / mean:>9.3f}"
                  f" {(2 * n - 1) / n:>9.3f} {busiest / rows['zigzag'][0]:>19.2f}x")


if __name__ == "__main__":
    main()
