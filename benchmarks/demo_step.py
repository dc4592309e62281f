"""Why the demo's LM stage runs at the speed it does: the machine's matmul rate, the step alone, and the input pipeline.

    python benchmarks/demo_step.py                 # the demo's LM as configured now, 8 simulated devices
    python benchmarks/demo_step.py --steps 12 --json demo_step.json
    python benchmarks/demo_step.py --d-model 128 --layers 4 --hidden-size 384   # the README's previous recipe
    python benchmarks/demo_step.py --seq-len 512 --batch-size 16 --skip-pipeline-and-vq   # other row shapes

Prints, in one run on the demo's (dp=4, sp=2) mesh:

- the f32 matmul rate of one device (2048³, median of 7), which sets what any step can reach on this machine;
- the LM train step on a fixed batch (no input pipeline), median seconds and tokens/s;
- the same loop drawing each batch from `global_packed_batches`, once with the pipeline's read options
  (each row's stream read in the caller's thread) and once with grain's defaults (16 threads reading 500 records
  ahead, per row stream), median seconds per step *including* the wait for the batch, and the process's threads;
- the VQ tokenizer's train step (the demo's batch of videos, fixed) data parallel over all 8 devices and on one
  device, median seconds.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx
import grain
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import data_pipelines._pipeline as pipeline
from data_pipelines import ByteTokenizer, global_packed_batches, process_rows, video_text_examples
from eqx_ring.sharding import BATCH_AXES, make_mesh, shard_params
from models import TrainConfig, VideoTextLM, VideoVQ, make_optimizer, make_train_step, vq_loss
from models._demo import DemoConfig, videos
from models._train import _device_batch


def matmul_rate() -> float:
    x = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def vq_step_seconds(config: DemoConfig, devices: list, steps: int) -> float:
    """Median seconds of the VQ's train step on a fixed batch, data parallel over `devices`."""
    mesh = make_mesh(dp=-1, fsdp=1, devices=devices)
    source = videos(config, "train")
    batch = {"video": np.stack([source[i]["frames"] for i in range(config.vq_batch)])}
    train_config = TrainConfig(batch_size=config.vq_batch, learning_rate=config.vq_learning_rate)
    vq = shard_params(VideoVQ(config.vq, key=jax.random.key(0)), mesh)
    optimizer = make_optimizer(train_config)
    step = make_train_step(lambda m, b: vq_loss(m, b["video"]), optimizer, train_config, mesh)
    state = shard_params(optimizer.init(eqx.filter(vq, eqx.is_array)), mesh)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        vq, state, metrics = step(vq, state, _device_batch(batch, mesh, config.vq_batch))
        float(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant, after two warm-ups")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--d-model", type=int, default=None, help="LM width (default: the demo's)")
    parser.add_argument("--layers", type=int, default=None, help="LM depth (default: the demo's)")
    parser.add_argument("--hidden-size", type=int, default=None, help="LM feed-forward width (default: the demo's)")
    parser.add_argument("--seq-len", type=int, default=None, help="LM row length (default: the demo's)")
    parser.add_argument("--batch-size", type=int, default=None, help="LM rows per step (default: the demo's)")
    parser.add_argument("--mesh", default=None, help='LM mesh "dp,fsdp,tp,sp" (default: the demo\'s)')
    parser.add_argument("--skip-pipeline-and-vq", action="store_true",
                        help="time the LM step on a fixed batch only")
    args = parser.parse_args()

    config = DemoConfig()
    sizes = {"d_model": args.d_model, "num_layers": args.layers, "hidden_size": args.hidden_size}
    lm_config = dataclasses.replace(config.lm, **{k: v for k, v in sizes.items() if v is not None})
    train = config.lm_train
    if args.seq_len is not None:
        train = dataclasses.replace(train, stages=(dataclasses.replace(train.stages[0], seq_len=args.seq_len),))
    if args.batch_size is not None:
        train = dataclasses.replace(train, batch_size=args.batch_size)
    config = dataclasses.replace(config, lm=lm_config, lm_train=train, mesh=args.mesh or config.mesh)
    mesh = make_mesh(config.mesh)
    rows, seq_len, ring = config.lm_train.batch_size, config.lm_train.stages[0].seq_len, mesh.shape["sp"]
    rng = np.random.default_rng(0)
    # Records as the demo's encoder writes them: 2 frames of 64 codes and a caption.
    records = [{"codes": rng.integers(0, config.vq.codebook_size, (config.num_frames, config.vq.grid**2)),
                "caption": "a red circle moves left", "num_shapes": 1} for _ in range(4000)]

    def batches():
        examples = video_text_examples(records, video_tokenizer=None, tasks=dict(config.tasks), seed=0,
                                       num_epochs=None, process_index=0, process_count=1)
        return iter(global_packed_batches(examples, seq_len=seq_len, batch_size=rows, pad_id=ByteTokenizer.pad_id,
                                          rows=process_rows(mesh, rows), layout=config.lm.attention.layout,
                                          ring_size=ring, vocab_size=config.lm.vocab_size))

    lm = shard_params(VideoTextLM(config.lm, mesh=mesh, key=jax.random.key(1)), mesh)
    optimizer = make_optimizer(config.lm_train)
    step = make_train_step(lambda m, b: m.loss(b, spmd_axis_name=BATCH_AXES), optimizer, config.lm_train, mesh)
    state = shard_params(optimizer.init(eqx.filter(lm, eqx.is_array)), mesh)

    def run(next_batch) -> tuple[float, int]:
        nonlocal lm, state
        times, threads = [], 0
        for i in range(args.steps + 2):
            start = time.perf_counter()
            batch = _device_batch(next_batch(), mesh, rows)
            lm, state, metrics = step(lm, state, batch)
            float(metrics["loss"])
            if i >= 2:
                times.append(time.perf_counter() - start)
            threads = max(threads, threading.active_count())
        return statistics.median(times), threads

    fixed = next(batches())
    result = {"matmul_gflops": matmul_rate(), "tokens_per_step": rows * seq_len, "mesh": dict(mesh.shape)}
    result["fixed_batch_s"], _ = run(lambda: fixed)
    tokens = result["tokens_per_step"]
    print(f"demo LM (d_model {config.lm.d_model}, {config.lm.num_layers} layers, hidden {config.lm.hidden_size}) on "
          f"{result['mesh']}, {rows} x {seq_len} tokens per step; f32 matmul {result['matmul_gflops']:.0f} GFLOP/s")
    if args.skip_pipeline_and_vq:
        print(f"  {'fixed batch (no pipeline)':<40} {result['fixed_batch_s']:.3f} s/step  "
              f"{tokens / result['fixed_batch_s']:>8,.0f} tokens/s")
        _write(result, args.json)
        return
    it = batches()
    result["pipeline_s"], result["pipeline_threads"] = run(lambda: next(it))
    # grain's default read options in the row streams, as before this script's change.
    pipeline._IN_CALLER, kept = grain.ReadOptions(), pipeline._IN_CALLER
    it = batches()
    result["grain_defaults_s"], result["grain_defaults_threads"] = run(lambda: next(it))
    pipeline._IN_CALLER = kept

    result["vq_all_devices_s"] = vq_step_seconds(config, jax.devices(), 3 * args.steps)
    result["vq_one_device_s"] = vq_step_seconds(config, jax.devices()[:1], 3 * args.steps)

    for name, key, threads in (("fixed batch (no pipeline)", "fixed_batch_s", None),
                               ("pipeline, rows read in the caller", "pipeline_s", "pipeline_threads"),
                               ("pipeline, grain default read options", "grain_defaults_s", "grain_defaults_threads")):
        extra = f", {result[threads]} Python threads" if threads else ""
        print(f"  {name:<40} {result[key]:.3f} s/step  {tokens / result[key]:>8,.0f} tokens/s{extra}")
    print(f"VQ tokenizer step, {config.vq_batch} videos of {config.num_frames} frames:")
    for name, key in (("data parallel over 8 devices", "vq_all_devices_s"), ("one device", "vq_one_device_s")):
        print(f"  {name:<40} {result[key] * 1e3:.1f} ms/step")
    _write(result, args.json)


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
