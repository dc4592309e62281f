"""RingLM presets, loss and config, respec, and zoo files: identical round trips (old formats too), tampering
refused."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err

import models
from eqx_ring import AttentionSpec, KernelTuning, from_layout, to_layout
from eqx_ring.sharding import make_mesh
from data_pipelines import ByteTokenizer, MovingShapes, PatchQuantizer, packed_batches, video_text_examples

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
