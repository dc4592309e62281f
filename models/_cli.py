"""The `eqx-ring` command: demo, train (VQ and LM stages), eval, caption and generate."""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from . import _hf_cli


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _max_shapes(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 3:
        raise argparse.ArgumentTypeError(f"expected 1, 2 or 3 shapes, got {text!r}")
    return value


def _float(text: str, *, minimum: float, inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {minimum:g}, "
                                         f"got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, minimum=0.0, inclusive=False)


def _nonnegative_float(text: str) -> float:
    return _float(text, minimum=0.0, inclusive=True)


def _mesh(text: str) -> str:
    parts = text.split(",")
    try:
        sizes = [int(s) for s in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 4 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise argparse.ArgumentTypeError(f"expected four comma-separated sizes dp,fsdp,tp,sp, each a positive int "
                                         f"and at most one -1 (e.g. 2,1,1,4), got {text!r}")
    return ",".join(map(str, sizes))


def _stages(text: str):
    from ._train import Stage

    stages = []
    for part in text.split(","):
        fields = part.split(":")
        try:
            if len(fields) not in (2, 3, 4):
                raise argparse.ArgumentTypeError("")
            seq_len, steps = _positive_int(fields[0]), _positive_int(fields[1])
            scales = [_positive_float(f[1:]) for f in fields[2:] if f.startswith("x")]
            thetas = [_positive_float(f) for f in fields[2:] if not f.startswith("x")]
            if len(scales) > 1 or len(thetas) > 1:
                raise argparse.ArgumentTypeError("")
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"a stage is SEQ_LEN:STEPS[:ROPE_THETA][:xSCALE] with SEQ_LEN and STEPS "
                                             f"positive ints, ROPE_THETA and SCALE (position interpolation) positive "
                                             f"numbers, got {part!r}") from None
        stages.append(Stage(seq_len, steps, thetas[0] if thetas else None, scales[0] if scales else None))
    return tuple(stages)


def _coordinator(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port from 1 to 65535, got {text!r}")
    return text


def _show(value) -> str:
    """A config value as its flag writes it."""
    if isinstance(value, tuple):  # stages
        return ",".join(f"{s.seq_len}:{s.steps}" + (f":{s.rope_theta:g}" if s.rope_theta is not None else "")
                        + (f":x{s.rope_scale:g}" if s.rope_scale is not None else "") for s in value)
    return {"bfloat16": "on", "float32": "off"}.get(value, str(value)) if isinstance(value, str) else str(value)


# The recipe's flags: (flag, type, field of DemoConfig ("lm.d_model": of its lm), help). A flag left out takes the
# workdir's saved value, else DemoConfig's; `train_only` flags do not change what eval, caption and generate do.
_RECIPE = (
    ("--frames", _positive_int, "num_frames", "frames per video"),
    ("--max-shapes", _max_shapes, "max_shapes", "up to this many shapes (1 to 3) per MovingShapes video"),
    ("--train-videos", _positive_int, "train_videos", "training videos"),
    ("--eval-videos", _positive_int, "eval_videos", "held-out videos"),
    ("--seed", _nonnegative_int, "seed", "data and initialisation seed (held-out videos use seed + 1)"),
    ("--mesh", _mesh, "mesh", "dp,fsdp,tp,sp sizes as in LWM, e.g. 2,1,1,4 (one may be -1)"),
    ("--vq-steps", _positive_int, "vq_steps", "VQ training steps"),
    ("--stages", _stages, "lm_train.stages", "LM context-extension schedule, e.g. 1024:400,2048:100:50000"),
    ("--batch-size", _positive_int, "lm_train.batch_size", "LM rows per step (global)"),
    ("--grad-accum", _positive_int, "lm_train.grad_accum", "microbatches per LM step"),
    ("--learning-rate", _positive_float, "lm_train.learning_rate", "peak LM learning rate"),
    ("--bf16", None, "lm_train.compute_dtype", "LM compute in bfloat16 (float32 weights)"),
    ("--checkpoint-every", _positive_int, "lm_train.checkpoint_every", "LM steps between checkpoints"),
    ("--d-model", _positive_int, "lm.d_model", "LM width"),
    ("--layers", _positive_int, "lm.num_layers", "LM depth"),
    ("--hidden-size", _positive_int, "lm.hidden_size", "LM feed-forward width"),
)
_USED_BY_INFERENCE = frozenset({"--frames", "--max-shapes", "--eval-videos", "--seed", "--mesh"})
_INFERENCE = ("eval", "caption", "generate")
SETTINGS = "config.json"  # the workdir's DemoConfig, written by demo and train


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _field(config, path: str):
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _parser() -> argparse.ArgumentParser:
    from ._demo import DemoConfig

    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="eqx-ring",
        description="Train and use the eqx-ring video-text model (ring attention, Equinox, grain).",
    )
    parser.add_argument("--cpu-devices", type=_positive_int, default=8, metavar="N",
                        help="CPU devices to simulate (per process) when running on the CPU (default: %(default)s)")
    multi = parser.add_argument_group(
        "multi-process runs", "Run the same command in every process (one per host); each builds the same global "
                              "mesh from every process's devices. The workdir must be shared.")
    multi.add_argument("--coordinator", type=_coordinator, metavar="HOST:PORT",
                       help="address of process 0 (jax.distributed)")
    multi.add_argument("--num-processes", type=_positive_int, metavar="N", help="how many processes take part")
    multi.add_argument("--process-id", type=_nonnegative_int, metavar="I", help="this process's index, 0 to N-1")
    multi.add_argument("--distributed", action="store_true",
                       help="join a multi-process run whose settings JAX finds itself (JAX_COORDINATOR_ADDRESS; "
                            "Slurm, Open MPI, Cloud TPU pods, Kubernetes)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(subparser=sub)
        sub.add_argument("--workdir", type=Path, default=Path("eqx-ring-demo"),
                         help="where models, checkpoints, metrics and plots live (default: %(default)s)")
        return sub

    def recipe(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group(
            "recipe", f"demo and train save these settings in WORKDIR/{SETTINGS}; later commands on that workdir "
                      "reuse them, and a flag given replaces the saved value. Defaults are for a new workdir.")
        for flag, type_, path, help in _RECIPE:
            default = f"{help} (default: {_show(_field(defaults, path))})"
            if type_ is None:
                group.add_argument(flag, action="store_true", default=None, help=default)
            else:
                metavar = "SEQ:STEPS[:THETA][:xSCALE],..." if flag == "--stages" else None
                group.add_argument(flag, type=type_, metavar=metavar, help=default)
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")

    recipe(command("demo", "Train the tiny VQ and video-text LM on MovingShapes with ring attention, then caption "
                           "held-out videos and draw videos from captions."))
    train = command("train", "Run one training stage (resumes from the workdir's checkpoints).")
    train.add_argument("stage", choices=("vq", "lm"), help="vq: the frame tokenizer; lm: the video-text LM, or with "
                                                          "--init a pretrained text LM")
    pretrained = train.add_argument_group(
        "fine-tuning a pretrained model", "lm --init DIR --text FILE... --stages ...: fine-tune a Hugging Face "
        "LLaMA-family model (or a zoo RingLM) on text files, one document each, over context-extension stages "
        "(SEQ:STEPS[:THETA][:xSCALE]: raise RoPE's base as LWM did, or interpolate positions by SCALE), on --mesh "
        "(default 1,1,1,-1: every device on the sequence ring, zigzag order); writes WORKDIR/lm.json and the "
        "Hugging Face folder WORKDIR/hf. Defaults: --batch-size 1, --learning-rate 1e-5, warmup a tenth of the "
        "steps (at most 50); only the flags " + ", ".join(_hf_cli.INIT_FLAGS) + " apply.")
    pretrained.add_argument("--init", type=Path, metavar="DIR", help="the pretrained model: a Hugging Face folder "
                                                                      "or a zoo file")
    pretrained.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files to train on")
    recipe(train)
    evaluate = command("eval", "Caption the held-out videos and print per-attribute accuracy.")
    recipe(evaluate)
    caption = command("caption", "Caption videos: held-out MovingShapes by index, or video files.")
    caption.add_argument("videos", nargs="*", help="video files (decoded with PyAV); none: held-out videos")
    caption.add_argument("--index", type=_nonnegative_int, nargs="+", default=None,
                         help="held-out video indices, below --eval-videos (default: 0 1 2 3, those that exist)")
    recipe(caption)
    generate = command("generate", "Generate videos from captions and save their frames as a PNG grid; with --model, "
                                   "continue text prompts with a pretrained LM.")
    generate.add_argument("captions", nargs="+", metavar="TEXT",
                          help='captions, e.g. "a red circle moves left"; with --model, prompts')
    text = generate.add_argument_group("text generation", "--model PATH: a Hugging Face LLaMA-family folder or a "
                                                          "zoo RingLM, on one device unless --mesh is given")
    text.add_argument("--model", type=Path, metavar="PATH", help="the text model")
    text.add_argument("--tokenizer", type=Path, metavar="DIR",
                      help="a folder with the model's tokenizer.json (default: the model's own folder)")
    text.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to add (default: %(default)s)")
    generate.add_argument("--out", type=Path, default=None,
                          help="PNG path, its folders created (default: WORKDIR/generate.png)")
    generate.add_argument("--temperature", type=_nonnegative_float, default=None,
                          help="sampling temperature, 0 for greedy (default: 0.8 for videos, 0 with --model)")
    recipe(generate)
    convert = commands.add_parser(
        "convert", help="Convert a Hugging Face LLaMA-family folder to a zoo file, or a zoo RingLM to a Hugging Face "
                        "folder (that transformers loads).",
        description="Convert SOURCE, a Hugging Face folder (Llama, Mistral, Qwen2) or a zoo RingLM (.json), to the "
                    "other format at DEST: a zoo path (DEST.json and DEST.eqx) or a folder.")
    convert.set_defaults(subparser=convert)
    convert.add_argument("source", type=Path, help="a Hugging Face model folder or a zoo .json")
    convert.add_argument("dest", type=Path, help="the zoo path (without extension) or the folder to write")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                         help="the weights' dtype (default: as stored; RMSNorm scales stay float32)")
    convert.add_argument("--tokenizer", type=Path, metavar="DIR",
                         help="zoo to folder: copy this folder's tokenizer files into DEST")
    needle = commands.add_parser(
        "needle", help="The long-context job: train a video-text model to find a needle frame in videos of up to "
                       "8,192 tokens with ring attention, beside a sliding-window control, and draw the heatmap.",
        description="Train a VideoTextLM (and the same model with a sliding window, the control) through "
                    "progressive context stages on NeedleVideo, evaluate both over context length x needle depth "
                    "and write WORKDIR/needle.json and needle.png. Reruns resume; settings are kept in "
                    "WORKDIR/needle_config.json.")
    needle.set_defaults(subparser=needle)
    needle.add_argument("--workdir", type=Path, default=Path("eqx-ring-needle"),
                        help="where models, checkpoints, settings and results live (default: %(default)s)")
    needle.add_argument("--eval-only", action="store_true",
                        help="evaluate the workdir's trained models on new videos instead of training")
    needle.add_argument("--seed", type=_nonnegative_int, default=None,
                        help="evaluation seed (default: the settings' eval_seed, 1)")
    needle.add_argument("--out", type=Path, default=None,
                        help="the JSON to write, its PNG beside it (default: WORKDIR/needle.json)")
    sizes = needle.add_argument_group("recipe", "for a new workdir (default: the recipe of the docs)")
    sizes.add_argument("--stages", type=_stages, metavar="SEQ:STEPS[:THETA],...", help="context stages")
    sizes.add_argument("--eval-lengths", type=_positive_int, nargs="+", metavar="N", help="evaluation lengths")
    sizes.add_argument("--examples-per-cell", type=_positive_int, help="videos per (length, depth) cell")
    sizes.add_argument("--window", type=_positive_int, help="the control's sliding window in tokens")
    needle.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench = commands.add_parser(
        "bench", help="Run the benchmarks/ scripts: tables (.txt), JSON and plots (.png) for docs/benchmarks.md.",
        description="Run every script of the repository's benchmarks/ folder with the settings of "
                    "docs/benchmarks.md (about 30 minutes on 2 CPU cores) and write their output to --out.")
    bench.add_argument("--out", type=Path, default=Path("eqx-ring-bench"), help="output folder (default: %(default)s)")
    bench.set_defaults(subparser=bench)
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
        ("strategies", ["strategies.py", "--json", "strategies.json"]),
        ("features", ["features.py", "--json", "features.json"]),
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
        ("strategies", ["strategies.py", "--seqs", "1024", "--time-seqs", "--json", "strategies.json"]),
        ("features", ["features.py", "--seq", "1024", "--rounds", "1", "--json", "features.json"]),
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


def _check_folder(fail, flag: str, path: Path) -> None:
    """Refuse a folder path that cannot be made: it, or its nearest existing ancestor, is a file."""
    if path.exists() and not path.is_dir():
        fail(f"argument {flag}: {path} is a file, not a folder")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        fail(f"argument {flag}: {existing} is a file, so the folder {path} cannot be made")


def _read_settings(stop, workdir: Path):
    from ._demo import DemoConfig

    path = workdir / SETTINGS
    if not path.is_file():
        return None
    try:
        return DemoConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        stop(f"{path} does not hold the settings of an eqx-ring run ({error}); move it away to start from the "
             "defaults")


def _config(args: argparse.Namespace, saved, fail, notes: list[str]):
    """The run's DemoConfig: the workdir's saved one (else the defaults) with the flags given."""
    from ._demo import DemoConfig

    base = saved or DemoConfig()
    changes: dict[str, dict] = {"": {}, "lm": {}, "lm_train": {}}
    for flag, _, path, _ in _RECIPE:
        value = getattr(args, _dest(flag))
        value = "bfloat16" if flag == "--bf16" and value else value
        old = _field(base, path)
        if value is None or value == old:
            continue
        if args.command in _INFERENCE and flag not in _USED_BY_INFERENCE:
            notes.append(f"note: {args.command} does not use {flag} (a training flag); ignoring it")
            continue
        if saved is not None:
            notes.append(f"note: {flag} {_show(value)} replaces {_show(old)}, the value saved in "
                         f"{args.workdir / SETTINGS}")
        owner, _, name = path.rpartition(".")
        changes[owner][name] = value
    if "num_frames" in changes[""]:
        changes["lm"]["num_frames"] = changes[""]["num_frames"]
    batch = changes["lm_train"].get("batch_size", base.lm_train.batch_size)
    accum = changes["lm_train"].get("grad_accum", base.lm_train.grad_accum)
    if batch % accum:
        flag = "--grad-accum" if args.grad_accum is not None else "--batch-size"
        fail(f"argument {flag}: --grad-accum {accum} microbatches must divide --batch-size {batch}")
    d_model, heads = changes["lm"].get("d_model", base.lm.d_model), base.lm.num_heads
    if d_model % (2 * heads):
        fail(f"argument --d-model: expected a multiple of {2 * heads} ({heads} heads of an even width, as RoPE "
             f"rotates pairs of features), got {d_model}")
    try:
        return dataclasses.replace(base, **changes[""], lm=dataclasses.replace(base.lm, **changes["lm"]),
                                   lm_train=dataclasses.replace(base.lm_train, **changes["lm_train"]))
    except ValueError as error:
        fail(str(error))


def _check_multi_process(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether the flags ask for a multi-process run; refuses an incomplete or contradictory set."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if all(x is None for x in explicit) and not args.distributed:
        return False
    if args.distributed and any(x is not None for x in explicit):
        parser.error("--distributed finds the settings itself; give it alone, or give all three of "
                     "--coordinator, --num-processes and --process-id")
    if not args.distributed and any(x is None for x in explicit):
        parser.error("a multi-process run needs all three of --coordinator, --num-processes and --process-id")
    if not args.distributed and args.process_id >= args.num_processes:
        parser.error(f"argument --process-id: expected 0 to --num-processes - 1 = {args.num_processes - 1}, "
                     f"got {args.process_id}")
    return True


def _check_files(args: argparse.Namespace, config, fail, stop) -> None:
    """What the command reads and writes, before anything runs."""
    workdir = args.workdir
    if args.command == "caption":
        if args.videos and args.index is not None:
            fail("argument --index: --index picks held-out videos; give it or video files, not both")
        for video in args.videos:
            if not os.path.isfile(video):
                fail(f"argument videos: no such file: {video}")
        if not args.videos:
            args.index = args.index if args.index is not None else list(range(min(4, config.eval_videos)))
            bad = [i for i in args.index if i >= config.eval_videos]
            if bad:
                fail(f"argument --index: expected indices below --eval-videos {config.eval_videos}, got {bad}")
    if args.command == "generate":
        from matplotlib.backend_bases import FigureCanvasBase

        args.out = args.out or args.workdir / "generate.png"
        if args.out.is_dir():
            fail(f"argument --out: {args.out} is a folder; give a file name, e.g. {args.out / 'generate.png'}")
        _check_folder(fail, "--out", args.out.parent)
        formats = FigureCanvasBase.get_supported_filetypes()
        if args.out.suffix and args.out.suffix[1:].lower() not in formats:
            fail(f"argument --out: expected an image file name ending in one of "
                 f"{', '.join('.' + f for f in sorted(formats))}, got {str(args.out)!r}")
    needs = {"train": ("vq",) if getattr(args, "stage", None) == "lm" else (), "eval": ("vq", "video_text_lm"),
             "caption": ("vq", "video_text_lm"), "generate": ("vq", "video_text_lm")}.get(args.command, ())
    for name in needs:
        if not (workdir / f"{name}.json").is_file():
            stage = "vq" if name == "vq" else "lm"
            stop(f"{workdir / name}.json not found: run `eqx-ring train {stage} --workdir {workdir}` or "
                 f"`eqx-ring demo --workdir {workdir}` first")
    if "video_text_lm" in needs:
        try:
            trained = json.loads((workdir / "video_text_lm.json").read_text(encoding="utf-8"))["config"]["num_frames"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            stop(f"{workdir / 'video_text_lm.json'} is not a zoo file of the LM ({error!r})")
        if trained != config.num_frames:
            given = f"--frames {args.frames}" if args.frames is not None else f"the recipe's {config.num_frames}"
            fail(f"argument --frames: the LM in {workdir} reads videos of {trained} frames, not {given}; give "
                 f"--frames {trained}")


def _trains(args: argparse.Namespace, name: str) -> bool:
    """Whether this command trains the stage `name` ("vq" or "video_text_lm")."""
    if args.command == "demo":
        return not (args.workdir / f"{name}.json").exists()
    return args.command == "train" and args.stage == ("vq" if name == "vq" else "lm")


def _check_devices(args: argparse.Namespace, config, saved: bool, fail, notes: list[str]):
    """The LM's mesh, checked against the devices, the batch and the stages' lengths, before any work."""
    import equinox as eqx
    import jax

    from eqx_ring.sharding import BATCH_AXES, make_mesh

    from ._video_lm import VideoTextLM

    devices = jax.devices()
    where = f"{len(devices)} {devices[0].platform} device{'s' if len(devices) > 1 else ''}"
    if devices[0].platform == "cpu":
        where += f" (--cpu-devices {args.cpu_devices}, before the command, sets them per process)"
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as error:
        if args.command not in _INFERENCE or args.mesh is not None:
            source = "" if args.mesh is not None else f" (the {'saved' if saved else 'default'} --mesh)"
            fail(f"argument --mesh: {config.mesh}{source} does not fit the {where}: {error}")
        notes.append(f"note: the mesh {config.mesh} does not fit the {where}; {args.command} decodes on -1,1,1,1 "
                     "(data parallel) instead (give --mesh to choose)")
        mesh = make_mesh("-1,1,1,1")
    if _trains(args, "vq") and config.vq_batch % len(devices):
        fail(f"argument --cpu-devices: the VQ stage splits its {config.vq_batch} frames per step over all {where}, "
             f"whose number must divide {config.vq_batch}")
    if not _trains(args, "video_text_lm"):
        return mesh
    train = config.lm_train
    data, micro = mesh.shape["dp"] * mesh.shape["fsdp"], train.batch_size // train.grad_accum
    if micro % data:
        fail(f"argument --batch-size: each of the --grad-accum {train.grad_accum} microbatches of --batch-size "
             f"{train.batch_size} holds {micro} rows, which the {data} data shards (dp * fsdp) of --mesh "
             f"{config.mesh} must divide")
    # An abstract forward pass (shapes only, no compute) runs the model's own checks on each stage's rows.
    lm = eqx.filter_eval_shape(lambda: VideoTextLM(config.lm, mesh=mesh, key=jax.random.key(0)))
    for seq_len in sorted({s.seq_len for s in train.stages}):
        rows = jax.ShapeDtypeStruct((micro, seq_len), jax.numpy.int32)
        try:
            eqx.filter_eval_shape(lambda m, x: jax.vmap(m, spmd_axis_name=BATCH_AXES)(x), lm, rows)
        except ValueError as error:
            fail(f"argument --stages: rows of {seq_len} tokens do not fit the LM on --mesh {config.mesh}: {error}")
    return mesh


def _write_settings(workdir: Path, config) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / f".{SETTINGS}.tmp"
    scratch.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, workdir / SETTINGS)  # whole or not at all: other processes may read it


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eqx-ring` console script.

    Every argument is checked before anything is loaded, trained or written: a bad one exits with
    status 2 and one line naming the flag (argparse's convention), as does a workdir that lacks
    what the command needs.

    **Arguments:**

    - `argv`: the command line without the program name; default `sys.argv[1:]`.

    **Returns:** the exit status, `0`.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    sub = args.subparser

    def stop(message: str):
        sub.exit(2, f"{sub.prog}: error: {message}\n")

    if args.command == "bench":  # the scripts run in their own processes
        _check_folder(sub.error, "--out", args.out)
        return _bench(args.out, args.quick)
    multi_process = _check_multi_process(parser, args)
    pretrained = _pretrained_command(args)
    if pretrained is not None:
        if multi_process:
            stop(f"{args.command} {'--init ' if args.command == 'train' else ''}runs in one process")
        return pretrained(args, stop)
    if args.command == "needle":
        if multi_process:
            stop("needle runs in one process (its meshes use this process's devices)")
        return _needle(args, stop)
    workdir: Path = args.workdir
    _check_folder(sub.error, "--workdir", workdir)
    notes: list[str] = []
    saved = _read_settings(stop, workdir)
    config = _config(args, saved, sub.error, notes)
    _check_files(args, config, sub.error, stop)

    import logging

    import jax

    # Before JAX starts a backend; an accelerator backend ignores it.
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if multi_process:
        from eqx_ring.sharding import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = _check_devices(args, config, saved is not None, sub.error, notes)
    primary = jax.process_index() == 0
    for note in notes if primary else ():
        print(note, file=sys.stderr, flush=True)

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("models")
    log.addHandler(handler)
    log.setLevel(logging.INFO if primary else logging.WARNING)
    log.propagate = False  # absl (through orbax) gives the root logger a handler of its own
    # Flushed, so that redirected output keeps up with the run.
    echo = functools.partial(print, flush=True) if primary else (lambda *args, **kwargs: None)

    from . import _demo
    from ._zoo import save

    progress = not args.no_progress and sys.stderr.isatty()
    if args.command in ("demo", "train") and primary:
        _write_settings(workdir, config)
    if args.command == "demo":
        _demo.run_demo(config, workdir, progress=progress, echo=echo)
        return 0
    if args.command == "train":
        workdir.mkdir(parents=True, exist_ok=True)
        if args.stage == "vq":
            save(workdir / "vq", _demo.train_vq(config, workdir, progress=progress))
        else:
            vq = _load(stop, workdir, "vq")
            records = _demo.encode(vq, _demo.videos(config, "train"))
            save(workdir / "video_text_lm", _demo.train_video_text(config, records, workdir, mesh, progress=progress))
        echo(f"saved {workdir / ('vq' if args.stage == 'vq' else 'video_text_lm')}.json")
        return 0

    # The LM decodes on the --mesh it would train on (the VQ is small and stays on one device), as the demo does.
    vq, lm = _load(stop, workdir, "vq"), _load(stop, workdir, "video_text_lm", mesh=mesh)
    from data_pipelines import ByteTokenizer

    tokenizer = ByteTokenizer()
    if args.command == "eval":
        result = _demo.evaluate_captions(lm, vq, config)
        echo(json.dumps({"accuracy": result["accuracy"], "chance": result["chance"]}, indent=2))
    elif args.command == "caption":
        import numpy as np

        if args.videos:
            from data_pipelines import VideoDecodeError, VideoFiles

            with tempfile.TemporaryDirectory() as scratch:
                manifest = Path(scratch) / "manifest.jsonl"
                manifest.write_text("".join(json.dumps({"path": os.path.abspath(v), "caption": ""}) + "\n"
                                            for v in args.videos))
                source = VideoFiles(manifest, num_frames=config.num_frames, size=config.frame_size)
                try:
                    frames = [source[i]["frames"] for i in range(len(source))]
                except VideoDecodeError as error:
                    stop(f"argument videos: {error}")
                names = args.videos
        else:
            held_out = _demo.videos(config, "eval")
            names = [f"held-out #{i}: {held_out[i]['caption']}" for i in args.index]
            frames = [held_out[i]["frames"] for i in args.index]
        codes = np.stack([np.asarray(vq.encode(jax.numpy.asarray(f))) for f in frames])
        for name, ids in zip(names, lm.caption(codes, tokenizer), strict=True):
            echo(f"{name}\n  -> {tokenizer.decode(ids)}")
    elif args.command == "generate":
        temperature = 0.8 if args.temperature is None else args.temperature
        _demo.generate_grid(lm, vq, args.captions, args.out, temperature=temperature, seed=config.seed)
        echo(f"wrote {args.out}")
    return 0


def _needle(args: argparse.Namespace, stop) -> int:
    from ._needle import SETTINGS as NEEDLE_SETTINGS, NeedleConfig

    _check_folder(args.subparser.error, "--workdir", args.workdir)
    if args.out is not None:
        _check_folder(args.subparser.error, "--out", args.out.parent)
    path = args.workdir / NEEDLE_SETTINGS
    changes = {name: getattr(args, name) for name in ("stages", "eval_lengths", "examples_per_cell", "window")
               if getattr(args, name) is not None}
    if "eval_lengths" in changes:
        changes["eval_lengths"] = tuple(changes["eval_lengths"])
    if path.is_file():
        try:
            config = NeedleConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:
            stop(f"{path} does not hold needle settings ({error}); move it away to start from the defaults")
        if changes and not args.eval_only:
            stop(f"{args.workdir} already holds a run with its settings in {path}: recipe flags apply to a new "
                 "workdir (--eval-only may change --eval-lengths and --examples-per-cell)")
    elif args.eval_only:
        stop(f"argument --eval-only: {args.workdir} holds no trained needle run ({path} is missing)")
    else:
        config = NeedleConfig()
    try:
        config = dataclasses.replace(config, **changes)
    except ValueError as error:
        stop(str(error))
    if args.eval_only and {"stages", "window"} & changes.keys():
        stop("argument --eval-only: --stages and --window describe training; the workdir's models keep theirs")

    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from ._needle import run_needle

    if not args.eval_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(config), indent=2))
    run_needle(config, args.workdir, eval_only=args.eval_only, seed=args.seed, out=args.out,
               progress=not args.no_progress and sys.stderr.isatty(), echo=functools.partial(print, flush=True))
    return 0


def _pretrained_command(args: argparse.Namespace):
    """The function that runs a command on a pretrained text model (convert, generate --model, train lm --init),
    once its flags are checked; `None` for the video-text commands."""
    import jax

    sub = args.subparser
    if args.command == "convert":
        runner = _hf_cli.convert
    elif args.command == "generate" and args.model is not None:
        unused = [flag for flag, *_ in _RECIPE if flag not in ("--mesh", "--seed") and getattr(args, _dest(flag))]
        if unused:
            sub.error(f"argument {unused[0]}: generate --model continues text; {unused[0]} is a video-model flag")
        runner = _hf_cli.generate_text
    elif args.command == "train" and (args.init is not None or args.text is not None):
        if args.init is None or args.text is None or args.stage != "lm":
            sub.error("argument --init: fine-tuning needs `train lm --init DIR --text FILE... --stages ...`")
        unused = [flag for flag, *_ in _RECIPE if flag not in _hf_cli.INIT_FLAGS and getattr(args, _dest(flag))]
        if unused:
            sub.error(f"argument {unused[0]}: train lm --init fine-tunes the pretrained model, whose sizes are its "
                      f"own; only {', '.join(_hf_cli.INIT_FLAGS)} apply")
        if args.stages is None:
            sub.error("argument --stages: train lm --init needs its context stages, e.g. --stages 4096:200:5e5")
        _check_folder(sub.error, "--workdir", args.workdir)
        runner = _hf_cli.finetune
    else:
        return None
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    return runner


def _load(stop, workdir: Path, name: str, **build_kwargs):
    from ._zoo import ZooIntegrityError, load

    try:
        return load(workdir / name, **build_kwargs)
    except (OSError, ValueError, ZooIntegrityError) as error:
        stop(f"cannot load {workdir / name}.json: {error}")
