"""The model zoo's bad inputs and silent errors (issue 17): configs, zoo files, training and the video-text LM."""

import dataclasses
import json
import logging
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err

import models
from data_pipelines import ByteTokenizer, MovingShapes, PatchQuantizer, packed_batches, video_text_examples
from eqx_ring import AttentionSpec, KernelTuning
from eqx_ring.sharding import make_mesh
from models._demo import DemoConfig

TOK = ByteTokenizer()
LM = models.LMConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2, hidden_size=32, remat_policy=None,
                     attention=AttentionSpec(tuning=KernelTuning(query_chunk_size=8, key_chunk_size=8,
                                                                 ffn_chunk_size=16)))
VIDEO = models.VideoTextConfig(codebook_size=64, num_frames=2, codes_per_frame=4, d_model=32, num_layers=1,
                               num_heads=4, num_kv_heads=2, hidden_size=64, remat_policy=None, text_loss_weight=0.3,
                               attention=AttentionSpec(tuning=KernelTuning(query_chunk_size=16, key_chunk_size=16,
                                                                           ffn_chunk_size=32)))


def video_batch(batch_size=4, seq_len=128, tasks=None, seed=0):
    examples = video_text_examples(MovingShapes(32, num_frames=2, size=16, seed=seed),
                                   video_tokenizer=PatchQuantizer(),
                                   tasks=tasks or {"video_to_text": 1.0, "text_to_video": 1.0},
                                   process_index=0, process_count=1)
    dataset = packed_batches(examples, seq_len=seq_len, batch_size=batch_size, pad_id=TOK.pad_id)
    return {k: jnp.asarray(v) for k, v in next(iter(dataset)).items()}


