"""RingLM presets, loss and config, respec, and zoo files: identical round trips (old formats too), tampering
refused."""

import dataclasses
import hashlib
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from helpers import rel_err

import models
from data_pipelines import ByteTokenizer, MovingShapes, PatchQuantizer, packed_batches, video_text_examples
from eqx_ring import AttentionSpec, KernelTuning, from_layout, to_layout
from eqx_ring.sharding import make_mesh
from models._zoo import _json_sha256  # only to write a format-2 file as the old code did

# Text bytes and specials (263 ids), then the PatchQuantizer's 64 codes.
TINY = models.LMConfig.preset("tiny", vocab_size=263 + 64, attention=AttentionSpec(
    tuning=KernelTuning(query_chunk_size=32, key_chunk_size=32, ffn_chunk_size=64)))


def a_batch(layout=None, ring_size=1):
    examples = video_text_examples(MovingShapes(16, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                   process_index=0, process_count=1)
    dataset = packed_batches(examples, seq_len=128, batch_size=2, pad_id=ByteTokenizer.pad_id, layout=layout,
                             ring_size=ring_size)
    return {k: jnp.asarray(v) for k, v in next(iter(dataset)).items()}


def test_presets():
    assert models.LMConfig.preset("tiny").d_model == 64
    seven = models.LMConfig.preset("7b", vocab_size=1000)
    assert (seven.d_model, seven.num_layers, seven.vocab_size) == (4096, 32, 1000)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        models.LMConfig.preset("huge")
    # The 1B preset's parameter count, from shapes alone.
    shapes = eqx.filter_eval_shape(lambda: models.RingLM(models.LMConfig.preset("1b"), key=jax.random.key(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes) if isinstance(x, jax.ShapeDtypeStruct))
    assert 1.0e9 < count < 1.3e9


def test_loss_is_next_token_cross_entropy():
    model = models.RingLM(TINY, key=jax.random.key(0))
    batch = a_batch()
    loss = eqx.filter_jit(lambda m, b: m.loss(b))(model, batch)
    hidden = jax.vmap(lambda t, p, s: model(t, positions=p, segment_ids=s))(
        batch["tokens"], batch["positions"], batch["segment_ids"])
    logits = model.transformer.logits(hidden)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
    seg = batch["segment_ids"]
    mask = (batch["loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)
    assert rel_err(loss, (per_token * mask).sum() / mask.sum()) <= 1e-6
    # Another tiling for this call only: the same loss, from another program, with no rebuild.
    tuning = KernelTuning(query_chunk_size=16, key_chunk_size=64, ffn_chunk_size=32)
    retiled = eqx.filter_jit(lambda m, b: m.loss(b, tuning=tuning))
    assert rel_err(retiled(model, batch), loss) <= 1e-6
    assert retiled.lower(model, batch).as_text() != eqx.filter_jit(lambda m, b: m.loss(b)).lower(model, batch).as_text()
    np.testing.assert_allclose(model(batch["tokens"][0], tuning=tuning), model(batch["tokens"][0]), rtol=1e-5,
                               atol=1e-5)


def test_zoo_round_trip_and_tamper(tmp_path):
    model = models.RingLM(dataclasses.replace(TINY, tie_embeddings=True), key=jax.random.key(1))
    json_path, weights = models.save(tmp_path / "tiny", model)
    loaded = models.load(json_path)
    assert loaded.config == model.config
    for a, b in zip(jax.tree.leaves(eqx.filter(loaded, eqx.is_array)), jax.tree.leaves(eqx.filter(model, eqx.is_array)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.arange(64) % 200
    np.testing.assert_array_equal(jit_call(loaded, tokens), jit_call(model, tokens))
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 1
    open(weights, "wb").write(bytes(data))
    with pytest.raises(models.ZooIntegrityError, match="tiny.eqx has SHA-256 .* refusing to load it"):
        models.load(tmp_path / "tiny")


def test_zoo_loads_a_format_2_file_with_flat_attention_fields(tmp_path):
    attention = AttentionSpec(rope_theta=5e5, layout="zigzag", tuning=KernelTuning(16, 8, 32))
    config = dataclasses.replace(TINY, attention=attention)
    model = models.RingLM(config, key=jax.random.key(3))
    _, weights = models.save(tmp_path / "model", model)  # the weights file; the JSON is written as format 2 did
    flat = {"vocab_size": 327, "d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "hidden_size": 192,
            "rope_theta": 500000.0, "causal_block_size": 1, "tie_embeddings": False, "layout": "zigzag",
            "query_chunk_size": 16, "key_chunk_size": 8, "ffn_chunk_size": 32, "remat_policy": "nothing_saveable"}
    meta = {"format": "eqx-ring-zoo/2", "class": "RingLM", "config": flat, "weights": "model.eqx",
            "sha256": hashlib.sha256(open(weights, "rb").read()).hexdigest()}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**meta, "json_sha256": _json_sha256(meta)}, indent=2))
    loaded = models.load(old)
    assert loaded.config == config and loaded.spec == attention
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)
    # Format 2's hash still covers its flat fields.
    old.write_text(json.dumps({**meta, "config": {**flat, "layout": "striped"}, "json_sha256": _json_sha256(meta)}))
    with pytest.raises(models.ZooIntegrityError, match="old.json: its fields .* edited"):
        models.load(old)


def test_respec_replaces_attention_and_config_fields_over_the_same_arrays():
    model = models.RingLM(TINY, key=jax.random.key(2))
    mesh = make_mesh(sp=4)
    tuning = KernelTuning(query_chunk_size=8, key_chunk_size=8, ffn_chunk_size=16)  # zigzag: 8 tokens per half
    moved = models.respec(model, mesh=mesh, layout="zigzag", rope_theta=5e5, tuning=tuning, remat_policy=None)
    expected = dataclasses.replace(TINY, remat_policy=None, attention=AttentionSpec(layout="zigzag", rope_theta=5e5,
                                                                                    tuning=tuning))
    assert moved.config == expected and moved.spec == expected.attention.replace(mesh=mesh)
    assert model.respec(mesh=mesh, layout="zigzag", rope_theta=5e5, tuning=tuning, remat_policy=None) == moved
    assert all(a is b for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(model), strict=True))
    # Independent: the same weights (same key and shapes) built afresh with the new config, on one device.
    fresh = models.RingLM(expected, key=jax.random.key(2))
    tokens = jnp.arange(64) % TINY.vocab_size
    got = from_layout(jit_call(moved, to_layout(tokens, "zigzag", 4, axis=0)), "zigzag", 4, axis=0)
    assert rel_err(got, jit_call(fresh, tokens)) <= 1e-5
    assert rel_err(jit_call(model, tokens), jit_call(fresh, tokens)) > 1e-3  # the new RoPE base took effect
    with pytest.raises(TypeError, match="colour"):
        models.respec(model, colour="red")
    with pytest.raises(ValueError, match=r"config changes \{'d_model': 128\} change the shapes of the weights"):
        models.respec(model, d_model=128)


def test_respec_refuses_a_model_that_is_not_a_ring_model():
    vq = models.VideoVQ(models.VQConfig(frame_size=8, hidden=8, codebook_size=4, code_dim=2), key=jax.random.key(0))
    # jaxtyping's hook (on in these tests) checks the annotation first; without it, respec's own check answers.
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'model'"):
        models.respec(vq, mesh=None)
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with pytest.raises(TypeError, match=r"model must be a models.RingModel \(e.g. RingLM, VideoTextLM\), got "
                                            "VideoVQ"):
            models.respec(vq, mesh=None)
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def test_lm_config_attention_is_a_spec_without_placement(tmp_path):
    mesh = make_mesh(tp=2, sp=4)
    with pytest.raises(ValueError, match=r"LMConfig.attention must not hold a placement \(mesh=.*, head_axis=None\): "
                                         r"a config is what is saved; pass mesh= and head_axis= to the model"):
        models.LMConfig(attention=AttentionSpec(mesh=mesh))
    with pytest.raises(ValueError, match=r"LMConfig.attention must not hold a placement .*head_axis='tp'"):
        models.LMConfig(attention=AttentionSpec(mesh=mesh, head_axis="tp"))
    # A mapping of the spec's fields (as JSON gives it back) becomes the spec where JSON is read.
    saved = models.LMConfig(vocab_size=16, d_model=16,
                            attention=AttentionSpec(layout="zigzag", tuning=KernelTuning(query_chunk_size=64)))
    json_path, _ = models.save(tmp_path / "lm", models.RingLM(saved, key=jax.random.key(0)))
    config = models.load(json_path).config
    assert config.attention == AttentionSpec(layout="zigzag", tuning=KernelTuning(query_chunk_size=64))
    # The model adds the placement: its spec is the config's on its mesh.
    model = eqx.filter_eval_shape(lambda: models.RingLM(config, mesh=mesh, head_axis="tp", key=jax.random.key(0)))
    assert model.spec == config.attention.replace(mesh=mesh, head_axis="tp")


def jit_call(model, tokens):
    return eqx.filter_jit(lambda m, t: m(t))(model, tokens)


def test_weight_decay_spares_the_norms_of_stacked_blocks():
    """With zero gradients AdamW's update is the decay alone: matrices shrink, norm scales (2-D when stacked) don't."""
    model = models.RingLM(TINY, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    config = models.TrainConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    optimizer = models.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 step counts
        updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    blocks = updates.transformer.blocks
    assert blocks.attention_norm.weight.ndim == 2 and not blocks.attention_norm.weight.any()
    assert not updates.transformer.norm.weight.any()
    assert blocks.attention.query_proj.weight.all() and blocks.attention.query_proj.weight.ndim == 3


def test_training_with_attention_dropout_takes_a_key_per_step_and_resumes_exactly(tmp_path):
    config = dataclasses.replace(TINY, attention=TINY.attention.replace(dropout=0.2))
    model = models.RingLM(config, key=jax.random.key(0))
    batch = a_batch()
    key = jax.random.key(3)
    optimizer = optax.sgd(1.0)
    step = models.make_train_step(lambda m, b, key=None: (m.loss(b, key=key), {}), optimizer,
                                  models.TrainConfig(batch_size=2, grad_accum=2, grad_clip=1e9))
    stepped, _, _ = step(model, optimizer.init(eqx.filter(model, eqx.is_array)), dict(batch), key)
    update = (stepped.transformer.blocks.attention.query_proj.weight
              - model.transformer.blocks.attention.query_proj.weight)

    def query_grad(loss):
        return eqx.filter_grad(loss)(model).transformer.blocks.attention.query_proj.weight

    # Each microbatch (rows 0 and 1: strided) is handed its own key, split from the step's.
    keys = jax.random.split(key, 2)
    halves = query_grad(lambda m: sum(m.loss({**{k: v[i::2] for k, v in batch.items()}, "whole_batch": batch},
                                             key=keys[i]) for i in range(2)) / 2)
    assert rel_err(-update, halves) <= 1e-4
    assert rel_err(-update, query_grad(lambda m: m.loss(batch, key=key))) > 0.01  # not the whole batch's key
    assert rel_err(-update, query_grad(lambda m: m.loss(batch, key=keys[0]))) > 0.01
    with pytest.raises(ValueError, match=r"AttentionSpec\(dropout=0.2\) needs key="):
        step(model, optimizer.init(eqx.filter(model, eqx.is_array)), dict(batch))

    def batches(index, stage):
        examples = video_text_examples(MovingShapes(16, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                       process_index=0, process_count=1, num_epochs=None)
        return packed_batches(examples, seq_len=stage.seq_len, batch_size=2, pad_id=ByteTokenizer.pad_id)

    class Cut(Exception):
        pass

    def cut_at(stop):
        def after_step(model, batch, metrics, step):
            if step == stop:
                raise Cut
            return model
        return after_step

    def run(workdir, after_step=None):
        cfg = models.TrainConfig(stages=(models.Stage(128, 4),), batch_size=2, warmup_steps=0, checkpoint_every=2)
        return models.train(model, lambda m, b, key: (m.loss(b, key=key), {}), batches, cfg, workdir=workdir,
                            progress=False, key=key, after_step=after_step)

    whole = run(tmp_path / "whole")
    with pytest.raises(Cut):
        run(tmp_path / "cut", cut_at(3))  # cut after step 3, before its checkpoint
    resumed = run(tmp_path / "cut")  # resumes at step 2 and draws steps 2 and 3's keys as `whole` did
    for a, b in zip(jax.tree.leaves(resumed.model), jax.tree.leaves(whole.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in whole.records]
