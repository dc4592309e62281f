"""The `eqx-ring` command: demo, train (VQ and LM stages), eval, caption and generate."""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path


def _stages(text: str):
    from ._train import Stage

    stages = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) not in (2, 3):
            raise argparse.ArgumentTypeError(f"a stage is SEQ_LEN:STEPS[:ROPE_THETA], got {part!r}")
        stages.append(Stage(int(fields[0]), int(fields[1]), float(fields[2]) if len(fields) == 3 else None))
    return tuple(stages)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqx-ring",
        description="Train and use the eqx-ring video-text model (ring attention, Equinox, grain).",
    )
    parser.add_argument("--cpu-devices", type=int, default=8, metavar="N",
                        help="CPU devices to simulate (per process) when running on the CPU (default: %(default)s)")
    multi = parser.add_argument_group(
        "multi-process runs", "Run the same command in every process (one per host); each builds the same global "
                              "mesh from every process's devices. The workdir must be shared.")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (jax.distributed)")
    multi.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process run whose settings JAX finds itself (JAX_COORDINATOR_ADDRESS; "
                            "Slurm, Open MPI, Cloud TPU pods, Kubernetes)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--workdir", type=Path, default=Path("eqx-ring-demo"),
                         help="where models, checkpoints, metrics and plots live (default: %(default)s)")
        return sub

    def recipe(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--frames", type=int, help="frames per video")
        sub.add_argument("--max-shapes", type=int, help="up to this many shapes per MovingShapes video")
        sub.add_argument("--train-videos", type=int, help="training videos")
        sub.add_argument("--eval-videos", type=int, help="held-out videos")
        sub.add_argument("--seed", type=int)
        sub.add_argument("--mesh", help="dp,fsdp,tp,sp sizes as in LWM, e.g. 2,1,1,4 (one may be -1)")
        sub.add_argument("--vq-steps", type=int, help="VQ training steps")
        sub.add_argument("--stages", type=_stages, metavar="SEQ:STEPS[:THETA],...",
                         help="LM context-extension schedule, e.g. 1024:400,2048:100:50000")
        sub.add_argument("--batch-size", type=int, help="LM rows per step (global)")
        sub.add_argument("--grad-accum", type=int, help="microbatches per LM step")
        sub.add_argument("--learning-rate", type=float, help="peak LM learning rate")
        sub.add_argument("--bf16", action="store_true", help="LM compute in bfloat16 (float32 weights)")
        sub.add_argument("--checkpoint-every", type=int, help="LM steps between checkpoints")
        sub.add_argument("--d-model", type=int, help="LM width")
        sub.add_argument("--layers", type=int, help="LM depth")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")

    recipe(command("demo", "Train the tiny VQ and video-text LM on MovingShapes with ring attention, then caption "
                           "held-out videos and draw videos from captions."))
    train = command("train", "Run one training stage (resumes from the workdir's checkpoints).")
    train.add_argument("stage", choices=("vq", "lm"), help="vq: the frame tokenizer; lm: the video-text LM")
    recipe(train)
    evaluate = command("eval", "Caption the held-out videos and print per-attribute accuracy.")
    recipe(evaluate)
    caption = command("caption", "Caption videos: held-out MovingShapes by index, or video files.")
    caption.add_argument("videos", nargs="*", help="video files (decoded with PyAV); none: held-out videos")
    caption.add_argument("--index", type=int, nargs="*", default=[0, 1, 2, 3], help="held-out video indices")
    recipe(caption)
    generate = command("generate", "Generate videos from captions and save their frames as a PNG grid.")
    generate.add_argument("captions", nargs="+", help='e.g. "a red circle moves left"')
    generate.add_argument("--out", type=Path, default=None, help="PNG path (default: WORKDIR/generate.png)")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: %(default)s)")
    recipe(generate)
    bench = commands.add_parser(
        "bench", help="Run the benchmarks/ scripts: tables (.txt), JSON and plots (.png) for docs/benchmarks.md.",
        description="Run every script of the repository's benchmarks/ folder with the settings of "
                    "docs/benchmarks.md (about 30 minutes on 2 CPU cores) and write their output to --out.")
    bench.add_argument("--out", type=Path, default=Path("eqx-ring-bench"), help="output folder (default: %(default)s)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: checks that every script runs (a minute)")
    return parser


