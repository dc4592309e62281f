"""The long-context job: needle retrieval over long videos, trained with the sequence split over a ring of devices.

A `VideoTextLM` learns to answer "What colour is the triangle?" after a video of hundreds to thousands of
frames in which one frame shows a triangle ([`NeedleVideo`][data_pipelines.NeedleVideo]). It trains through
progressive context stages with a rising RoPE base, as LWM did, then is scored over a grid of context
lengths × needle depths beside a control: the same model and budget with attention limited to a sliding window.
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqx_ring import AttentionSpec, KernelTuning

from ._lm import config_from_dict, require_float
from ._train import Stage, TrainConfig, train
from ._video_lm import VideoTextConfig, VideoTextLM
from ._zoo import load, save

_DEPTHS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class NeedleConfig:
    """The needle job: data, model, training stages, the window control and the evaluation grid.

    JSON-serialisable: `dataclasses.asdict` writes it and
    [`from_dict`][models.NeedleConfig.from_dict] reads it back (`eqx-ring needle` keeps a workdir's
    settings in `needle_config.json`, which `--eval-only` reuses).

    **Arguments:**

    - `lm`: the [`VideoTextConfig`][models.VideoTextConfig]; its vocabulary must hold the byte
      tokenizer's ids and the 64 patch codes of [`NeedleVideo`][data_pipelines.NeedleVideo].
    - `stages`: the progressive context stages, [`Stage`][models.Stage]`(seq_len, steps, rope_theta)`;
      each trains on rows of `seq_len` tokens, one video per row, from the previous stage's weights.
    - `tokens_per_step`: tokens per optimizer step in every stage: a stage's batch is
      `tokens_per_step // seq_len` rows (at least one).
    - `learning_rate`: each stage's peak learning rate (a cosine schedule per stage), except the last's;
      `warmup_steps`: each stage's warm-up steps (at most its steps).
    - `last_stage_learning_rate`: the last stage's peak learning rate. That stage trains on one
      long row per step and its weights are the ones evaluated: in a development run (32 videos
      per cell at 1K and 8K, not kept) its 8,192-token stage at 3e-3 ended confusing orange triangles
      with blue ones (30 of 32 in 21 of the 22 cells, 29 in the other), and at 1e-3 from the same
      weights missed 3 of 704.
    - `window`: the control model's `sliding_window` (keys at most `window - 1` tokens back).
    - `eval_lengths`: the context lengths (tokens) of the evaluation grid.
    - `examples_per_cell`: fresh videos per (length, depth) cell.
    - `seed`: the training data's and initialisation's seed; `eval_seed`: the evaluation data's.

    **Raises:** `ValueError` naming the field for a count below 1, a negative seed, a learning rate
    that is not a finite float > 0, no stages, or an evaluation length below one frame's video.
    """

    lm: VideoTextConfig = VideoTextConfig(
        codebook_size=64, num_frames=1630, codes_per_frame=4, d_model=64, num_layers=2, num_heads=2,
        num_kv_heads=2, hidden_size=128, remat_policy=None, text_loss_weight=1.0,
        attention=AttentionSpec(layout="zigzag", tuning=KernelTuning(query_chunk_size=256, key_chunk_size=256)),
    )
    stages: tuple[Stage, ...] = (Stage(seq_len=128, steps=1200, rope_theta=1e6),
                                 Stage(seq_len=512, steps=400, rope_theta=2e6),
                                 Stage(seq_len=2048, steps=160, rope_theta=5e6),
                                 Stage(seq_len=4096, steps=80, rope_theta=7e6),
                                 Stage(seq_len=8192, steps=120, rope_theta=1e7))
    tokens_per_step: int = 4096
    learning_rate: float = 3e-3
    last_stage_learning_rate: float = 1e-3
    warmup_steps: int = 30
    window: int = 1024
    eval_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    examples_per_cell: int = 20
    seed: int = 0
    eval_seed: int = 1

    def __post_init__(self):
        for name in ("tokens_per_step", "warmup_steps", "window", "examples_per_cell"):
            if getattr(self, name) < 1:
                raise ValueError(f"NeedleConfig.{name} must be a positive int, got {getattr(self, name)}")
        for name in ("learning_rate", "last_stage_learning_rate"):
            require_float(self, name, low=0.0, open_low=True)
        for name in ("seed", "eval_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"NeedleConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.stages:
            raise ValueError("NeedleConfig.stages must hold at least one Stage")
        shortest = _source(1, length=None, seed=0).sequence_length
        for length in self.eval_lengths:
            if length < shortest:
                raise ValueError(f"NeedleConfig.eval_lengths must be >= {shortest} tokens (one frame), got {length}")

    @property
    def trained_length(self) -> int:
        """The longest stage's `seq_len`: the context the model was trained on."""
        return max(stage.seq_len for stage in self.stages)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NeedleConfig":
        """The config that `dataclasses.asdict` turned into `data` (e.g. read back from JSON).

        **Arguments:**

        - `data`: a dict of `NeedleConfig` fields, nested configs as dicts; a field left out keeps
          its default.

        **Returns:** the `NeedleConfig`.

        **Raises:** `ValueError` for a key that is not a field, or values the configs refuse.
        """
        fields = dict(data)
        if "lm" in fields:
            fields["lm"] = config_from_dict(VideoTextConfig, fields["lm"], "NeedleConfig.lm")
        if "stages" in fields:
            fields["stages"] = tuple(config_from_dict(Stage, s, "a stage") for s in fields["stages"])
        if "eval_lengths" in fields:
            fields["eval_lengths"] = tuple(int(n) for n in fields["eval_lengths"])
        return config_from_dict(cls, fields, "NeedleConfig")