def capture_gradients():
    """An optax 'optimizer' that leaves the model alone and keeps the step's gradients as its state."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def step_with(model, loss_fn, batch, grad_accum):
    config = models.TrainConfig(stages=(models.Stage(8, 1),), batch_size=batch["tokens"].shape[0],
                                grad_accum=grad_accum)
    optimizer = capture_gradients()
    step = models.make_train_step(loss_fn, optimizer, config)
    _, grads, metrics = step(model, optimizer.init(eqx.filter(model, eqx.is_array)), jax.tree.map(jnp.copy, batch))
    return metrics, grads


def assert_same_step(one, many):
    (metrics_1, grads_1), (metrics_k, grads_k) = one, many
    for key in metrics_1:
        assert rel_err(metrics_k[key], metrics_1[key]) <= 1e-5, key
    for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_1), strict=True):
        assert rel_err(a, b) <= 1e-5


# 1. Gradient accumulation over microbatches with unequal numbers of target tokens.


def lm_batch():
    """4 rows; the strided split into 2 microbatches gives rows (0, 2) all 15 targets each and rows (1, 3) one."""
    keys = jax.random.split(jax.random.key(3), 2)
    tokens = jax.random.randint(keys[0], (4, 16), 0, LM.vocab_size)
    targets = jax.random.randint(keys[1], (4, 16), 0, LM.vocab_size)
    mask = np.zeros((4, 16), bool)
    mask[[0, 2], :15] = True
    mask[[1, 3], 4] = True
    return {"tokens": tokens, "positions": jnp.tile(jnp.arange(16), (4, 1)),
            "segment_ids": jnp.ones((4, 16), jnp.int32), "targets": targets, "target_mask": jnp.asarray(mask)}


def test_accumulated_ring_lm_step_equals_one_big_batch():
    model = models.RingLM(LM, key=jax.random.key(0))
    batch = lm_batch()

    def loss_fn(m, b):
        return m.loss(b), {}

    one = step_with(model, loss_fn, batch, 1)
    # The whole batch's token mean, not the mean of the microbatches' means.
    direct = eqx.filter_jit(lambda m, b: m.loss(b))(model, batch)
    assert rel_err(one[0]["loss"], direct) <= 1e-6
    for accum in (2, 4):
        assert_same_step(one, step_with(model, loss_fn, batch, accum))


def test_accumulated_video_text_step_equals_one_big_batch():
    model = models.VideoTextLM(VIDEO, key=jax.random.key(1))
    # Rows 0 and 1 hold text and vision targets, rows 2 and 3 text only.
    batch = {k: v[jnp.array([1, 2, 0, 3])] for k, v in video_batch(seed=1).items()}
    mask, vision = np.array(batch["target_mask"]), np.asarray(batch["target_vision_mask"])
    # Microbatch (rows 1, 3) keeps 2 text targets each and 1 vision target; (rows 0, 2) keeps all of theirs.
    vision_at = np.flatnonzero(mask[1] & vision[1])
    for row in (1, 3):
        text_at = np.flatnonzero(mask[row] & ~vision[row])
        mask[row] = False
        mask[row, text_at[:2]] = True
    mask[1, vision_at[:1]] = True
    batch["target_mask"] = jnp.asarray(mask)
    counts = [(int((mask[r] & ~vision[r]).sum()), int((mask[r] & vision[r]).sum())) for r in range(4)]
    assert counts[0][0] + counts[2][0] > 10 * (counts[1][0] + counts[3][0]) and counts[1][1] + counts[3][1] == 1

    def loss_fn(m, b):
        return m.loss(b)

    one = step_with(model, loss_fn, batch, 1)
    loss, metrics = eqx.filter_jit(loss_fn)(model, batch)
    assert rel_err(one[0]["loss"], loss) <= 1e-6 and rel_err(one[0]["vision_loss"], metrics["vision_loss"]) <= 1e-6
    assert_same_step(one, step_with(model, loss_fn, batch, 2))
    # One microbatch without any vision target: the whole batch still has some, so the weights stay 0.3 / 0.7.
    mask[1] = mask[1] & ~vision[1]
    batch["target_mask"] = jnp.asarray(mask)
    assert_same_step(step_with(model, loss_fn, batch, 1), step_with(model, loss_fn, batch, 2))


# 2. The video-text loss weighs the modalities present; absent ones are NaN in metrics, left out of records/plots.


@pytest.mark.parametrize("tasks", ["video_to_text", "text_to_video", "both"])
def test_video_text_loss_weighs_the_modalities_present(tasks):
    model = models.VideoTextLM(VIDEO, key=jax.random.key(2))
    batch = video_batch(batch_size=2)
    mask, vision = batch["target_mask"], batch["target_vision_mask"]
    if tasks == "video_to_text":  # text targets only
        batch["target_mask"] = mask & ~vision
    elif tasks == "text_to_video":  # vision targets only
        batch["target_mask"] = mask & vision
    loss, metrics = eqx.filter_jit(lambda m, b: m.loss(b))(model, batch)
    text, vision_loss = float(metrics["text_loss"]), float(metrics["vision_loss"])
    if tasks == "video_to_text":
        assert math.isnan(vision_loss) and np.isfinite(text) and rel_err(loss, text) <= 1e-6
    elif tasks == "text_to_video":
        assert math.isnan(text) and np.isfinite(vision_loss) and rel_err(loss, vision_loss) <= 1e-6
    else:
        assert rel_err(loss, 0.3 * text + 0.7 * vision_loss) <= 1e-6
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: m.loss(batch)[0]))(model)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_video_text_loss_without_targets_is_zero():
    model = models.VideoTextLM(VIDEO, key=jax.random.key(2))
    batch = video_batch(batch_size=2)
    batch["target_mask"] = jnp.zeros_like(batch["target_mask"])
    loss, metrics = eqx.filter_jit(lambda m, b: m.loss(b))(model, batch)
    assert float(loss) == 0.0 and math.isnan(metrics["text_loss"]) and math.isnan(metrics["vision_loss"])


def test_records_and_plots_skip_an_absent_modality(tmp_path, monkeypatch):
    model = models.VideoTextLM(VIDEO, key=jax.random.key(4))
    with_vision, text_only = video_batch(batch_size=2), video_batch(batch_size=2)
    text_only["target_mask"] = text_only["target_mask"] & ~text_only["target_vision_mask"]
    host = [{k: np.asarray(v) for k, v in b.items()} for b in (with_vision, text_only, with_vision, text_only)]

    class Batches:
        def __init__(self):
            self.index = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.index += 1
            return host[self.index - 1]

        def get_state(self):
            return {"index": self.index}

        def set_state(self, state):
            self.index = state["index"]

    config = models.TrainConfig(stages=(models.Stage(128, 4),), batch_size=2, warmup_steps=1, checkpoint_every=10)
    result = models.train(model, lambda m, b: m.loss(b), lambda i, s: Batches(), config, workdir=tmp_path,
                          progress=False)
    assert ["vision_loss" in r for r in result.records] == [True, False, True, False]
    assert all("text_loss" in r and np.isfinite(r["loss"]) for r in result.records)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.records  # strict JSON: no NaN written

    import matplotlib.axes

    plotted = {}
    original = matplotlib.axes.Axes.plot

    def spy(self, x, y, *args, label=None, **kwargs):
        plotted[label] = (list(x), list(y))
        return original(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    records = [*result.records, {"step": 5, "loss": 1.0, "vision_loss": math.nan}]
    models.plot_metrics(records, tmp_path / "loss.png", keys=("loss", "vision_loss"))
    assert plotted["vision_loss"][0] == [1, 3] and plotted["loss"][0] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(plotted["vision_loss"][1]))
    assert (tmp_path / "loss.png").stat().st_size > 0


# 3. Block-causal attention and KV-cached generation.


def test_video_text_docstring_does_not_suggest_an_undecodable_block_size():
    assert "codes_per_frame + 1" not in models.VideoTextLM.__doc__
    model = models.VideoTextLM(dataclasses.replace(VIDEO, attention=VIDEO.attention.replace(
        causal_block_size=VIDEO.codes_per_frame + 1)),
                               key=jax.random.key(0))
    with pytest.raises(ValueError, match="causal_block_size=1"):
        model.caption(np.zeros((1, 2, 4), np.int32), TOK, max_length=2)
    with pytest.raises(ValueError, match="causal_block_size=1"):
        model.generate_video([TOK.encode("a red circle")], TOK)


# 4. Zoo files: the hash covers the config too.


def test_zoo_refuses_an_edited_config(tmp_path):
    model = models.RingLM(LM, key=jax.random.key(0))
    json_path, _ = models.save(tmp_path / "lm", model)
    assert models.load(json_path).config == LM
    meta = json.loads(open(json_path).read())
    meta["config"]["attention"]["rope_theta"] = 500_000.0
    with open(json_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(models.ZooIntegrityError, match=f"{tmp_path / 'lm'}.json: its fields .* edited"):
        models.load(json_path)
    meta["config"]["attention"]["rope_theta"] = LM.attention.rope_theta
    meta["class"] = "VideoVQ"
    with open(json_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(models.ZooIntegrityError, match="lm.json"):
        models.load(json_path)


def test_zoo_loads_first_format_files_with_a_warning(tmp_path):
    model = models.RingLM(LM, key=jax.random.key(0))
    json_path, _ = models.save(tmp_path / "lm", model)
    meta = json.loads(open(json_path).read())
    del meta["json_sha256"]
    meta["format"] = "eqx-ring-zoo/1"
    # Formats 1 and 2 kept the attention settings as flat config fields.
    attention = meta["config"].pop("attention")
    meta["config"] |= {k: attention[k] for k in ("rope_theta", "causal_block_size", "layout")} | attention["tuning"]
    for newer in ("implementation", "kv_pieces"):  # tuning fields added after format 2
        del meta["config"][newer]
    with open(json_path, "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match="covers the weights but not the config"):
        loaded = models.load(json_path)
    assert loaded.config == LM
    meta["format"] = "eqx-ring-zoo/9"
    with open(json_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="is not an eqx-ring-zoo/3 file"):
        models.load(json_path)


# 5. Every config field a user can get wrong, at construction.

BAD_FIELDS = [
    (models.Stage, dict(seq_len=0, steps=1), "Stage.seq_len must be a positive int, got 0"),
    (models.Stage, dict(seq_len=8, steps=-3), "Stage.steps must be a positive int, got -3"),
    (models.Stage, dict(seq_len=8, steps=1, rope_theta=-1.0), r"Stage.rope_theta must be a finite float > 0"),
    (models.Stage, dict(seq_len=8, steps=1, rope_scale=0.0), r"Stage.rope_scale must be a finite float > 0"),
    (models.LMConfig, dict(head_dim=0), r"LMConfig.head_dim must be a positive int or None, got 0"),
    (models.LMConfig, dict(norm_eps=-1e-6), r"LMConfig.norm_eps must be a finite float >= 0, got -1e-06"),
    (models.LMConfig, dict(d_model=30, num_heads=4, head_dim=7, attention=AttentionSpec()),
     r"LMConfig.attention.rope_theta=10000.0 needs an even head size, got head_dim = 7"),
    (models.TrainConfig, dict(learning_rate=-1.0), r"TrainConfig.learning_rate must be a finite float > 0, got -1.0"),
    (models.TrainConfig, dict(learning_rate=0.0), r"TrainConfig.learning_rate must be a finite float > 0, got 0.0"),
    (models.TrainConfig, dict(learning_rate=math.nan), r"TrainConfig.learning_rate must be .* got nan"),
    (models.TrainConfig, dict(warmup_steps=-1), "TrainConfig.warmup_steps must be an int >= 0, got -1"),
    (models.TrainConfig, dict(grad_accum=0), "TrainConfig.grad_accum must be a positive int, got 0"),
    (models.TrainConfig, dict(batch_size=0), "TrainConfig.batch_size must be a positive int, got 0"),
    (models.TrainConfig, dict(batch_size=6, grad_accum=4), "batch_size=6 must be divisible by grad_accum=4"),
    (models.TrainConfig, dict(checkpoint_every=0), "TrainConfig.checkpoint_every must be a positive int, got 0"),
    (models.TrainConfig, dict(max_checkpoints=0), "TrainConfig.max_checkpoints must be a positive int, got 0"),
    (models.TrainConfig, dict(grad_clip=0.0), r"TrainConfig.grad_clip must be a finite float > 0, got 0.0"),
    (models.TrainConfig, dict(weight_decay=-0.1), r"TrainConfig.weight_decay must be a finite float >= 0, got -0.1"),
    (models.TrainConfig, dict(final_lr_fraction=2.0), r"TrainConfig.final_lr_fraction must be a float in \[0, 1\]"),
    (models.TrainConfig, dict(stages=()), r"TrainConfig.stages must be a non-empty tuple of Stage, got \(\)"),
    (models.TrainConfig, dict(compute_dtype="float16"), "TrainConfig.compute_dtype must be 'float32' or 'bfloat16'"),
    (models.LMConfig, dict(vocab_size=0), "LMConfig.vocab_size must be a positive int, got 0"),
    (models.LMConfig, dict(d_model=-8), "LMConfig.d_model must be a positive int, got -8"),
    (models.LMConfig, dict(num_layers=0), "LMConfig.num_layers must be a positive int, got 0"),
    (models.LMConfig, dict(num_heads=0), "LMConfig.num_heads must be a positive int, got 0"),
    (models.LMConfig, dict(num_heads=3), "LMConfig.num_heads must divide d_model=128, got 3"),
    (models.LMConfig, dict(num_kv_heads=3), "LMConfig.num_kv_heads must divide num_heads=4, got 3"),
    (models.LMConfig, dict(hidden_size=0), "LMConfig.hidden_size must be a positive int or None, got 0"),
    (models.LMConfig, dict(attention=AttentionSpec(mesh=make_mesh(sp=2, devices=jax.devices()[:2]))),
     "LMConfig.attention must not hold a placement"),
    (models.LMConfig, dict(attention=AttentionSpec(rope_theta=10.0), d_model=12, num_heads=4),
     r"LMConfig.attention.rope_theta=10.0 needs an even head size, got d_model // num_heads = 3"),
    (models.LMConfig, dict(remat_policy="everything"), "LMConfig.remat_policy must be None or a name in"),
    (models.VideoTextConfig, dict(codebook_size=0), "VideoTextConfig.codebook_size must be a positive int, got 0"),
    (models.VideoTextConfig, dict(text_vocab_size=-1), "VideoTextConfig.text_vocab_size must be a positive int"),
    (models.VideoTextConfig, dict(num_frames=0), "VideoTextConfig.num_frames must be a positive int, got 0"),
    (models.VideoTextConfig, dict(codes_per_frame=0), "VideoTextConfig.codes_per_frame must be a positive int"),
    (models.VideoTextConfig, dict(num_heads=0), "VideoTextConfig.num_heads must be a positive int, got 0"),
    (models.VideoTextConfig, dict(text_loss_weight=1.5), r"VideoTextConfig.text_loss_weight must be a float in \[0, 1"),
    (models.VQConfig, dict(frame_size=0), "VQConfig.frame_size must be a positive int, got 0"),
    (models.VQConfig, dict(patch=0), "VQConfig.patch must be a positive int, got 0"),
    (models.VQConfig, dict(frame_size=18), "VQConfig.frame_size=18 must be divisible by patch=4"),
    (models.VQConfig, dict(hidden=-4), "VQConfig.hidden must be a positive int, got -4"),
    (models.VQConfig, dict(codebook_size=0), "VQConfig.codebook_size must be a positive int, got 0"),
    (models.VQConfig, dict(code_dim=0), "VQConfig.code_dim must be a positive int, got 0"),
    (models.VQConfig, dict(commitment=-0.5), r"VQConfig.commitment must be a finite float >= 0, got -0.5"),
]


@pytest.mark.parametrize(("cls", "fields", "message"), BAD_FIELDS,
                         ids=[f"{c.__name__}-{next(iter(f))}-{i}" for i, (c, f, _) in enumerate(BAD_FIELDS)])
def test_configs_refuse_bad_fields(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)


# The attention settings are the spec's, checked by it; JSON gives them back as a mapping, converted where a config
# is read (DemoConfig.from_dict, models.load), with the error naming the config.
BAD_ATTENTION = [
    ({"rope_theta": 0.0}, "rope_theta must be a positive finite number or None, got 0.0"),
    ({"rope_theta": math.inf}, "rope_theta must be a positive finite number or None, got inf"),
    ({"causal_block_size": 0}, "causal_block_size must be a positive int, got 0"),
    ({"layout": "ring"}, "layout must be one of .*, got 'ring'"),
    ({"tuning": {"query_chunk_size": 0}}, "query_chunk_size must be a positive int, got 0"),
    ({"tuning": {"key_chunk_size": True}}, "key_chunk_size must be a positive int, got True"),
    ({"tuning": {"ffn_chunk_size": 0}}, "ffn_chunk_size must be a positive int, got 0"),
    ({"mesh": None, "sliding_window": 0}, "sliding_window must be a positive int or None, got 0"),
    ({"window": 4}, r"fields \['window'\] are not AttentionSpec fields"),
    ({"mesh": "sp"}, r"fields \['mesh'\] are a placement"),
]


@pytest.mark.parametrize(("attention", "message"), BAD_ATTENTION, ids=[str(a) for a, _ in BAD_ATTENTION])
def test_a_read_config_names_its_bad_attention_field(attention, message):
    with pytest.raises(ValueError, match=f"DemoConfig.lm.attention: {message}"):
        DemoConfig.from_dict({"lm": {"attention": attention}})


def test_a_config_takes_only_a_spec_without_placement(no_hook):
    with pytest.raises(ValueError, match="LMConfig.attention must be an eqx_ring.AttentionSpec, got dict"):
        models.LMConfig(attention={"layout": "zigzag"})
    with pytest.raises(ValueError, match="VideoTextConfig.attention must be an eqx_ring.AttentionSpec, got str"):
        models.VideoTextConfig(attention="zigzag")


def test_configs_accept_the_defaults_and_presets():
    for cls in (models.TrainConfig, models.LMConfig, models.VideoTextConfig, models.VQConfig):
        cls()
    for name in models.PRESETS:
        models.LMConfig.preset(name)
    models.Stage(8, 2, rope_theta=10_000.0)
    models.TrainConfig(warmup_steps=0, weight_decay=0.0, final_lr_fraction=0.0)


def test_preset_refuses_an_unknown_name_and_bad_overrides():
    with pytest.raises(ValueError, match=r"unknown preset 'huge': name must be one of \['1b', '7b', 'small', 'tiny'\]"):
        models.LMConfig.preset("huge")
    with pytest.raises(ValueError, match="LMConfig.num_layers must be a positive int, got 0"):
        models.LMConfig.preset("tiny", num_layers=0)


# 6. Redirected output: a line every N steps when no progress bar is drawn.


def tiny_lm_run(tmp_path, **kwargs):
    model = models.RingLM(LM, key=jax.random.key(0))
    host = {k: np.asarray(v) for k, v in lm_batch().items()}

    class Batches:
        def __iter__(self):
            return self

        def __next__(self):
            return host

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    config = models.TrainConfig(stages=(models.Stage(16, 5),), batch_size=4, warmup_steps=1, checkpoint_every=10)
    return models.train(model, lambda m, b: (m.loss(b), {}), lambda i, s: Batches(), config, workdir=tmp_path,
                        description="tiny", **kwargs)


def test_progress_without_a_terminal_writes_lines_to_stderr(tmp_path, capsys):
    result = tiny_lm_run(tmp_path, progress=True, log_every=2)  # pytest's stderr is not a terminal
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tiny step")]
    assert [line.split()[2] for line in lines] == ["1/5", "2/5", "4/5", "5/5"]
    assert f"loss {result.records[-1]['loss']:.4f}, " in lines[-1] and lines[-1].endswith(" tokens/s")
    assert "it/s" not in err and "step/s" not in err  # no tqdm bar


def test_progress_off_logs_lines(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="models"):
        tiny_lm_run(tmp_path, progress=False, log_every=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tiny step")]
    assert [line.split()[2] for line in lines] == ["1/5", "3/5", "5/5"]
    assert all("tokens/s" in line and " loss " in line for line in lines)
    assert "tiny step" not in capsys.readouterr().err


def test_train_stops_on_a_nan_loss_from_ids_outside_the_vocabulary(tmp_path):
    # Inside the jitted step a bad id cannot raise: it gives NaN, and train stops there, saying why.
    model = models.RingLM(LM, key=jax.random.key(0))
    host = {k: np.array(v) for k, v in lm_batch().items()}
    host["tokens"][1, 3] = LM.vocab_size
    config = models.TrainConfig(stages=(models.Stage(16, 2),), batch_size=4)
    with pytest.raises(FloatingPointError, match=r"the loss of step 1 is nan: a token or target id outside the "
                                                 r"model's vocabulary gives NaN"):
        models.train(model, lambda m, b: (m.loss(b), {}), lambda i, s: iter([host] * 2), config,
                     workdir=tmp_path, progress=False)


# Batch sizes that the step cannot split: refused before JAX sees them, naming the sizes.


def test_train_refuses_batches_it_cannot_split(tmp_path):
    with pytest.raises(ValueError, match=r"the batch has 4 rows, but TrainConfig.batch_size=8"):
        model = models.RingLM(LM, key=jax.random.key(0))
        host = {k: np.asarray(v) for k, v in lm_batch().items()}
        config = models.TrainConfig(stages=(models.Stage(16, 1),), batch_size=8, grad_accum=2)
        models.train(model, lambda m, b: (m.loss(b), {}), lambda i, s: iter([host]), config, workdir=tmp_path,
                     progress=False)
    mesh = make_mesh(dp=4, fsdp=1, tp=1, sp=2)
    config = models.TrainConfig(stages=(models.Stage(16, 1),), batch_size=8, grad_accum=4)
    with pytest.raises(ValueError, match=r"batch_size=8 must be divisible by grad_accum=4 times the mesh's data axes "
                                         r"dp \* fsdp = 4"):
        models.train(model, lambda m, b: (m.loss(b), {}), lambda i, s: iter([host]), config,
                     workdir=tmp_path / "mesh", mesh=mesh)
    assert not (tmp_path / "mesh").exists()


def test_train_step_refuses_batches_it_cannot_split():
    model = models.RingLM(LM, key=jax.random.key(0))
    config = models.TrainConfig(stages=(models.Stage(16, 1),), batch_size=4, grad_accum=4)
    optimizer = models.make_optimizer(config)
    step = models.make_train_step(lambda m, b: (m.loss(b), {}), optimizer, config)
    batch = {k: v[:3] for k, v in lm_batch().items()}
    with pytest.raises(ValueError, match="the batch has 3 rows, which grad_accum=4 does not divide"):
        step(model, optimizer.init(eqx.filter(model, eqx.is_array)), batch)
    batch = {**lm_batch(), "targets": lm_batch()["targets"][:2]}
    with pytest.raises(ValueError, match="every array of a batch must have the same leading"):
        step(model, optimizer.init(eqx.filter(model, eqx.is_array)), batch)
    mesh = make_mesh(dp=4, fsdp=1, tp=1, sp=2)
    step = models.make_train_step(lambda m, b: (m.loss(b), {}), optimizer, config, mesh)
    with pytest.raises(ValueError, match=r"4 microbatches \(1 rows\) must split over the mesh's data axes"):
        step(model, optimizer.init(eqx.filter(model, eqx.is_array)), lm_batch())