# (output name, script and arguments): the report's settings, and tiny ones for --quick.
_BENCH = {
    False: [
        ("load_balance", ["load_balance.py", "--devices", "4", "8", "--seq-len", "65536", "--chunk", "512"]),
        ("max_context", ["max_context.py", "--budgets", "1", "4", "16", "--devices", "1", "2", "4", "8", "--million",
                         "--json", "max_context.json", "--plot", "max_context.png"]),
        ("memory_scaling", ["max_context.py", "--scaling", "--seq", "4096", "16384", "65536", "262144",
                            "--json", "memory_scaling.json", "--plot", "memory_scaling.png"]),
        ("attention_memory", ["attention_memory.py", "--seq", "4096", "16384", "65536", "262144",
                              "--json", "attention_memory.json", "--plot", "attention_memory.png"]),
        ("attention", ["attention_cpu.py", "--seq", "4096", "8192", "--mem-seq", "8192", "16384", "32768", "--masks",
                       "causal", "full", "--dtypes", "f32", "bf16", "--max-temp-gib", "8", "--json", "attention.json"]),
    ],
    True: [
        ("load_balance", ["load_balance.py", "--devices", "2", "--seq-len", "4096", "--chunk", "512"]),
        ("max_context", ["max_context.py", "--budgets", "0.05", "--devices", "1", "2", "--layers", "1", "--d-model",
                         "64", "--variants", "vanilla", "ring attention", "--json", "max_context.json",
                         "--plot", "max_context.png"]),
        ("memory_scaling", ["max_context.py", "--scaling", "--seq", "2048", "4096", "--devices", "1", "2",
                            "--layers", "1", "--d-model", "64", "--variants", "blockwise attn + FFN",
                            "ring attention", "--json", "memory_scaling.json", "--plot", "memory_scaling.png"]),
        ("attention_memory", ["attention_memory.py", "--seq", "2048", "4096", "--devices", "1", "2",
                              "--json", "attention_memory.json", "--plot", "attention_memory.png"]),
        ("attention", ["attention_cpu.py", "--seq", "4096", "--mem-seq", "4096", "--reps", "1", "--impls", "zigzag",
                       "blockwise", "--json", "attention.json"]),
    ],
}


def _bench(out: Path, quick: bool) -> int:
    import subprocess

    scripts = Path(__file__).resolve().parents[1] / "benchmarks"
    if not scripts.is_dir():
        raise SystemExit(f"error: eqx-ring bench runs the scripts of the repository's benchmarks/ folder, and "
                         f"{scripts} does not exist: install from a clone (python -m pip install -e .)")
    out.mkdir(parents=True, exist_ok=True)
    for name, argv in _BENCH[quick]:
        print(f"$ python benchmarks/{' '.join(argv)}", flush=True)
        result = subprocess.run([sys.executable, str(scripts / argv[0]), *argv[1:]], cwd=out, capture_output=True,
                                text=True)
        (out / f"{name}.txt").write_text(result.stdout)
        print(result.stdout, flush=True)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            return result.returncode
    print(f"wrote tables (.txt), JSON and plots (.png) to {out}")
    return 0


