"""The `eqx-ring` commands for pretrained LLaMA-family models: convert, generate --model, train lm --init."""

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

# What a Hugging Face folder keeps of its tokenizer, copied beside converted or fine-tuned weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The train flags --init uses; the others size or feed the video-text model.
INIT_FLAGS = ("--stages", "--batch-size", "--grad-accum", "--learning-rate", "--bf16", "--checkpoint-every",
              "--mesh", "--seed")


def is_hf_folder(path: Path) -> bool:
    """Whether `path` is a Hugging Face model folder (a `config.json` naming its architecture)."""
    try:
        return path.is_dir() and "architectures" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _zoo_json(path: Path) -> Path | None:
    """The zoo JSON `path` names (`path` or `path.json`), or `None`."""
    for candidate in (path, path.with_name(path.name + ".json")):
        if candidate.is_file() and candidate.suffix == ".json":
            return candidate
    return None


def load_model(path: Path, stop, *, mesh=None, layout: str = "contiguous", dtype=None):
    """A `RingLM` from a Hugging Face folder or a zoo file, refusing anything else naming `--model`."""
    from ._hf import from_pretrained
    from ._lm import RingLM
    from ._zoo import ZooIntegrityError, load

    try:
        if is_hf_folder(path):
            return from_pretrained(path, mesh=mesh, layout=layout, dtype=dtype)
        zoo = _zoo_json(path)
        if zoo is None:
            stop(f"{path} is neither a Hugging Face model folder (config.json with architectures) nor a zoo file")
        model = load(zoo, mesh=mesh)
    except (OSError, ValueError, ZooIntegrityError) as error:
        stop(f"cannot load {path}: {error}")
    if not isinstance(model, RingLM):
        stop(f"{path} holds a {type(model).__name__}; these commands take a text RingLM")
    return model if model.config.attention.layout == layout else model.respec(layout=layout)


def tokenizer_for(model_path: Path, given: Path | None, vocab_size: int, stop):
    """The tokenizer of `--tokenizer`, else of the model's own folder, else the byte tokenizer if the vocabularies
    agree."""
    from data_pipelines import ByteTokenizer, HFTokenizer

    folder = given or (model_path if (model_path / "tokenizer.json").is_file() else None)
    if folder is None:
        if vocab_size == ByteTokenizer.vocab_size:
            return ByteTokenizer()
        stop(f"{model_path} has no tokenizer.json and its vocabulary ({vocab_size}) is not the byte tokenizer's: "
             "give --tokenizer DIR, a folder with the model's tokenizer.json")
    try:
        tokenizer = HFTokenizer(folder)
    except (OSError, ValueError) as error:
        stop(f"argument --tokenizer: {error}")
    if tokenizer.vocab_size > vocab_size:
        stop(f"the tokenizer of {folder} has {tokenizer.vocab_size} ids, more than the model's {vocab_size}")
    return tokenizer


def _mesh_or_none(text: str | None, stop):
    from eqx_ring.sharding import make_mesh

    if text is None:
        return None
    try:
        return make_mesh(text)
    except ValueError as error:
        stop(f"argument --mesh: {text} does not fit the devices: {error}")


