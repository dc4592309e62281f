"""The two training stages of the video-text recipe on `MovingShapes`, its evaluation, and the demo that runs them."""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqx_ring import AttentionSpec, KernelTuning

from ._lm import config_from_dict
from ._train import Stage, TrainConfig, plot_metrics, train
from ._video_lm import VideoTextConfig, VideoTextLM
from ._vq import VideoVQ, VQConfig, vq_loss
from ._zoo import load, save


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo trains and evaluates; the defaults finish in minutes on two CPU cores.

    JSON-serialisable: `dataclasses.asdict` writes it and `DemoConfig.from_dict` reads it back (the
    `eqx-ring` command keeps a workdir's settings so).

    **Arguments:**

    - `num_frames`, `frame_size`, `max_shapes`: the `MovingShapes` videos: frames per video, frame
      side in pixels, up to this many shapes per video.
    - `train_videos`, `eval_videos`: how many training and held-out videos.
    - `seed`: the data and initialisation seed (the held-out videos use `seed + 1`).
    - `mesh`: the LM's mesh, an LWM-style string `"dp,fsdp,tp,sp"`.
    - `vq`, `vq_steps`, `vq_batch`, `vq_learning_rate`, `restart_every`: the VQ tokenizer and its
      training (dead codes restart every `restart_every` steps).
    - `lm`, `lm_train`: the video-text LM and its training.
    - `tasks`: `(task, weight)` pairs of [`video_text_examples`][data_pipelines.video_text_examples].

    **Raises:** `ValueError` for a count below 1 (a negative `seed`), or for an `lm` or `vq` that does
    not match the videos: `vq.frame_size` must be `frame_size`, and `lm`'s `num_frames`,
    `codebook_size` and `codes_per_frame` must be `num_frames`, `vq.codebook_size` and `vq.grid ** 2`.
    """

    num_frames: int = 2
    frame_size: int = 32
    max_shapes: int = 1
    train_videos: int = 30_000
    eval_videos: int = 200
    seed: int = 0
    mesh: str = "4,1,1,2"
    vq: VQConfig = VQConfig(frame_size=32, patch=4, hidden=128, codebook_size=256, code_dim=16)
    vq_steps: int = 800
    vq_batch: int = 16
    vq_learning_rate: float = 2e-3
    restart_every: int = 50
    lm: VideoTextConfig = VideoTextConfig(
        codebook_size=256, num_frames=2, codes_per_frame=64, d_model=96, num_layers=3, num_heads=4,
        num_kv_heads=2, hidden_size=256, remat_policy=None,
        attention=AttentionSpec(layout="zigzag", tuning=KernelTuning(query_chunk_size=256, key_chunk_size=256)),
    )
    lm_train: TrainConfig = TrainConfig(stages=(Stage(seq_len=1024, steps=500),), batch_size=8,
                                        learning_rate=3e-3, warmup_steps=50, checkpoint_every=250)
    tasks: tuple[tuple[str, float], ...] = (("video_to_text", 0.85), ("text_to_video", 0.15))

    def __post_init__(self):
        counts = ("num_frames", "frame_size", "max_shapes", "train_videos", "eval_videos", "vq_steps", "vq_batch",
                  "restart_every")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"DemoConfig.seed must be >= 0, got {self.seed}")
        # The LM's and the VQ's sizes are derived from the videos': a mismatch trains, then fails or
        # decodes garbage, so it is refused here.
        derived = (("vq.frame_size", self.vq.frame_size, "frame_size", self.frame_size),
                   ("lm.num_frames", self.lm.num_frames, "num_frames", self.num_frames),
                   ("lm.codebook_size", self.lm.codebook_size, "vq.codebook_size", self.vq.codebook_size),
                   ("lm.codes_per_frame", self.lm.codes_per_frame, "vq.grid ** 2", self.vq.grid**2))
        for name, value, source, expected in derived:
            if value != expected:
                raise ValueError(f"DemoConfig.{name} must equal {source}={expected}, got {value}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DemoConfig":
        """The config that `dataclasses.asdict` turned into `data` (e.g. read back from JSON).

        **Arguments:**

        - `data`: a dict of `DemoConfig` fields, nested configs as dicts; a field left out keeps its
          default.

        **Returns:** the `DemoConfig`.

        **Raises:** `ValueError` for a key that is not a field (of `DemoConfig` or a nested config),
        or values the configs refuse.
        """
        fields = dict(data)
        if "vq" in fields:
            fields["vq"] = config_from_dict(VQConfig, fields["vq"], "DemoConfig.vq")
        if "lm" in fields:
            fields["lm"] = config_from_dict(VideoTextConfig, fields["lm"], "DemoConfig.lm")
        if "lm_train" in fields:
            train_fields = dict(fields["lm_train"])
            if "stages" in train_fields:
                train_fields["stages"] = tuple(config_from_dict(Stage, s, "a stage") for s in train_fields["stages"])
            fields["lm_train"] = config_from_dict(TrainConfig, train_fields, "DemoConfig.lm_train")
        if "tasks" in fields:
            fields["tasks"] = tuple((str(task), float(weight)) for task, weight in fields["tasks"])
        return config_from_dict(cls, fields, "DemoConfig")


def videos(config: DemoConfig, split: str):
    """The demo's `MovingShapes` split: `"train"` (seed `seed`) or `"eval"` (seed `seed + 1`, unseen videos)."""
    from data_pipelines import MovingShapes

    count, seed = (config.train_videos, config.seed) if split == "train" else (config.eval_videos, config.seed + 1)
    return MovingShapes(count, num_frames=config.num_frames, size=config.frame_size, max_shapes=config.max_shapes,
                        seed=seed)


def train_vq(config: DemoConfig, workdir: Path, *, progress: bool = True) -> VideoVQ:
    """Stage 1: the frame tokenizer, on single frames of the training videos, with dead-code restarts."""
    import grain

    from data_pipelines import process_rows
    from eqx_ring.sharding import make_mesh, shard_params

    # Data parallel over every device (of every process); each process renders the whole batch and
    # keeps the rows its devices hold.
    mesh = make_mesh(dp=-1, fsdp=1)
    rows = np.asarray(process_rows(mesh, config.vq_batch))
    source = videos(config, "train")
    frames = (grain.MapDataset.source(source).shuffle(seed=config.seed).repeat(None)
              .map(lambda r: {"video": r["frames"]}).batch(config.vq_batch)
              .map(lambda b: {"video": b["video"][rows]})
              # One thread renders a few batches ahead: grain's default (16 threads, 500 batches ahead)
              # rendered thousands of videos ahead on the cores the training steps need.
              .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))
    vq = shard_params(VideoVQ(config.vq, key=jax.random.key(config.seed)), mesh)
    train_config = TrainConfig(stages=(Stage(seq_len=config.num_frames, steps=config.vq_steps),),
                               batch_size=config.vq_batch, learning_rate=config.vq_learning_rate, warmup_steps=20,
                               weight_decay=0.0, checkpoint_every=config.vq_steps)

    def loss_fn(model, batch):
        loss, metrics = vq_loss(model, batch["video"])
        return loss, {"reconstruction": metrics["reconstruction"], "perplexity": metrics["perplexity"]}

    restart = eqx.filter_jit(_restart_dead_codes)

    def after_step(model, batch, metrics, step):
        if step % config.restart_every or step > config.vq_steps * 3 // 4:
            return model
        return restart(model, batch["video"], jax.random.key(step))

    result = train(vq, loss_fn, lambda i, stage: frames, train_config, workdir=workdir / "vq", mesh=mesh,
                   tokens_per_batch=lambda b: int(np.prod(b["video"].shape[:2])) * config.vq.grid**2,
                   after_step=after_step, progress=progress, description="VQ tokenizer")
    if jax.process_index() == 0:
        plot_metrics(result.records, workdir / "vq_loss.png", keys=("loss", "reconstruction"),
                     title="VideoVQ training loss")
    return local_copy(result.model)