def _config(args: argparse.Namespace):
    from ._demo import DemoConfig

    config = DemoConfig()
    simple = {"frames": "num_frames", "max_shapes": "max_shapes", "train_videos": "train_videos",
              "eval_videos": "eval_videos", "seed": "seed", "mesh": "mesh", "vq_steps": "vq_steps"}
    config = dataclasses.replace(config, **{f: getattr(args, a) for a, f in simple.items()
                                            if getattr(args, a, None) is not None})
    lm = {"d_model": args.d_model, "num_layers": args.layers}
    lm = {k: v for k, v in lm.items() if v is not None}
    config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, num_frames=config.num_frames,
                                                                 codebook_size=config.vq.codebook_size,
                                                                 codes_per_frame=config.vq.grid**2, **lm))
    train = {"stages": args.stages, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
             "learning_rate": args.learning_rate, "checkpoint_every": args.checkpoint_every,
             "compute_dtype": "bfloat16" if args.bf16 else None}
    train = {k: v for k, v in train.items() if v is not None}
    return dataclasses.replace(config, lm_train=dataclasses.replace(config.lm_train, **train))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eqx-ring` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":  # the scripts run in their own processes
        return _bench(args.out, args.quick)
    import logging

    import jax

    # Before JAX starts a backend; an accelerator backend ignores it.
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in explicit) or args.distributed:
        if args.distributed and any(x is not None for x in explicit):
            parser.error("--distributed finds the settings itself; give it alone, or give all three of "
                         "--coordinator, --num-processes and --process-id")
        if not args.distributed and any(x is None for x in explicit):
            parser.error("a multi-process run needs all three of --coordinator, --num-processes and --process-id")
        from eqx_ring.sharding import initialize_distributed

        initialize_distributed(*explicit)
    primary = jax.process_index() == 0

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("models")
    log.addHandler(handler)
    log.setLevel(logging.INFO if primary else logging.WARNING)
    log.propagate = False  # absl (through orbax) gives the root logger a handler of its own
    echo = print if primary else (lambda *args, **kwargs: None)

    from . import _demo
    from ._zoo import save

    config = _config(args)
    workdir: Path = args.workdir
    progress = not args.no_progress and sys.stderr.isatty()
    if args.command == "demo":
        _demo.run_demo(config, workdir, progress=progress, echo=echo)
        return 0

    from eqx_ring.sharding import make_mesh

    workdir.mkdir(parents=True, exist_ok=True)
    if args.command == "train":
        if args.stage == "vq":
            save(workdir / "vq", _demo.train_vq(config, workdir, progress=progress))
        else:
            vq = _load(workdir, "vq")
            records = _demo.encode(vq, _demo.videos(config, "train"))
            mesh = make_mesh(config.mesh)
            save(workdir / "video_text_lm", _demo.train_video_text(config, records, workdir, mesh, progress=progress))
        echo(f"saved {workdir / ('vq' if args.stage == 'vq' else 'video_text_lm')}.json")
        return 0

    # The LM decodes on the --mesh it would train on (the VQ is small and stays on one device), as the demo does.
    vq, lm = _load(workdir, "vq"), _load(workdir, "video_text_lm", mesh=make_mesh(config.mesh))
    from data_pipelines import ByteTokenizer

    tokenizer = ByteTokenizer()
    if args.command == "eval":
        result = _demo.evaluate_captions(lm, vq, config)
        echo(json.dumps({"accuracy": result["accuracy"], "chance": result["chance"]}, indent=2))
    elif args.command == "caption":
        import numpy as np

        if args.videos:
            from data_pipelines import VideoFiles

            with tempfile.TemporaryDirectory() as scratch:
                manifest = Path(scratch) / "manifest.jsonl"
                manifest.write_text("".join(json.dumps({"path": os.path.abspath(v), "caption": ""}) + "\n"
                                            for v in args.videos))
                source = VideoFiles(manifest, num_frames=config.num_frames, size=config.frame_size)
                names, frames = args.videos, [source[i]["frames"] for i in range(len(source))]
        else:
            held_out = _demo.videos(config, "eval")
            names = [f"held-out #{i}: {held_out[i]['caption']}" for i in args.index]
            frames = [held_out[i]["frames"] for i in args.index]
        codes = np.stack([np.asarray(vq.encode(jax.numpy.asarray(f))) for f in frames])
        for name, ids in zip(names, lm.caption(codes, tokenizer), strict=True):
            echo(f"{name}\n  -> {tokenizer.decode(ids)}")
    elif args.command == "generate":
        out = args.out or workdir / "generate.png"
        _demo.generate_grid(lm, vq, args.captions, out, temperature=args.temperature, seed=config.seed)
        echo(f"wrote {out}")
    return 0


def _load(workdir: Path, name: str, **build_kwargs):
    from ._zoo import load

    if not (workdir / f"{name}.json").exists():
        stage = "vq" if name == "vq" else "lm"
        raise SystemExit(f"error: {workdir / name}.json not found; run `eqx-ring train {stage} --workdir {workdir}` "
                         "or `eqx-ring demo` first")
    return load(workdir / name, **build_kwargs)