def _source(num_examples: int, *, length: int | None, seed: int, depth: float | None = None):
    from data_pipelines import NeedleVideo

    if length is None:
        return NeedleVideo(num_examples, num_frames=1, seed=seed)
    return NeedleVideo.for_length(num_examples, length=length, depth=depth, seed=seed)


def _batches(dataset, *, seq_len: int, batch_size: int, mesh, layout: str, vocab_size: int):
    """One video per row: `for_length` fills a row to within one frame, so no second video fits beside it."""
    import grain

    from data_pipelines import ByteTokenizer, global_packed_batches, process_rows

    if not isinstance(dataset, grain.MapDataset):
        dataset = grain.MapDataset.source(dataset)
    return global_packed_batches(dataset, seq_len=seq_len, batch_size=batch_size, pad_id=ByteTokenizer.pad_id,
                                 rows=process_rows(mesh, batch_size), layout=layout, ring_size=mesh.shape["sp"],
                                 vocab_size=vocab_size)


# The share of training videos whose needle is the first or the last frame (half each). A uniform depth almost never
# draws them (one slot in thousands at 8,192 tokens); without them, development runs of this recipe (not kept) were
# weakest by far at depth 0, where the needle sits among the sequence's first tokens.
_ENDS = 0.25


def _training_videos(count: int, *, length: int, seed: int):
    import grain

    # Each part as long as the whole: the mixture's length is the smallest part's over its weight.
    parts = [_source(count, length=length, seed=seed), _source(count, length=length, seed=seed + 1, depth=0.0),
             _source(count, length=length, seed=seed + 2, depth=1.0)]
    return grain.MapDataset.mix([grain.MapDataset.source(p) for p in parts], [1 - _ENDS, _ENDS / 2, _ENDS / 2])