def local_copy(model: eqx.Module) -> eqx.Module:
    """A replicated model's copy on this process's first device: for work each process does alone."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, model)


def _restart_dead_codes(model: VideoVQ, video, key) -> VideoVQ:
    from ._vq import to_unit

    usage = vq_loss(model, video)[1]["usage"]
    return model.restart_dead_codes(usage, to_unit(video.reshape(-1, *video.shape[2:])), key)


# Built once, so that the demo's several encode / decode calls reuse the compiled program of a batch shape.
_encode_batch = eqx.filter_jit(jax.vmap(lambda m, v: m.encode(v), in_axes=(None, 0)))
_decode_batch = eqx.filter_jit(jax.vmap(lambda m, c: m.decode(c), in_axes=(None, 0)))


def encode(vq: VideoVQ, source, *, batch_size: int = 256) -> list[dict[str, Any]]:
    """Every record of `source` with its video replaced by VQ codes `[frames, grid²]` (the LM's input)."""
    records = []
    for start in range(0, len(source), batch_size):
        chunk = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        codes = np.asarray(_encode_batch(vq, jnp.asarray(np.stack([r["frames"] for r in chunk]))))
        records += [{**{k: v for k, v in r.items() if k != "frames"}, "codes": c} for r, c in zip(chunk, codes,
                                                                                                     strict=True)]
    return records


def train_video_text(config: DemoConfig, records: list[dict[str, Any]], workdir: Path, mesh, *,
                     progress: bool = True, after_step=None) -> VideoTextLM:
    """Stage 2: the video-text LM on the encoded videos, packed and laid out for the ring on `mesh`.

    `after_step` goes to [`train`][models.train].
    """
    from data_pipelines import ByteTokenizer, global_packed_batches, process_rows, video_text_examples
    from eqx_ring.sharding import BATCH_AXES, shard_params

    ring, batch_size = mesh.shape["sp"], config.lm_train.batch_size
    lm = shard_params(VideoTextLM(config.lm, mesh=mesh, key=jax.random.key(config.seed + 1)), mesh)

    def batches(index: int, stage: Stage):
        # Every process reads the same examples and packs the rows its devices hold, so the global
        # batches (and a checkpoint's data position) do not depend on the number of processes.
        examples = video_text_examples(records, video_tokenizer=None, tasks=dict(config.tasks),
                                       seed=config.seed + index, num_epochs=None, process_index=0, process_count=1)
        return global_packed_batches(examples, seq_len=stage.seq_len, batch_size=batch_size,
                                     pad_id=ByteTokenizer.pad_id, rows=process_rows(mesh, batch_size),
                                     layout=config.lm.attention.layout, ring_size=ring, vocab_size=config.lm.vocab_size)

    result = train(lm, lambda m, b: m.loss(b, spmd_axis_name=BATCH_AXES), batches, config.lm_train,
                   workdir=workdir / "lm", mesh=mesh, progress=progress, after_step=after_step,
                   description="video-text LM")
    if jax.process_index() == 0:
        plot_metrics(result.records, workdir / "lm_loss.png", keys=("loss", "text_loss", "vision_loss"),
                     title="VideoTextLM training loss")
    return result.model


def evaluate_captions(lm: VideoTextLM, vq: VideoVQ, config: DemoConfig) -> dict[str, Any]:
    """Caption the held-out videos greedily and score them against the truth, with a chance baseline."""
    from data_pipelines import COLORS, MOTIONS, SHAPES, ByteTokenizer, caption, score_captions

    tokenizer = ByteTokenizer()
    held_out = encode(vq, videos(config, "eval"))
    start = time.perf_counter()
    predicted = [tokenizer.decode(ids) for ids in lm.caption(np.stack([r["codes"] for r in held_out]), tokenizer)]
    seconds = time.perf_counter() - start
    # Chance: captions with the right number of shapes and uniformly random attributes.
    rng = np.random.default_rng(config.seed)
    random_captions = [
        caption(*(rng.integers(0, len(names), int(r["num_shapes"])) for names in (SHAPES, COLORS, MOTIONS)))
        for r in held_out
    ]
    return {
        "accuracy": score_captions(predicted, held_out),
        "chance": score_captions(random_captions, held_out),
        "examples": [{"truth": r["caption"], "predicted": p} for r, p in zip(held_out, predicted, strict=True)],
        "caption_seconds": seconds,
    }


def evaluate_vq(vq: VideoVQ, config: DemoConfig) -> dict[str, float]:
    """How much of each attribute the VQ keeps: the held-out videos, encoded, decoded and read back.

    The ceiling of text→video: a generated video is decoded by this VQ, so an attribute the
    reconstructions lose cannot be read back from any video the LM writes. Read by
    [`describe_video`][data_pipelines.describe_video], scored by
    [`score_videos`][data_pipelines.score_videos]; single-shape videos only (`max_shapes=1`).

    **Returns:** `{"shape", "color", "motion", "all"}`: the share of reconstructions read back as
    their caption says.
    """
    from data_pipelines import describe_video, score_videos

    held_out = encode(vq, videos(config, "eval"))
    frames = decode(vq, np.stack([r["codes"] for r in held_out]))
    return score_videos([describe_video(f) for f in frames], [r["caption"] for r in held_out])


def sample_videos(lm: VideoTextLM, vq: VideoVQ, captions: list[str], *, temperature: float,
                  seed: int) -> np.ndarray:
    """Videos sampled from `captions` and decoded by the VQ: uint8 frames `[len(captions), frames, H, W, 3]`."""
    from data_pipelines import ByteTokenizer

    tokenizer = ByteTokenizer()
    codes = np.asarray(lm.generate_video([tokenizer.encode(c) for c in captions], tokenizer,
                                         temperature=temperature, key=jax.random.key(seed)))
    return decode(vq, codes)


def decode(vq: VideoVQ, codes) -> np.ndarray:
    """Videos from their codes `[batch, frames, grid²]`: uint8 frames `[batch, frames, H, W, 3]`."""
    return np.asarray(_decode_batch(vq, jnp.asarray(codes)))


def evaluate_generation(lm: VideoTextLM, vq: VideoVQ, config: DemoConfig, *, temperature: float = 0.8,
                        seed: int = 0) -> dict[str, Any]:
    """Text→video: sample a video from each held-out caption and read it back with a detector.

    Each video is decoded by the VQ and described by
    [`describe_video`][data_pipelines.describe_video] (exact on rendered videos: shape, colour and
    motion from the pixels); [`score_videos`][data_pipelines.score_videos] gives the share whose
    attributes match the caption's. Single-shape videos only (`max_shapes=1`, the demo's).
    Sampled at `temperature` by `sample_videos`, as `generate_grid`'s videos are.

    **Returns:** `{"match": {"shape", "color", "motion", "all"}, "chance": {...}, "videos": n, "seconds": s}`,
    where chance is one over the attribute's number of values (`"all"`: their product).
    """
    from data_pipelines import COLORS, MOTIONS, SHAPES, describe_video, score_videos

    held_out = videos(config, "eval")
    captions = [held_out[i]["caption"] for i in range(len(held_out))]
    start = time.perf_counter()
    frames = sample_videos(lm, vq, captions, temperature=temperature, seed=seed)
    match = score_videos([describe_video(f) for f in frames], captions)
    chance = {"shape": 1 / len(SHAPES), "color": 1 / len(COLORS), "motion": 1 / len(MOTIONS)}
    chance["all"] = chance["shape"] * chance["color"] * chance["motion"]
    return {"match": match, "chance": chance, "videos": len(captions), "seconds": time.perf_counter() - start}


def generate_grid(lm: VideoTextLM, vq: VideoVQ, captions: list[str], path: Path, *, temperature: float = 0.8,
                  seed: int = 0) -> None:
    """Sample videos from `captions` and save their frames as a PNG grid, one row per caption (process 0 writes it).

    Sampled, not greedy: the most likely code of almost every cell is the background's. Missing
    folders of `path` are created.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = sample_videos(lm, vq, captions, temperature=temperature, seed=seed)
    if jax.process_index() != 0:
        return
    rows, cols = frames.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), dpi=100, squeeze=False)
    for r in range(rows):
        for t in range(cols):
            axes[r, t].imshow(frames[r, t])
            axes[r, t].axis("off")
        axes[r, 0].set_title(captions[r], fontsize=8, loc="left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_demo(config: DemoConfig, workdir: str | Path, *, progress: bool = True, echo=print) -> dict[str, Any]:
    """Train the VQ and the video-text LM on a ring mesh, caption held-out videos, draw videos from text.

    Writes to `workdir`: zoo files `vq.json/.eqx` and `video_text_lm.json/.eqx`, checkpoints and
    `metrics.jsonl` of both stages, `vq_loss.png`, `lm_loss.png`, `generated.png` and
    `results.json`. A rerun resumes (finished stages load from the zoo files). Prints each stage's
    wall time as it ends (`results.json` keeps them as `stage_seconds`). With one shape per video,
    it also reads the VQ's held-out reconstructions back (`evaluate_vq`, `results.json`:
    `vq_readback`): what text→video can reach at most.
    """
    from eqx_ring.sharding import make_mesh

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = time.perf_counter() - start - sum(stages.values())
        echo(f"[{name}: {stages[name]:.0f} s]")

    mesh = make_mesh(config.mesh)
    echo(f"mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} devices; "
         f"{config.train_videos} training videos of {config.num_frames} frames, {config.frame_size}x"
         f"{config.frame_size}, up to {config.max_shapes} shape(s)")

    if (workdir / "vq.json").exists():
        vq = load(workdir / "vq")
    else:
        vq = train_vq(config, workdir, progress=progress)
        save(workdir / "vq", vq)
    held = np.stack([videos(config, "eval")[i]["frames"] for i in range(min(64, config.eval_videos))])
    _, vq_metrics = eqx.filter_jit(vq_loss)(vq, jnp.asarray(held))
    echo(f"VQ: held-out reconstruction MSE {float(vq_metrics['reconstruction']):.4f} (in [-1, 1] units), "
         f"{int((vq_metrics['usage'] > 0).sum())}/{config.vq.codebook_size} codes used, "
         f"perplexity {float(vq_metrics['perplexity']):.1f}")
    if config.max_shapes == 1:
        readback = evaluate_vq(vq, config)
        echo(f"VQ: held-out reconstructions read back by describe_video: shape {readback['shape']:.1%}, "
             f"colour {readback['color']:.1%}, motion {readback['motion']:.1%}")
    lap("VQ stage")

    records = encode(vq, videos(config, "train"))
    lap("encoding the training videos")
    if (workdir / "video_text_lm.json").exists():
        lm = load(workdir / "video_text_lm", mesh=mesh)
    else:
        lm = train_video_text(config, records, workdir, mesh, progress=progress)
        save(workdir / "video_text_lm", lm)
    lap("LM stage")

    result = evaluate_captions(lm, vq, config)
    acc, chance = result["accuracy"], result["chance"]
    echo(f"\nHeld-out captions ({config.eval_videos} unseen videos, greedy decoding):")
    for example in result["examples"][:8]:
        echo(f"  truth:     {example['truth']}\n  predicted: {example['predicted']}")
    echo(f"\n{'attribute':<10}{'accuracy':>10}{'chance':>10}")
    for name in ("color", "shape", "motion", "exact"):
        echo(f"{name:<10}{acc[name]:>10.1%}{chance[name]:>10.1%}")

    prompts = sorted({e["truth"] for e in result["examples"]})[:: max(1, config.eval_videos // 6)][:6]
    lap("captioning")
    generate_grid(lm, vq, prompts, workdir / "generated.png")
    if config.max_shapes == 1:
        generation = evaluate_generation(lm, vq, config, seed=config.seed)
        echo(f"\nText to video ({generation['videos']} videos sampled from the held-out captions, read back by "
             f"describe_video):\n{'attribute':<10}{'match':>10}{'chance':>10}")
        for name in ("color", "shape", "motion", "all"):
            echo(f"{name:<10}{generation['match'][name]:>10.1%}{generation['chance'][name]:>10.1%}")
        result["text_to_video"] = generation
    lap("generating videos")
    result.update(seconds=time.perf_counter() - start, stage_seconds=stages,
                  vq_reconstruction=float(vq_metrics["reconstruction"]), config=dataclasses.asdict(config))
    if config.max_shapes == 1:
        result["vq_readback"] = readback
    if jax.process_index() == 0:
        with open(workdir / "results.json", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    echo(f"\nwrote {workdir}/lm_loss.png, {workdir}/generated.png and {workdir}/results.json "
         f"in {result['seconds']:.0f} s")
    return result