def convert(args: argparse.Namespace, stop) -> int:
    """`eqx-ring convert SOURCE DEST`: a Hugging Face folder to a zoo file, or a zoo file to a folder."""
    import jax.numpy as jnp

    from ._hf import save_pretrained
    from ._zoo import save

    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    if is_hf_folder(args.source) and args.tokenizer is not None:
        stop("argument --tokenizer: a zoo file holds no tokenizer; keep using the folder's with generate --tokenizer")
    model = load_model(args.source, stop, dtype=dtype)
    if is_hf_folder(args.source):
        paths = list(save(args.dest, model))
    else:
        if dtype is not None:
            model = with_param_dtype(model, dtype)
        paths = save_pretrained(model, args.dest)
        if args.tokenizer is not None:
            paths += copy_tokenizer(args.tokenizer, args.dest, stop)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def with_param_dtype(model, dtype):
    """`model` rebuilt with `param_dtype=dtype` in its config, its weights cast to the dtypes that config gives
    (the RMSNorm scales stay float32), so that the config and the weights agree."""
    import dataclasses

    import equinox as eqx
    import jax

    from ._lm import RingLM

    config = dataclasses.replace(model.config, param_dtype=jax.numpy.dtype(dtype).name)
    skeleton = eqx.filter_eval_shape(lambda: RingLM(config, mesh=model.spec.mesh, key=jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    return jax.tree_util.tree_unflatten(treedef, [x.astype(s.dtype) for s, x in
                                                  zip(leaves, jax.tree.leaves(model), strict=True)])


def copy_tokenizer(source: Path, dest: Path, stop) -> list[str]:
    """Copy the tokenizer files of folder `source` into `dest`; the paths written."""
    found = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(f.name == "tokenizer.json" for f in found):
        stop(f"argument --tokenizer: {source / 'tokenizer.json'} is missing")
    dest.mkdir(parents=True, exist_ok=True)
    return [shutil.copy(f, dest / f.name) for f in found]


def generate_text(args: argparse.Namespace, stop) -> int:
    """`eqx-ring generate --model PATH PROMPT...`: continue each prompt with the model."""
    import jax
    import numpy as np

    from ._generate import generate

    mesh = _mesh_or_none(args.mesh, stop)
    model = load_model(args.model, stop, mesh=mesh)
    if mesh is not None:
        from eqx_ring.sharding import shard_params

        model = shard_params(model, mesh)
    tokenizer = tokenizer_for(args.model, args.tokenizer, model.config.vocab_size, stop)
    prompts = [np.concatenate([[tokenizer.bos_id], tokenizer.encode(p)]).astype(np.int32) for p in args.captions]
    temperature = 0.0 if args.temperature is None else args.temperature
    seed = 0 if args.seed is None else args.seed
    tokens = np.asarray(generate(model, prompts, args.max_new_tokens, temperature=temperature,
                                 stop_tokens=(tokenizer.eos_id,), key=jax.random.key(seed)))
    for prompt, row in zip(args.captions, tokens, strict=True):
        ended = np.flatnonzero(row == tokenizer.eos_id)
        print(f"{prompt}{tokenizer.decode(row[: ended[0] if ended.size else len(row)])}", flush=True)
    return 0


def finetune(args: argparse.Namespace, stop) -> int:
    """`eqx-ring train lm --init DIR --text FILE... --stages ...`: fine-tune a pretrained model with context-extension
    stages, then save it as a zoo file and as a Hugging Face folder."""
    import jax
    import jax.numpy as jnp

    from data_pipelines import global_packed_batches, process_rows, text_examples
    from eqx_ring.sharding import BATCH_AXES, shard_params

    from ._hf import save_pretrained
    from ._train import TrainConfig, plot_metrics, train
    from ._zoo import save

    documents = []
    for path in args.text:
        try:
            documents.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            stop(f"argument --text: cannot read {path}: {error}")
    mesh = _mesh_or_none(args.mesh or "1,1,1,-1", stop)
    ring = mesh.shape["sp"]
    for stage in args.stages:
        if stage.seq_len % (2 * ring):
            stop(f"argument --stages: rows of {stage.seq_len} tokens do not split into the 2 x {ring} zigzag chunks "
                 f"of the sp={ring} ring of --mesh {args.mesh or '1,1,1,-1'}")
    total = sum(s.steps for s in args.stages)
    try:
        config = TrainConfig(stages=args.stages, batch_size=args.batch_size or 1, grad_accum=args.grad_accum or 1,
                             learning_rate=args.learning_rate or 1e-5, warmup_steps=min(50, total // 10),
                             compute_dtype="bfloat16" if args.bf16 else "float32",
                             checkpoint_every=args.checkpoint_every or 100)
    except ValueError as error:
        stop(str(error))
    data_shards = mesh.shape["dp"] * mesh.shape["fsdp"]
    if (config.batch_size // config.grad_accum) % data_shards:
        stop(f"argument --batch-size: {config.batch_size // config.grad_accum} rows per microbatch do not split over "
             f"the {data_shards} data shards (dp * fsdp) of --mesh {args.mesh}")
    # Master weights in float32 (as TrainConfig's compute_dtype expects), placed by the sharding rules.
    model = shard_params(load_model(args.init, stop, mesh=mesh, layout="zigzag", dtype=jnp.float32), mesh)
    tokenizer = tokenizer_for(args.init, None, model.config.vocab_size, stop)
    seed = args.seed or 0

    def batches(index, stage):
        examples = text_examples(documents, tokenizer, seed=seed + index, num_epochs=None)
        return global_packed_batches(examples, seq_len=stage.seq_len, batch_size=config.batch_size,
                                     pad_id=tokenizer.pad_id, rows=process_rows(mesh, config.batch_size),
                                     layout="zigzag", ring_size=ring, vocab_size=model.config.vocab_size)

    progress = not args.no_progress and sys.stderr.isatty()
    # The key drives the checkpoint's attention dropout (its config.json's attention_dropout), if any.
    result = train(model, lambda m, b, key: (m.loss(b, spmd_axis_name=BATCH_AXES, key=key), {}), batches, config,
                   workdir=args.workdir / "finetune", mesh=mesh, progress=progress, description="fine-tune",
                   key=jax.random.key(seed))
    echo = functools.partial(print, flush=True)
    if jax.process_index() == 0:
        plot_metrics(result.records, args.workdir / "finetune_loss.png", keys=("loss",), title="Fine-tuning loss")
    paths = list(save(args.workdir / "lm", result.model))
    paths += save_pretrained(result.model, args.workdir / "hf")
    if is_hf_folder(args.init):
        paths += copy_tokenizer(args.init, args.workdir / "hf", stop)
    spec = result.model.transformer.spec
    scaling = "none" if spec.rope_scaling is None else f"{spec.rope_scaling.kind} x{spec.rope_scaling.factor:g}"
    echo(f"fine-tuned {total} steps over stages of {', '.join(str(s.seq_len) for s in args.stages)} tokens; last "
         f"loss {result.records[-1]['loss']:.4f}; rope_theta {spec.rope_theta:g}, rope_scaling {scaling}")
    echo("wrote " + ", ".join(str(p) for p in paths))
    return 0
