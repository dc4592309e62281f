"""VideoTextLM: LWM loss, mesh equality, decoding, zoo files; the trainer's accumulation, bf16 and stages."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err

import models
from data_pipelines import (
    ByteTokenizer,
    MovingShapes,
    PatchQuantizer,
    packed_batches,
    video_text_examples,
    vision_tokens,
)
from eqx_ring import AttentionSpec, KernelTuning, from_layout, to_layout
from eqx_ring.sharding import BATCH_AXES, make_mesh, shard_params

TOK = ByteTokenizer()
# PatchQuantizer(patch=8) on 16 x 16 frames: 4 codes per frame from 64; two frames per video.
SMALL = models.VideoTextConfig(codebook_size=64, num_frames=2, codes_per_frame=4, d_model=32, num_layers=2,
                               num_heads=4, num_kv_heads=2, hidden_size=64, attention=AttentionSpec(
                                   tuning=KernelTuning(query_chunk_size=16, key_chunk_size=16, ffn_chunk_size=32)))
ANY_LENGTH = KernelTuning(query_chunk_size=4096, key_chunk_size=4096, ffn_chunk_size=4096)  # chunks cut to the length


def batch_of(layout=None, ring_size=1, seq_len=128, batch_size=2, tasks=None):
    examples = video_text_examples(MovingShapes(32, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                   tasks=tasks or {"video_to_text": 1.0, "text_to_video": 1.0},
                                   process_index=0, process_count=1)
    dataset = packed_batches(examples, seq_len=seq_len, batch_size=batch_size, pad_id=TOK.pad_id, layout=layout,
                             ring_size=ring_size)
    return {k: jnp.asarray(v) for k, v in next(iter(dataset)).items()}


def test_loss_is_lwm_per_modality_cross_entropy():
    model = models.VideoTextLM(dataclasses.replace(SMALL, text_loss_weight=0.3), key=jax.random.key(0))
    batch = batch_of()
    loss, metrics = eqx.filter_jit(lambda m, b: m.loss(b))(model, batch)
    # Independent: full logits, shift by one in natural order, masks from the token ids themselves.
    hidden = jax.vmap(lambda t, p, s: model(t, positions=p, segment_ids=s))(
        batch["tokens"], batch["positions"], batch["segment_ids"])
    per_token = optax.softmax_cross_entropy_with_integer_labels(model.transformer.logits(hidden)[:, :-1],
                                                                batch["tokens"][:, 1:])
    seg, nxt = batch["segment_ids"], batch["tokens"][:, 1:]
    trained = batch["loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    is_vision = (nxt >= TOK.vocab_size) | jnp.isin(nxt, jnp.array([TOK.vision_start_id, TOK.vision_end_id,
                                                                    TOK.eof_id, TOK.eov_id]))
    text_mask, vision_mask = (trained & ~is_vision).astype(jnp.float32), (trained & is_vision).astype(jnp.float32)
    assert text_mask.sum() > 0 and vision_mask.sum() > 0
    text = (per_token * text_mask).sum() / text_mask.sum()
    vision = (per_token * vision_mask).sum() / vision_mask.sum()
    assert rel_err(metrics["text_loss"], text) <= 1e-6
    assert rel_err(metrics["vision_loss"], vision) <= 1e-6
    assert rel_err(loss, 0.3 * text + 0.7 * vision) <= 1e-6


@pytest.mark.parametrize("use_sinks", [False, True])
def test_loss_and_gradients_on_a_ring_mesh_equal_one_device(use_sinks):
    # One device, natural order, against (dp=2, sp=4) with the rows in the zigzag layout.
    single = models.VideoTextLM(dataclasses.replace(SMALL, use_sinks=use_sinks), key=jax.random.key(1))
    if use_sinks:  # nonzero, so that the sink changes the loss and has a gradient of its own
        assert single.transformer.blocks.attention.sinks.shape == (SMALL.num_layers, SMALL.num_heads)
        single = eqx.tree_at(lambda m: m.transformer.blocks.attention.sinks, single,
                             jnp.linspace(-1.0, 1.0, SMALL.num_layers * SMALL.num_heads).reshape(SMALL.num_layers, -1))
    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
    sharded = shard_params(models.respec(single, mesh=mesh, layout="zigzag"), mesh)

    def value_and_grad(model, batch, axes):
        return eqx.filter_jit(eqx.filter_value_and_grad(lambda m: m.loss(batch, spmd_axis_name=axes)[0]))(model)

    loss_1, grads_1 = value_and_grad(single, batch_of(batch_size=4), None)
    loss_n, grads_n = value_and_grad(sharded, batch_of(layout="zigzag", ring_size=4, batch_size=4), BATCH_AXES)
    assert rel_err(loss_n, loss_1) <= 1e-5
    for a, b in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_1), strict=True):
        assert rel_err(a, b) <= 1e-5


def naive_greedy(model, prompt, steps, allowed, forced):
    """Token by token with a fresh, unpadded forward pass each time: the reference for `decode`."""
    tokens = list(np.asarray(prompt))
    for i in range(steps):
        if forced[i] >= 0:
            tokens.append(int(forced[i]))
            continue
        hidden = model.transformer(jnp.asarray(tokens, jnp.int32), tuning=ANY_LENGTH)
        logits = np.asarray(model.transformer.logits(hidden[-1]))
        tokens.append(int(np.where(allowed[i], logits, -np.inf).argmax()))
    return np.array(tokens[len(prompt):])


def test_caption_equals_naive_greedy_decoding():
    tuning = dataclasses.replace(SMALL.attention.tuning, query_chunk_size=512, key_chunk_size=512)
    model = models.VideoTextLM(dataclasses.replace(SMALL, attention=SMALL.attention.replace(tuning=tuning)),
                               key=jax.random.key(2))
    codes = jax.random.randint(jax.random.key(3), (3, SMALL.num_frames, SMALL.codes_per_frame), 0, 64)
    captions = model.caption(codes, TOK, max_length=6)
    allowed = np.zeros(SMALL.vocab_size, bool)
    allowed[:256] = allowed[TOK.eos_id] = allowed[TOK.pad_id] = True
    for row, got in zip(np.asarray(codes), captions, strict=True):
        prompt = np.concatenate([[TOK.bos_id], vision_tokens(row, TOK)])
        expected = naive_greedy(model, prompt, 6, np.broadcast_to(allowed, (6, SMALL.vocab_size)), np.full(6, -1))
        end = np.flatnonzero(expected == TOK.eos_id)
        np.testing.assert_array_equal(got, expected[: end[0]] if end.size else expected)


def test_generate_video_pads_prompts_of_different_lengths_exactly():
    model = models.VideoTextLM(SMALL, key=jax.random.key(4))
    texts = ["a red circle moves up", "a blue square stays still"]
    together = np.asarray(model.generate_video([TOK.encode(t) for t in texts], TOK))
    assert together.shape == (2, SMALL.num_frames, SMALL.codes_per_frame)
    assert together.min() >= 0 and together.max() < SMALL.codebook_size
    steps = SMALL.num_frames * (SMALL.codes_per_frame + 1)
    forced = np.where(np.arange(steps) % (SMALL.codes_per_frame + 1) == SMALL.codes_per_frame, TOK.eof_id, -1)
    forced[-1] = TOK.eov_id
    allowed = np.zeros((steps, SMALL.vocab_size), bool)
    allowed[:, TOK.vocab_size:] = True
    for text, got in zip(texts, together, strict=True):
        prompt = np.concatenate([[TOK.bos_id], TOK.encode(text), [TOK.vision_start_id]])
        expected = naive_greedy(model, prompt, steps, allowed, forced)
        expected = expected.reshape(SMALL.num_frames, -1)[:, :-1] - TOK.vocab_size
        np.testing.assert_array_equal(got, expected)


def test_respec_moves_weights_and_refuses_new_shapes():
    model = models.VideoTextLM(SMALL, key=jax.random.key(5))
    tokens = jnp.arange(64) % 300
    moved = models.respec(model, mesh=make_mesh(dp=1, fsdp=1, tp=1, sp=4, devices=jax.devices()[:4]), layout="zigzag")
    assert moved.config.attention.layout == "zigzag" and moved.spec.layout == "zigzag"
    natural = eqx.filter_jit(lambda m, t: m(t))(model, tokens)
    zigzag = eqx.filter_jit(lambda m, t: m(t))(moved, to_layout(tokens, "zigzag", 4, axis=0))
    assert rel_err(from_layout(zigzag, "zigzag", 4, axis=0), natural) <= 1e-5
    with pytest.raises(ValueError, match="change the shapes of the weights"):
        models.respec(model, d_model=64)


def test_video_text_zoo_round_trip_and_tamper(tmp_path):
    model = models.VideoTextLM(SMALL, key=jax.random.key(6))
    json_path, weights = models.save(tmp_path / "vt", model)
    loaded = models.load(json_path)
    assert loaded.config == model.config
    tokens = jnp.arange(32) % 300
    np.testing.assert_array_equal(eqx.filter_jit(lambda m, t: m(t))(loaded, tokens),
                                  eqx.filter_jit(lambda m, t: m(t))(model, tokens))
    data = bytearray(open(weights, "rb").read())
    data[-5] ^= 0x40
    open(weights, "wb").write(bytes(data))
    with pytest.raises(models.ZooIntegrityError, match="vt.eqx has SHA-256 .* refusing to load it"):
        models.load(json_path)


def vq_setup(**config):
    vq = models.VideoVQ(models.VQConfig(frame_size=16, patch=4, hidden=16, codebook_size=16, code_dim=8),
                        key=jax.random.key(7))
    video = jnp.asarray(np.stack([MovingShapes(8, num_frames=2, size=16)[i]["frames"] for i in range(8)]))
    train_config = models.TrainConfig(stages=(models.Stage(2, 10),), batch_size=8, warmup_steps=2, **config)
    return vq, {"video": video}, train_config


def vq_loss_fn(model, batch):
    loss, metrics = models.vq_loss(model, batch["video"])
    return loss, {"reconstruction": metrics["reconstruction"]}


def test_gradient_accumulation_equals_one_big_batch():
    # The VQ loss is a mean over equal-sized examples, so the mean of microbatch means is the batch mean.
    vq, batch, config = vq_setup()
    results = []
    for accum in (1, 2, 4):
        cfg = dataclasses.replace(config, grad_accum=accum)
        optimizer = models.make_optimizer(cfg)
        opt_state = optimizer.init(eqx.filter(vq, eqx.is_array))
        step = models.make_train_step(vq_loss_fn, optimizer, cfg)
        results.append(step(vq, opt_state, jax.tree.map(jnp.copy, batch)))  # the step donates its batch
    (model_1, _, m_1) = results[0]
    for model_k, _, m_k in results[1:]:
        assert rel_err(m_k["loss"], m_1["loss"]) <= 1e-6
        assert rel_err(m_k["grad_norm"], m_1["grad_norm"]) <= 1e-5
        for a, b in zip(jax.tree.leaves(model_k), jax.tree.leaves(model_1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_float32_weights():
    vq, batch, config = vq_setup(compute_dtype="bfloat16")
    optimizer = models.make_optimizer(config)
    step = models.make_train_step(vq_loss_fn, optimizer, config)
    _, _, ref = models.make_train_step(vq_loss_fn, optimizer, dataclasses.replace(config, compute_dtype="float32"))(
        vq, optimizer.init(eqx.filter(vq, eqx.is_array)), jax.tree.map(jnp.copy, batch))
    model, _, metrics = step(vq, optimizer.init(eqx.filter(vq, eqx.is_array)), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert np.isfinite(metrics["loss"]) and rel_err(metrics["loss"], ref["loss"]) <= 2e-2
    with pytest.raises(ValueError, match="compute_dtype must be"):
        models.TrainConfig(compute_dtype="float16")
    # The video-text LM: bfloat16 activations through the kernels, float32 statistics and weights.
    lm = models.VideoTextLM(SMALL, key=jax.random.key(9))
    lm_config = dataclasses.replace(config, compute_dtype="bfloat16")
    optimizer = models.make_optimizer(lm_config)
    step = models.make_train_step(lambda m, b: m.loss(b), optimizer, lm_config)
    ref_step = models.make_train_step(lambda m, b: m.loss(b), optimizer, dataclasses.replace(lm_config,
                                                                                              compute_dtype="float32"))
    batch = batch_of()
    _, _, ref = ref_step(lm, optimizer.init(eqx.filter(lm, eqx.is_array)), jax.tree.map(jnp.copy, batch))
    lm, _, metrics = step(lm, optimizer.init(eqx.filter(lm, eqx.is_array)), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(lm, eqx.is_inexact_array)))
    assert rel_err(metrics["loss"], ref["loss"]) <= 2e-2


def test_schedule_warms_up_then_decays_to_the_floor():
    config = models.TrainConfig(stages=(models.Stage(8, 60), models.Stage(16, 40)), learning_rate=1e-2,
                                warmup_steps=10, final_lr_fraction=0.1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100, end_value=1e-3)
    assert config.total_steps == 100
    assert float(schedule(5)) == pytest.approx(5e-3) and float(schedule(10)) == pytest.approx(1e-2)
    assert float(schedule(100)) == pytest.approx(1e-3)
    # The optimizer's first update of a unit gradient is the warmup rate after Adam's normalisation.
    optimizer = models.make_optimizer(dataclasses.replace(config, weight_decay=0.0))
    params = {"w": jnp.ones((2, 2))}
    state = optimizer.init(params)
    for step in range(3):
        with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic
            updates, state = optimizer.update({"w": jnp.full((2, 2), 0.1)}, state, params)
        assert float(updates["w"][0, 0]) == pytest.approx(-float(schedule(step)), rel=1e-4, abs=1e-9)


def test_stages_extend_the_context_and_raise_rope_theta(tmp_path):
    model = models.VideoTextLM(SMALL, key=jax.random.key(8))
    seen = []

    def batches(index, stage):
        seen.append((index, stage.seq_len))
        examples = video_text_examples(MovingShapes(64, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                       process_index=0, process_count=1, num_epochs=None, seed=index)
        return packed_batches(examples, seq_len=stage.seq_len, batch_size=2, pad_id=TOK.pad_id)

    config = models.TrainConfig(stages=(models.Stage(64, 2), models.Stage(128, 2, rope_theta=50_000.0)),
                                batch_size=2, warmup_steps=1, checkpoint_every=10)
    result = models.train(model, lambda m, b: m.loss(b), batches, config, workdir=tmp_path, progress=False)
    assert seen == [(0, 64), (1, 128)]
    assert [r["stage"] for r in result.records] == [0, 0, 1, 1]
    assert [r["tokens"] for r in result.records] == [128, 128, 256, 256]
    assert result.model.config.attention.rope_theta == 50_000.0
    assert result.model.transformer.spec.rope_theta == 50_000.0  # the spec every block is handed
    assert all(np.isfinite(r["loss"]) for r in result.records)
    # Finished: a second call restores the last checkpoint and trains no more.
    again = models.train(model, lambda m, b: m.loss(b), batches, config, workdir=tmp_path, progress=False)
    assert len(again.records) == 4
    for a, b in zip(jax.tree.leaves(again.model), jax.tree.leaves(result.model), strict=True):
        np.testing.assert_array_equal(a, b)
