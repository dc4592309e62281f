"""How well the demo's VQ codes tell the shapes apart, before any LM is trained on them.

    python benchmarks/vq_codes.py --workdir /tmp/demo12            # the VQ a demo run saved (WORKDIR/vq.json)
    python benchmarks/vq_codes.py --train /tmp/vq512 --codebook-size 512 --vq-steps 1600   # train one first

Prints, for the held-out videos of the demo's `MovingShapes` (seed 1):

- the VQ's readback: the share of held-out reconstructions whose shape, colour and motion `describe_video` reads as
  their caption says (the ceiling of text→video, `models._demo.evaluate_vq`);
- a linear bag-of-codes probe: multinomial logistic regression from each video's code counts (log(1 + count) per
  code, both frames together) to its shape, fit on the training videos' codes (full batch, Adam, 1,500 steps) and
  scored on held-out ones. It ignores where the codes are, so it is a floor on what the codes say about the shape,
  and a yardstick for the LM's caption accuracy, which must learn the same thing from one pass over the data;
- with `--probe-sizes 1000,3000`, the same probe fit on only the first N training videos, for each N: how many
  labelled videos the codes need, beside the ~20,000 captioned ones the demo's LM sees.

With `--train DIR` it first trains the VQ as the demo would, with the flags' settings, in `DIR` (and saves it there
as `DIR/vq.json`), printing the training's wall time.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._demo import DemoConfig, encode, evaluate_vq, train_vq, videos
from models._zoo import load, save


def bag_of_codes(records: list[dict], codebook_size: int) -> np.ndarray:
    """log(1 + count) of each code in each record's `"codes"`, `[records, codebook_size]`."""
    counts = np.stack([np.bincount(r["codes"].reshape(-1), minlength=codebook_size) for r in records])
    return np.log1p(counts).astype(np.float32)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 1500) -> tuple[float, float]:
    """Train and held-out accuracy of a softmax regression (L2 1e-4), fit by full-batch Adam."""
    params = {"w": jnp.zeros((train_x.shape[1], classes)), "b": jnp.zeros(classes)}
    optimizer = optax.adam(1e-2)

    def loss(p):
        logits = train_x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean() + 1e-4 * (p["w"] ** 2).sum()

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)

    def accuracy(x, y):
        return float(((x @ params["w"] + params["b"]).argmax(-1) == y).mean())

    return accuracy(train_x, train_y), accuracy(test_x, test_y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", type=Path, help="a demo workdir holding vq.json / vq.eqx")
    source.add_argument("--train", type=Path, metavar="DIR", help="train a VQ with the settings below in DIR")
    defaults = DemoConfig()
    # These four apply with --train; a --workdir's VQ is read as it was trained.
    parser.add_argument("--codebook-size", type=int, default=defaults.vq.codebook_size)
    parser.add_argument("--hidden", type=int, default=defaults.vq.hidden)
    parser.add_argument("--vq-steps", type=int, default=defaults.vq_steps)
    parser.add_argument("--vq-learning-rate", type=float, default=defaults.vq_learning_rate)
    parser.add_argument("--train-videos", type=int, default=defaults.train_videos, help="videos the probe fits on")
    parser.add_argument("--eval-videos", type=int, default=2000, help="held-out videos it is scored on")
    parser.add_argument("--probe-sizes", type=lambda text: [int(n) for n in text.split(",") if n], default=[],
                        metavar="N,N,...",
                        help="also fit the probe on only the first N training videos, for each N (a learning curve)")
    args = parser.parse_args()

    vq = None if args.train else load(args.workdir / "vq")
    vq_config = vq.config if vq else dataclasses.replace(defaults.vq, codebook_size=args.codebook_size,
                                                         hidden=args.hidden)
    lm = dataclasses.replace(defaults.lm, codebook_size=vq_config.codebook_size, codes_per_frame=vq_config.grid**2)
    config = dataclasses.replace(defaults, vq=vq_config, lm=lm, vq_steps=args.vq_steps,
                                 vq_learning_rate=args.vq_learning_rate, train_videos=args.train_videos,
                                 eval_videos=args.eval_videos)
    if args.train:
        start = time.perf_counter()
        vq = train_vq(config, args.train, progress=False)
        print(f"trained the VQ ({args.vq_steps} steps) in {time.perf_counter() - start:.0f} s")
        save(args.train / "vq", vq)
    print(f"VQ: {vq.config.grid}x{vq.config.grid} codes per frame, codebook {vq.config.codebook_size}, hidden "
          f"{vq.config.hidden}")
    readback = evaluate_vq(vq, config)
    print("readback (held-out reconstructions, describe_video): "
          + ", ".join(f"{k} {v:.1%}" for k, v in readback.items()))
    train, held_out = encode(vq, videos(config, "train")), encode(vq, videos(config, "eval"))
    labels = [np.array([r["shape"][0] for r in records]) for records in (train, held_out)]
    train_x, held_out_x = bag_of_codes(train, vq.config.codebook_size), bag_of_codes(held_out, vq.config.codebook_size)
    fit, score = linear_probe(train_x, labels[0], held_out_x, labels[1], classes=3)
    print(f"linear bag-of-codes shape probe: {fit:.1%} on the {len(train)} training videos, {score:.1%} on "
          f"{len(held_out)} held-out ones (chance 33.3%)")
    for n in args.probe_sizes:
        _, score = linear_probe(train_x[:n], labels[0][:n], held_out_x, labels[1], classes=3)
        print(f"  fit on the first {n} training videos: {score:.1%} held out")


if __name__ == "__main__":
    main()
