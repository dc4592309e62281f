"""Training: AdamW with warmup + cosine, clipping, accumulation, bf16 compute, orbax checkpoints and exact resume."""

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from eqx_ring import RMSNorm, RopeScaling
from eqx_ring.sharding import batch_sharding, shard_params

from ._checkpoint import open_checkpoints, restore_checkpoint, save_checkpoint
from ._lm import WHOLE_BATCH, require_float, require_int
from ._protocol import RingModel

logger = logging.getLogger(__name__)

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
"""`loss_fn(model, batch) -> (loss, metrics)`: a scalar to minimise and named scalars to log; when
[`train`][models.train] is given a `key`, `loss_fn(model, batch, key=k)` with that step's key.

With `grad_accum > 1` [`make_train_step`][models.make_train_step] calls it once per microbatch and
averages the results; each microbatch then also holds the whole batch under the key
`"whole_batch"`. A loss that is a mean over equal-sized examples needs nothing more. A mean over
tokens whose number differs between microbatches (packed rows) divides the sum over the
microbatch's tokens by the whole batch's count times the microbatch's share of its rows, so that
the average is the whole batch's mean, as [`RingLM.loss`][models.RingLM.loss] and
[`VideoTextLM.loss`][models.VideoTextLM.loss] do."""


@dataclass(frozen=True)
class Stage:
    """One stage of a context-extension schedule: `steps` steps on rows of `seq_len` tokens.

    [`train`][models.train] runs the stages of [`TrainConfig.stages`][models.TrainConfig] in order
    and hands each to the `batches` callable, which makes rows of `seq_len` tokens (`train` itself
    does not read `seq_len`).

    **Arguments:**

    - `seq_len`: tokens per row in this stage.
    - `steps`: optimiser steps in this stage.
    - `rope_theta`: when given, replaces the model's RoPE base from this stage on (by
      [`respec`][models.respec]; LWM raises it with the context length); `None` (the default)
      keeps the previous stage's.
    - `rope_scale`: when given, position interpolation from this stage on: RoPE's frequencies
      divided by this factor (a `"linear"` [`RopeScaling`][eqx_ring.RopeScaling], replacing the
      model's own scaling, if any; Chen et al. 2023 stretch a model's context by the ratio of the
      new length to the old); `None` (the default) keeps the previous stage's.

    **Raises:** `ValueError`, naming the field and its value, if `seq_len` or `steps` is not a
    positive int, or `rope_theta` or `rope_scale` is neither `None` nor a finite float > 0.
    """

    seq_len: int
    steps: int
    rope_theta: float | None = None
    rope_scale: float | None = None

    def __post_init__(self):
        require_int(self, "seq_len")
        require_int(self, "steps")
        require_float(self, "rope_theta", low=0.0, open_low=True, optional=True)
        require_float(self, "rope_scale", low=0.0, open_low=True, optional=True)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and checkpointing settings of [`train`][models.train]; JSON-serialisable (`dataclasses.asdict`).

    **Arguments:**

    - `stages`: the [`Stage`][models.Stage]s, run in order; default one stage of 1000 steps at
      `seq_len=1024`.
    - `batch_size`: rows per (global) batch.
    - `grad_accum`: microbatches each batch is split into (must divide `batch_size`); their
      losses and gradients are averaged (see [`make_train_step`][models.make_train_step] for
      token means).
    - `learning_rate`: the peak learning rate of AdamW, > 0.
    - `warmup_steps`: steps of linear warmup from 0 to `learning_rate`, >= 0.
    - `final_lr_fraction`: the cosine decay ends at `final_lr_fraction * learning_rate`; in `[0, 1]`.
    - `weight_decay`: AdamW's decoupled weight decay (>= 0), applied to arrays of 2 or more
      dimensions outside normalisation layers.
    - `grad_clip`: the maximum global norm of the gradients, > 0.
    - `compute_dtype`: `"float32"` or `"bfloat16"`: the dtype the model runs in (the master
      weights and the optimiser state stay float32).
    - `checkpoint_every`: save a checkpoint every this many steps (and after the last), >= 1.
    - `max_checkpoints`: how many checkpoints to keep, >= 1.

    **Raises:** `ValueError`, naming the field and its value: for `stages` that are empty or not
    [`Stage`][models.Stage]s; a `batch_size`, `grad_accum`, `checkpoint_every` or
    `max_checkpoints` that is not a positive int, or a `warmup_steps` that is not an int >= 0; a
    `batch_size` that `grad_accum` does not divide; a `learning_rate` or `grad_clip` that is not a
    finite float > 0, a `weight_decay` that is not a finite float >= 0, a `final_lr_fraction`
    outside `[0, 1]`; another `compute_dtype`. (A learning rate of 0 is refused too: it trains
    nothing.)
    """

    stages: tuple[Stage, ...] = (Stage(seq_len=1024, steps=1000),)
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    compute_dtype: str = "float32"
    checkpoint_every: int = 100
    max_checkpoints: int = 2

    def __post_init__(self):
        if isinstance(self.stages, Stage) or not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise ValueError(f"TrainConfig.stages must be a non-empty tuple of Stage, got {self.stages!r}")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "max_checkpoints"):
            require_int(self, name)
        require_int(self, "warmup_steps", minimum=0)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be divisible by "
                             f"grad_accum={self.grad_accum}")
        require_float(self, "learning_rate", low=0.0, open_low=True)
        require_float(self, "grad_clip", low=0.0, open_low=True)
        require_float(self, "weight_decay", low=0.0)
        require_float(self, "final_lr_fraction", low=0.0, high=1.0)
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")

    @property
    def total_steps(self) -> int:
        """The number of steps over all stages.

        **Returns:** the sum of the stages' `steps`, an `int`.
        """
        return sum(s.steps for s in self.stages)


_NORMS = (RMSNorm, eqx.nn.RMSNorm, eqx.nn.LayerNorm, eqx.nn.GroupNorm)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optimiser of [`train`][models.train]: global-norm clipping, then AdamW whose rate warms up
    linearly and decays on a cosine.

    The rate rises from 0 to `learning_rate` over `warmup_steps`, then decays on a cosine to
    `final_lr_fraction · learning_rate` at `total_steps`. Weight decay applies to the arrays of 2
    or more dimensions (the matrices and embeddings) outside normalisation layers: the norm scales
    of a [`RingTransformer`][eqx_ring.RingTransformer]'s stacked blocks (a leading `num_layers`
    axis) have 2 dimensions too, and are not decayed. Initialise it on the model's arrays,
    `optimizer.init(eqx.filter(model, eqx.is_array))`.

    **Arguments:**

    - `config`: a [`TrainConfig`][models.TrainConfig]; its `learning_rate`, `warmup_steps`,
      `final_lr_fraction`, `weight_decay`, `grad_clip` and `total_steps` are used.

    **Returns:** an `optax.GradientTransformation`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import models

    config = models.TrainConfig(stages=(models.Stage(seq_len=64, steps=100),), warmup_steps=10)
    optimizer = models.make_optimizer(config)
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    grads = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    state = optimizer.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 step counts
        updates, state = optimizer.update(grads, state, params)
    assert (updates["w"] == 0).all()  # the warmup starts at a learning rate of 0
    ```
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )

    def decay_mask(params):
        def mask(x):
            if isinstance(x, _NORMS):
                return jax.tree.map(lambda _: False, x)
            return x.ndim >= 2

        return jax.tree.map(mask, params, is_leaf=lambda x: isinstance(x, _NORMS))

    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask),
    )


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, config: TrainConfig,
                    mesh: Mesh | None = None):
    """The jitted training step of [`train`][models.train]: `(model, opt_state, batch, key=None) -> (model,
    opt_state, metrics)`.

    With a mesh the batch is constrained to `P(("dp", "fsdp"), "sp")` and the parameters to their
    [`param_shardings`][eqx_ring.sharding.param_shardings]. With `grad_accum > 1` the batch is split
    into that many microbatches (strided, so each keeps its share of every data shard) whose
    losses, metrics and gradients are averaged. Each microbatch given to `loss_fn` also holds the
    whole batch under the key `"whole_batch"`, so that a loss can be normalised by whole-batch
    counts: a token mean divides the sum over the microbatch's tokens by the whole batch's token
    count times the microbatch's share of its rows (`1 / grad_accum`), and the average of the
    microbatches' losses and gradients is then exactly the whole batch's, however the tokens fall
    among them. [`RingLM.loss`][models.RingLM.loss] and [`VideoTextLM.loss`][models.VideoTextLM.loss]
    do this; a loss that ignores the key gets the average of microbatch means (exact when they
    weigh equally, as [`vq_loss`][models.vq_loss]'s equal-sized videos do).
    `compute_dtype="bfloat16"` runs the model in bfloat16 from float32 master weights. The step
    donates the buffers of `opt_state` and `batch`: do not use them after the call. Given a `key`
    (the model's randomness in training: attention dropout), the step calls
    `loss_fn(model, batch, key=key)`, each microbatch with its own key split from it; without one,
    `loss_fn(model, batch)`.

    **Arguments:**

    - `loss_fn`: `(model, batch) -> (loss, metrics)`: a scalar to minimise and a dict of named
      arrays to report (see above for the microbatches it sees); with a `key` given to the step,
      it takes `key=` as well.
    - `optimizer`: e.g. [`make_optimizer(config)`][models.make_optimizer].
    - `config`: the [`TrainConfig`][models.TrainConfig]; its `grad_accum` and `compute_dtype` are used.
    - `mesh`: the mesh the model and batches live on, or `None` (the default) for one device.

    **Returns:** the step function. Its `batch` is a dict of `[batch, seq]` (or any `[batch, ...]`)
    arrays of one leading size, divisible by `grad_accum` and each microbatch by the mesh's data
    axes `dp · fsdp`; its `metrics` holds `"loss"`, the loss function's metrics and `"grad_norm"`
    (the global norm of the gradients before clipping).

    **Raises:** (from the step, when it is traced) `ValueError` naming the sizes for a batch whose
    arrays differ in leading size or whose leading size does not split so.
    """
    accum = config.grad_accum
    compute = jnp.dtype(config.compute_dtype)

    def cast(model):
        return jax.tree.map(lambda x: x.astype(compute) if eqx.is_inexact_array(x) else x, model)

    def value_and_grad(model, batch, key):
        def loss(m):
            return loss_fn(cast(m), batch) if key is None else loss_fn(cast(m), batch, key=key)

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    # The model and the key are the one argument not donated: the caller keeps both.
    @eqx.filter_jit(donate="all-except-first")
    def jitted(model_and_key, opt_state, batch):
        model, key = model_and_key
        _check_batch_rows(batch, config, mesh)
        if mesh is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))
        if accum == 1:
            (loss, metrics), grads = value_and_grad(model, batch, key)
        else:
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)
            keys = None if key is None else jax.random.split(key, accum)

            def body(total, inputs):
                mb, k = inputs
                return jax.tree.map(jnp.add, total, value_and_grad(model, {**mb, WHOLE_BATCH: batch}, k)), None

            first = {**jax.tree.map(lambda x: x[0], micro), WHOLE_BATCH: batch}
            zeros = jax.tree.map(jnp.zeros_like, eqx.filter_eval_shape(value_and_grad, model, first, key))
            total, _ = jax.lax.scan(body, zeros, (micro, keys))
            (loss, metrics), grads = jax.tree.map(lambda x: x / accum, total)
        params = eqx.filter(model, eqx.is_array)
        # optax mixes Python floats with int32 step counts, which strict promotion (ours in tests) refuses.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        if mesh is not None:
            model = shard_params(model, mesh)
        return model, opt_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    def step(model, opt_state, batch, key=None):
        return jitted((model, key), opt_state, batch)

    return step


def _check_batch_rows(batch: Mapping[str, Any], config: TrainConfig, mesh: Mesh | None,
                     expected: int | None = None) -> None:
    """Refuse a batch whose rows do not split into `grad_accum` microbatches over the mesh's data axes (or are
    not `expected` rows), naming the sizes, before JAX fails on a reshape or a sharding."""
    rows = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    sizes = set(rows.values())
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every array of a batch must have the same leading (row) size, got {rows}")
    (size,) = sizes
    if expected is not None and size != expected:
        raise ValueError(f"the batch has {size} rows, but TrainConfig.batch_size={expected}")
    if size % config.grad_accum:
        raise ValueError(f"the batch has {size} rows, which grad_accum={config.grad_accum} does not divide")
    data = 1 if mesh is None else mesh.shape["dp"] * mesh.shape["fsdp"]
    if (size // config.grad_accum) % data:
        raise ValueError(f"the batch has {size} rows: each of its grad_accum={config.grad_accum} microbatches "
                         f"({size // config.grad_accum} rows) must split over the mesh's data axes dp * fsdp = "
                         f"{data}; use a batch_size divisible by {config.grad_accum * data}")


@dataclass
class TrainResult:
    """What [`train`][models.train] returns: the trained model, its optimizer state and the logged records.

    **Arguments:**

    - `model`: the trained model.
    - `opt_state`: the optimiser state after the last step.
    - `records`: one dict per step: `"step"`, `"stage"` (index), the step's metrics (`"loss"`, the
      loss function's metrics, `"grad_norm"`), `"tokens"`, `"tokens_per_s"`, `"seconds"` and
      `"batch_digest"` (a hash of the host batch); the lines of `metrics.jsonl`. A loss-function
      metric that is NaN in a step (e.g. [`VideoTextLM.loss`][models.VideoTextLM.loss]'s
      `"vision_loss"` of a batch without vision targets) is left out of that step's record.
    """

    model: eqx.Module
    opt_state: Any
    records: list[dict[str, Any]]


def train(
    model: eqx.Module,
    loss_fn: LossFn,
    batches: Callable[[int, Stage], Iterable[Mapping[str, np.ndarray]]],
    config: TrainConfig,
    *,
    workdir: str | os.PathLike,
    mesh: Mesh | None = None,
    tokens_per_batch: Callable[[dict[str, jax.Array]], int] | None = None,
    after_step: Callable[[eqx.Module, dict[str, jax.Array], dict[str, Any], int], eqx.Module] | None = None,
    progress: bool = True,
    log_every: int = 50,
    description: str = "train",
    key: PRNGKeyArray | None = None,
) -> TrainResult:
    """Train `model` through `config.stages`, checkpointing to `workdir` and resuming from it.

    **Arguments:**

    - `model`: the model (on `mesh`, when given); a stage with `rope_theta` rebuilds it with
      [`respec`][models.respec].
    - `loss_fn`: `(model, batch) -> (loss, metrics)`, traced inside the jitted step: a scalar loss
      and a dict of scalars (each is logged with `float`), e.g.
      `lambda m, b: m.loss(b, spmd_axis_name=BATCH_AXES)` for a
      [`VideoTextLM`][models.VideoTextLM].
    - `batches`: `(stage_index, stage) -> ` a grain `IterDataset` (or any iterable whose iterator
      has `get_state` / `set_state`) of numpy batches for that stage (dicts of `[batch, ...]`
      arrays, e.g. from [`packed_batches`][data_pipelines.packed_batches]).
    - `config`: a [`TrainConfig`][models.TrainConfig].
    - `workdir`: checkpoints go to `workdir/checkpoints` (orbax: model, optimizer state, data
      iterator state and position saved together, each step's directory finalised atomically), one
      JSON line of metrics per step to `workdir/metrics.jsonl`. If checkpoints exist, training
      resumes from the latest: same model, optimizer and data position, so the remaining steps
      are those of an uninterrupted run. Arrays are saved and restored by their tree paths
      (`transformer.blocks.attention.query_proj.weight`), never by their order among the leaves,
      and a checkpoint of other paths or shapes than the model's is refused. With several
      processes (`jax.distributed`) `workdir` must be one shared directory; every process's data
      state is saved, and a run resumes on another process count when the states merge (as those of
      [`global_packed_batches`][data_pipelines.global_packed_batches] do). Metrics are written
      by process 0.
    - `mesh`: required when several processes take part. Batches become global arrays sharded
      `P(("dp", "fsdp"), "sp")`: each process's batches hold the rows
      [`process_rows(mesh, config.batch_size)`][data_pipelines.process_rows] of the global batch
      (see [`global_batch`][data_pipelines.global_batch]).
    - `tokens_per_batch`: counts the global batch's tokens for the tokens/s figure (default: size of `"tokens"`).
    - `after_step`: `(model, batch, metrics, step) -> model`, run outside `jit` after each step;
      `batch` is the step's global batch (on `mesh` when given), so every process sees the same.
    - `progress`: show a tqdm progress bar (on process 0) with the loss and tokens/s when stderr
      is a terminal (or in a notebook); elsewhere (output redirected to a file or a pipe) write a
      line instead, `"{description} step {step}/{total} loss {loss}, {n} tokens/s"`, to the logger
      `models._train` at level INFO, or to stderr when that level is not enabled. `False`: no bar;
      the same lines go to the logger only.
    - `log_every`: without a bar, write a line after the first step of this run, every this many
      steps, and after the last.
    - `description`: the progress bar's label and the lines' prefix.
    - `key`: a `jax.random` key for the model's randomness in training (the spec's attention
      dropout): step `s` (counted from 0 over all stages) calls `loss_fn(model, batch, key=k)`
      with `k = jax.random.fold_in(key, s)`, so a resumed run draws what an uninterrupted one
      would. Default `None`: `loss_fn(model, batch)`.

    **Returns:** a [`TrainResult`][models.TrainResult] with every step's record since the start of training
    (on processes other than 0: since this run's first step).

    **Raises:** `ValueError` if several processes run without a `mesh`, if `config.batch_size` is
    not divisible by `grad_accum` times the mesh's data axes `dp · fsdp`, if a batch's arrays (on
    one device: not `config.batch_size` rows; with a mesh: not this process's
    [`process_rows`][data_pipelines.process_rows]) do not have the rows the step needs (checked at
    every batch, before it reaches JAX), if the checkpoint resumed from holds other array paths or
    shapes than `model` and its optimizer state (naming them), or if its data states were saved by
    another number of processes and cannot be merged; `FloatingPointError` if a step's loss is not finite
    (token or target ids outside the vocabulary give NaN inside the jitted step, as does divergence).
    """
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"train runs in {jax.process_count()} processes but was given no mesh: pass one (e.g. "
                         "eqx_ring.sharding.make_mesh(dp=-1)) so that the model and batches are global arrays")
    if mesh is not None:
        data = mesh.shape["dp"] * mesh.shape["fsdp"]
        if config.batch_size % (config.grad_accum * data):
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be divisible by grad_accum="
                             f"{config.grad_accum} times the mesh's data axes dp * fsdp = {data}, so that each "
                             "microbatch splits over them")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(config)
    step_fn = make_train_step(loss_fn, optimizer, config, mesh)
    count_tokens = tokens_per_batch or (lambda b: int(b["tokens"].size))
    metrics_path = workdir / "metrics.jsonl"
    with open_checkpoints(workdir / "checkpoints", max_to_keep=config.max_checkpoints) as manager:
        done = 0 if manager.latest_step() is None else manager.latest_step()
        stage_index, stage_step = _position(config.stages, done)
        model = _stage_model(model, config.stages, stage_index)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        if mesh is not None:
            # On the mesh like the parameters (moments) or replicated (the step count), so that a
            # restore, which places arrays as their targets are placed, lands there too.
            opt_state = shard_params(opt_state, mesh)
        iterator = iter(batches(stage_index, config.stages[stage_index]))
        if done:
            logger.info("resuming %s from step %d of %d", description, done, config.total_steps)
            model, opt_state, data_state = restore_checkpoint(manager, done, model, opt_state)
            iterator.set_state(data_state)
        primary = jax.process_index() == 0
        records = _read_records(metrics_path, upto=done) if primary else []
        if primary:
            _write_records(metrics_path, records)
        bar = _progress_bar(progress, config.total_steps, done, description)
        say = _line_writer(progress) if bar is None and primary else None
        with open(metrics_path if primary else os.devnull, "a", encoding="utf-8") as log:
            step = done
            while step < config.total_steps:
                if stage_step == config.stages[stage_index].steps:
                    stage_index, stage_step = stage_index + 1, 0
                    model = _stage_model(model, config.stages, stage_index)
                    # The optimizer state mirrors the model's tree, static config included.
                    like = eqx.filter_eval_shape(optimizer.init, eqx.filter(model, eqx.is_array))
                    opt_state = _with_leaves(like, jax.tree.leaves(opt_state))
                    iterator = iter(batches(stage_index, config.stages[stage_index]))
                host_batch = next(iterator)
                if mesh is None:  # with a mesh, `global_batch` checks this process's rows
                    _check_batch_rows(host_batch, config, None, expected=config.batch_size)
                start = time.perf_counter()
                batch = _device_batch(host_batch, mesh, config.batch_size)
                step_key = None if key is None else jax.random.fold_in(key, step)
                model, opt_state, metrics = step_fn(model, opt_state, batch, step_key)
                # A metric the loss function reports as NaN (a modality absent from the batch) is left out,
                # so that logs and plots skip it; the loss and the gradient norm are always kept.
                metrics = {k: float(v) for k, v in metrics.items()}
                metrics = {k: v for k, v in metrics.items() if k in ("loss", "grad_norm") or not math.isnan(v)}
                if not math.isfinite(metrics["loss"]):
                    # Inside the jitted step bad ids cannot raise (see eqx_ring.RingTransformer): they give NaN.
                    raise FloatingPointError(
                        f"the loss of step {step + 1} is {metrics['loss']}: a token or target id outside the model's "
                        f"vocabulary gives NaN (data_pipelines' vocab_size= checks ids where they enter), and so "
                        f"does a diverged run; the step's update was not saved")
                seconds = time.perf_counter() - start
                step, stage_step = step + 1, stage_step + 1
                tokens = count_tokens(batch)
                record = {"step": step, "stage": stage_index, **metrics, "tokens": tokens,
                          "tokens_per_s": tokens / seconds, "seconds": seconds, "batch_digest": _digest(host_batch)}
                if after_step is not None:
                    # The step donated `batch`; where XLA reused a buffer for an output, place that batch again.
                    if any(x.is_deleted() for x in jax.tree.leaves(batch)):
                        batch = _device_batch(host_batch, mesh, config.batch_size)
                    model = after_step(model, batch, metrics, step)
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    save_checkpoint(manager, step, model, opt_state, iterator.get_state())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                elif say is not None and (step == done + 1 or step % log_every == 0 or step == config.total_steps):
                    say(f"{description} step {step}/{config.total_steps} loss {metrics['loss']:.4f}, "
                        f"{record['tokens_per_s']:,.0f} tokens/s")
        if bar is not None:
            bar.close()
    return TrainResult(model, opt_state, records)


def _position(stages, done: int) -> tuple[int, int]:
    """(stage index, steps done within it) after `done` steps; a finished stage stays current until the next step."""
    for index, stage in enumerate(stages):
        if done <= stage.steps:
            return index, done
        done -= stage.steps
    return len(stages) - 1, stages[-1].steps


def _stage_model(model, stages, index: int):
    """`model` with the RoPE settings of stage `index`: each the last one a stage up to it gave."""
    changes = {}
    for name in ("rope_theta", "rope_scale"):
        value = next((getattr(s, name) for s in reversed(stages[: index + 1]) if getattr(s, name) is not None), None)
        if value is not None:
            changes[name] = value
    if not changes:
        return model
    if not isinstance(model, RingModel):
        name, value = next(iter(changes.items()))
        raise TypeError(f"a stage's {name}={value} respecifies the model, which must be a models.RingModel; got "
                        f"{type(model).__name__}")
    if "rope_scale" in changes:
        changes["rope_scaling"] = RopeScaling("linear", changes.pop("rope_scale"))
    if all(getattr(model.spec, name) == value for name, value in changes.items()):
        return model
    return model.respec(**changes)


def _with_leaves(tree, leaves):
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _device_batch(batch: Mapping[str, np.ndarray], mesh: Mesh | None, batch_size: int) -> dict[str, jax.Array]:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    from data_pipelines import global_batch

    return global_batch(batch, mesh, batch_size=batch_size)


def _digest(batch: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for k in sorted(batch):
        digest.update(np.ascontiguousarray(batch[k]).tobytes())
    return digest.hexdigest()[:16]


def _read_records(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["step"] <= upto]


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    # Steps logged after the checkpoint we resume from are run again, so their old lines go.
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _interactive() -> bool:
    """Whether a progress bar can redraw in place: stderr is a terminal, or a notebook shows it as a widget."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _line_writer(progress: bool) -> Callable[[str], None]:
    """Where the progress lines go when no bar is shown: the logger, or stderr when a bar was asked for but the
    logger would drop them (redirected output stays informative without any logging set up)."""
    if progress and not logger.isEnabledFor(logging.INFO):
        return lambda line: print(line, file=sys.stderr, flush=True)
    return logger.info


def _progress_bar(enabled: bool, total: int, initial: int, description: str):
    if not enabled or jax.process_index() != 0 or not _interactive():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True)


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike, *, keys: tuple[str, ...] = ("loss",),
                 title: str = "training loss") -> None:
    """Write a PNG of `keys` against the step from [`train`][models.train]'s records (matplotlib, no display
    needed).

    The y axis is logarithmic and labelled "loss"; records without a key (or with NaN for it, e.g. a
    modality absent from that step's batch) are skipped, the line joining the steps that have it.

    **Arguments:**

    - `records`: [`TrainResult.records`][models.TrainResult], or the lines of `metrics.jsonl`.
    - `path`: the PNG file to write.
    - `keys`: which metrics to plot, one line each; default `("loss",)`.
    - `title`: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and not math.isnan(r[key])]
        ax.plot([step for step, _ in points], [value for _, value in points], label=key, linewidth=1.2)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