def stage_mesh(rows: int):
    """The mesh for `rows` rows per step: rows over `dp`, each row's sequence over the remaining devices' `sp` ring.

    Short stages are data parallel (splitting a 128-token row over 8 devices leaves each device 16
    tokens: the ring's hops cost more than its blocks); a stage of one row per step splits it over
    every device.

    **Arguments:**

    - `rows`: the rows of one step.

    **Returns:** a mesh over all of `jax.devices()` with `dp = gcd(rows, devices)` and `sp` the rest.
    """
    from eqx_ring.sharding import make_mesh

    devices = len(jax.devices())
    dp = math.gcd(rows, devices)
    return make_mesh(dp=dp, fsdp=1, tp=1, sp=devices // dp)


def train_needle(config: NeedleConfig, workdir: Path, *, window: int | None = None, progress: bool = True,
                 echo=print) -> tuple[VideoTextLM, list[dict[str, Any]]]:
    """Train through `config.stages`, each stage resuming from its own checkpoints in `workdir/stage{i}`.

    Each stage runs on [`stage_mesh`][models.stage_mesh] of its rows, on videos of its length (a
    quarter of them with the needle in the first or last frame). A finished stage is saved as the
    zoo file `workdir/stage{i}` and loaded on a rerun.

    **Arguments:**

    - `config`: the [`NeedleConfig`][models.NeedleConfig].
    - `workdir`: this model's folder.
    - `window`: `None` for exact attention, or the `sliding_window` of every stage (the control).
    - `progress`: progress bars (see [`train`][models.train]).
    - `echo`: prints one line per finished stage.

    **Returns:** `(model, stages)`: the model on the last stage's mesh, and each stage's summary
    (`seq_len`, `steps`, `rope_theta`, `seconds` and `tokens_per_s` summed from its metrics, last `loss`).
    """
    from eqx_ring.sharding import BATCH_AXES, shard_params

    lm_config = config.lm
    if window is not None:
        lm_config = dataclasses.replace(lm_config, attention=lm_config.attention.replace(sliding_window=window))
    lm = VideoTextLM(lm_config, key=jax.random.key(config.seed))
    summaries = []
    for index, stage in enumerate(config.stages):
        stage_dir = workdir / f"stage{index}"
        rows = max(1, config.tokens_per_step // stage.seq_len)
        mesh = stage_mesh(rows)
        if stage_dir.with_suffix(".json").exists():
            lm = load(stage_dir, mesh=mesh)
            records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        else:
            lm = shard_params(lm.respec(mesh=mesh), mesh)
            # Each stage is its own run (its batch has another row count); the RoPE base moves with the stage.
            last = index == len(config.stages) - 1
            learning_rate = config.last_stage_learning_rate if last else config.learning_rate
            train_config = TrainConfig(stages=(stage,), batch_size=rows, learning_rate=learning_rate,
                                       warmup_steps=min(config.warmup_steps, stage.steps), weight_decay=0.0,
                                       checkpoint_every=max(1, stage.steps // 2))
            source = _training_videos(stage.steps * rows, length=stage.seq_len, seed=config.seed + 1000 * index)

            def batches(_, s, source=source, rows=rows, mesh=mesh):
                return _batches(source, seq_len=s.seq_len, batch_size=rows, mesh=mesh,
                                layout=lm_config.attention.layout, vocab_size=lm_config.vocab_size)

            result = train(lm, lambda m, b: m.loss(b, spmd_axis_name=BATCH_AXES), batches, train_config,
                           workdir=stage_dir, mesh=mesh, progress=progress,
                           description=f"{'window' if window else 'ring'} stage {index + 1}/{len(config.stages)} "
                                       f"({stage.seq_len} tokens)")
            lm, records = result.model, result.records
            save(stage_dir, lm)
        seconds = sum(r["seconds"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        summaries.append({"seq_len": stage.seq_len, "steps": len(records), "rope_theta": stage.rope_theta,
                          "seconds": seconds, "tokens_per_s": tokens / seconds, "loss": records[-1]["loss"]})
        echo(f"  stage {index + 1}: {rows} x {stage.seq_len} tokens x {len(records)} steps on {dict(mesh.shape)}, "
             f"loss {records[-1]['loss']:.3f}, "
             f"{seconds:.0f} s in steps ({tokens / seconds:,.0f} tokens/s)")
    return lm, summaries


def needle_accuracy(lm: VideoTextLM, source, mesh, *, seq_len: int) -> dict[str, float]:
    """How often the model answers `source`'s examples (rows of `seq_len` tokens on `mesh`) right.

    **Arguments:**

    - `lm`: the model, placed on `mesh`.
    - `source`: a [`NeedleVideo`][data_pipelines.NeedleVideo]; all its examples go in one batch.
    - `mesh`: the mesh to run on; its data axes must divide `len(source)`.
    - `seq_len`: the row length, at least `source.sequence_length` and a multiple the ring splits.

    **Returns:** `{"accuracy": ..., "exact": ...}`. `"accuracy"`: the share of examples where the
    colour the model names is the truth, read as a choice among the colour names: the colours'
    first bytes differ, so the name whose first byte gets the highest probability after the question
    is the model's answer (chance: one in `len(COLORS)`). `"exact"`: the share where greedy decoding
    would also spell the whole name and stop, i.e. the argmax of every answer token and of `<eos>`
    is the truth under teacher forcing; it also counts the tiny model's spelling slips.
    """
    from data_pipelines import COLORS, ByteTokenizer, global_batch

    rows = len(source)
    batches = _batches(source, seq_len=seq_len, batch_size=rows, mesh=mesh, layout=lm.spec.layout,
                       vocab_size=lm.config.vocab_size)
    batch = global_batch(next(iter(batches)), mesh, batch_size=rows)
    initials = jnp.asarray([ByteTokenizer().encode(name)[0] for name in COLORS])
    chosen, exact = _correct_rows(lm, batch, initials)
    return {"accuracy": int(chosen) / rows, "exact": int(exact) / rows}


@eqx.filter_jit
def _correct_rows(lm: VideoTextLM, batch, initials):
    from eqx_ring.sharding import BATCH_AXES

    from ._lm import batch_hidden

    hidden = batch_hidden(lm.transformer, batch, BATCH_AXES, None)
    logits = lm.transformer.logits(hidden)
    mask, targets = batch["target_mask"], batch["targets"]
    # The answer's first token is the trained target with the lowest position (rows are in ring layout order).
    first = jnp.argmin(jnp.where(mask, batch["positions"], jnp.iinfo(jnp.int32).max), axis=-1)
    at_first = jnp.take_along_axis(logits, first[:, None, None], axis=1)[:, 0]
    choice = initials[jnp.argmax(at_first[:, initials], axis=-1)]
    truth = jnp.take_along_axis(targets, first[:, None], axis=1)[:, 0]
    # Padding rows (a batch not full) have no targets; they are not examples.
    real = mask.any(axis=-1)
    wrong = mask & (jnp.argmax(logits, axis=-1) != targets)
    return (real & (choice == truth)).sum(), (real & ~wrong.any(axis=-1)).sum()


def evaluate_needle(lm: VideoTextLM, config: NeedleConfig, *, seed: int, echo=print) -> dict[str, dict[str, Any]]:
    """Score `lm` on fresh videos of `seed` over the grid `config.eval_lengths` × depths 0 %, 10 %, …, 100 %.

    Every row's sequence is split over all devices (`stage_mesh(1)`).

    **Arguments:**

    - `lm`: the trained model (any mesh; it is moved).
    - `config`: the [`NeedleConfig`][models.NeedleConfig]: lengths and videos per cell.
    - `seed`: the evaluation videos' seed.
    - `echo`: prints one line per length.

    **Returns:** `{"<length>": {"<depth %>": {"accuracy": a, "exact": e}}}` (see
    [`needle_accuracy`][models.needle_accuracy]).
    """
    from eqx_ring.sharding import shard_params

    mesh = stage_mesh(1)
    lm = shard_params(lm.respec(mesh=mesh), mesh)
    grid: dict[str, dict[str, Any]] = {}
    for length in config.eval_lengths:
        start = time.perf_counter()
        grid[str(length)] = {
            f"{round(100 * depth)}": needle_accuracy(
                lm, _source(config.examples_per_cell, length=length, seed=seed, depth=depth), mesh, seq_len=length)
            for depth in _DEPTHS
        }
        mean = np.mean([cell["accuracy"] for cell in grid[str(length)].values()])
        echo(f"  {length:>6} tokens: mean accuracy {mean:.1%} over {len(_DEPTHS)} depths "
             f"({time.perf_counter() - start:.0f} s)")
    return grid


def plot_needle(result: dict[str, Any], path: Path) -> None:
    """LWM's figure: accuracy over context length × needle depth, the ring model beside the window control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("ring", "ring attention (exact)"), ("window_control", f"sliding window of {result['window']} tokens"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for ax, (key, title) in zip(axes, panels, strict=True):
        lengths = list(result[key])
        depths = list(result[key][lengths[0]])
        table = np.array([[result[key][n][d] for n in lengths] for d in depths])
        image = ax.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        for (row, col), value in np.ndenumerate(table):
            ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}K" if int(n) >= 1024 else n for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title, fontsize=10)
        trained = lengths.index(str(result["trained_length"])) if str(result["trained_length"]) in lengths else None
        if trained is not None:
            ax.axvline(trained + 0.5, color="black", lw=1, ls="--")
    axes[0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes, fraction=0.025, label="accuracy")
    fig.suptitle(f"Needle retrieval over long videos: trained to {result['trained_length']:,} tokens (dashed), "
                 f"{result['examples_per_cell']} videos per cell", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


SETTINGS = "needle_config.json"


def run_needle(config: NeedleConfig, workdir: str | Path, *, eval_only: bool = False, seed: int | None = None,
               out: str | Path | None = None, progress: bool = True, echo=print) -> dict[str, Any]:
    """Train the ring model and the window control (unless `eval_only`), evaluate both, write JSON and the heatmap.

    Writes to `workdir`: `needle_config.json` (the settings, which `eval_only` reads back), each
    model's stages (`ring/stage{i}`, `window/stage{i}`: checkpoints, metrics, zoo files), and
    `needle.json` and `needle.png`; `out` replaces the JSON's path (the PNG goes beside it). A rerun
    resumes where the last one stopped.

    **Arguments:**

    - `config`: the [`NeedleConfig`][models.NeedleConfig].
    - `workdir`: the run's folder.
    - `eval_only`: load the trained models' last stages from `workdir` instead of training.
    - `seed`: the evaluation seed; default `config.eval_seed`.
    - `out`: where to write the JSON; default `workdir/needle.json`.
    - `progress`: progress bars while training.
    - `echo`: prints the run's lines.

    **Returns:** the JSON's dict: `trained_length`, `window`, `ring` and `window_control`
    (`{"<length>": {"<depth %>": accuracy}}`), `examples_per_cell`, `seed`, and `details`: exact
    (greedy spelling) scores, stage summaries and wall times per phase.
    """
    workdir = Path(workdir)
    seed = config.eval_seed if seed is None else seed
    start = time.perf_counter()
    echo(f"{len(jax.devices())} {jax.devices()[0].platform} devices; stages "
         + ", ".join(f"{s.seq_len}:{s.steps}" for s in config.stages) + f"; window control {config.window} tokens")
    models, phases, stages = {}, {}, {}
    for name, window in (("ring", None), ("window", config.window)):
        phase = time.perf_counter()
        if eval_only:
            last = workdir / name / f"stage{len(config.stages) - 1}"
            models[name] = load(last)
        else:
            echo(f"training the {name} model")
            models[name], stages[name] = train_needle(config, workdir / name, window=window, progress=progress,
                                                      echo=echo)
        phases[f"train_{name}"] = time.perf_counter() - phase
    grids = {}
    for name in models:
        phase = time.perf_counter()
        echo(f"evaluating the {name} model (seed {seed}, {config.examples_per_cell} videos per cell)")
        grids[name] = evaluate_needle(models[name], config, seed=seed, echo=echo)
        phases[f"eval_{name}"] = time.perf_counter() - phase
    phases["total"] = time.perf_counter() - start

    def table(grid, key):
        return {n: {d: cell[key] for d, cell in row.items()} for n, row in grid.items()}

    result = {"trained_length": config.trained_length, "window": config.window,
              "ring": table(grids["ring"], "accuracy"), "window_control": table(grids["window"], "accuracy"),
              "examples_per_cell": config.examples_per_cell, "seed": seed,
              "details": {"exact": {name: table(grid, "exact") for name, grid in grids.items()},
                          "stages": stages, "seconds": phases}}
    path = Path(out) if out is not None else workdir / "needle.json"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        plot_needle(result, path.with_suffix(".png"))
    echo(f"wrote {path} and {path.with_suffix('.png')} in {phases['total']:.0f} s")
    return result
