"""KV-cached decoding: ring prefill, then one token at a time against a sequence-sharded cache; the model's spec
chosen after it is built: kernel tuning per call, another spec over the same arrays."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err, spread

import eqx_ring
import models
from eqx_ring.sharding import make_mesh

SIZE = 32  # cache slots: 8 per device on 4 devices


def transformer(mesh=None, layout="contiguous", window=None, strategy="ring", attention_chunk=None):
    chunk = 4 if mesh is not None else 64  # zigzag on 4 devices: half a shard is 4 slots
    tuning = eqx_ring.KernelTuning(query_chunk_size=chunk, key_chunk_size=chunk, ffn_chunk_size=SIZE)
    spec = eqx_ring.AttentionSpec(sliding_window=window, layout=layout, mesh=mesh, tuning=tuning, strategy=strategy,
                                  attention_chunk_size=attention_chunk)
    return eqx_ring.RingTransformer(97, 32, 2, 4, spec=spec, num_kv_heads=2, hidden_size=64, key=jax.random.key(0))


# Prompts of 13 tokens end inside a shard, of 16 at a shard boundary; each (prompt, window, attention chunk) on
# three places, the places in turn (helpers.spread). Prefill runs the strategy; decoding merges every device's
# part of the cache, whatever it was.
@pytest.mark.parametrize(("place", "case"), spread(
    [(13, None, None), (16, 5, None), (13, None, 6), (16, None, None), (13, 5, None), (16, None, 6)],
    [(4, "zigzag", "ring"), (1, "contiguous", "ring"), (4, "contiguous", "ulysses"), (4, "striped", "ring"),
     (4, "zigzag", "allgather"), (4, "contiguous", "ring"), (4, "zigzag", "hybrid")], 3))
def test_every_step_equals_full_recomputation(place, case):
    (n, layout, strategy), (prompt_len, window, attention_chunk) = place, case
    hybrid = dict(sp=2, usp=2) if strategy == "hybrid" else dict(sp=n)
    mesh = None if n == 1 else make_mesh(dp=1, fsdp=1, tp=1, **hybrid, devices=jax.devices()[:n])
    model = transformer(mesh, layout, window, strategy, attention_chunk)
    reference = transformer(window=window, attention_chunk=attention_chunk)  # same weights, one device
    tokens = jax.random.randint(jax.random.key(1), (SIZE,), 0, 97)
    # What recomputing the whole sequence at step t gives is the causal pass's row t.
    expected = reference.logits(eqx.filter_jit(lambda m, t: m(t))(reference, tokens))

    segments = np.where(np.arange(SIZE) < prompt_len, 1, 2)  # the room after the prompt is skipped
    laid = [eqx_ring.to_layout(a, layout, n, axis=0) for a in (tokens, np.arange(SIZE), segments)]
    prefill = eqx.filter_jit(lambda m, t, p, s: m.prefill(t, length=prompt_len, positions=p, segment_ids=s))
    hidden, cache = prefill(model, *(jnp.asarray(a, jnp.int32) for a in laid))
    if mesh is not None:  # the cache stays split over the ring
        assert cache.keys.sharding.spec[1] == model.spec.sequence_axes
    last = eqx_ring.layout_slot(prompt_len - 1, SIZE, layout, n)
    got = [model.logits(hidden[last])]
    step = eqx.filter_jit(lambda m, t, c: m.decode_step(t, c))
    for t in range(prompt_len, SIZE):
        h, cache = step(model, tokens[t], cache)
        got.append(model.logits(h))
    assert int(cache.length) == SIZE
    for t, logits in zip(range(prompt_len - 1, SIZE), got, strict=True):
        assert rel_err(logits, expected[t]) <= 1e-5, t


def test_decoding_refuses_block_causal_attention():
    model = eqx_ring.RingTransformer(97, 32, 1, 4, spec=eqx_ring.AttentionSpec(causal_block_size=4),
                                     key=jax.random.key(0))
    with pytest.raises(ValueError, match="causal_block_size=1"):
        model.prefill(jnp.zeros(8, jnp.int32), length=4)


LM = models.LMConfig.preset("tiny", vocab_size=97, attention=eqx_ring.AttentionSpec(
    tuning=eqx_ring.KernelTuning(query_chunk_size=8, key_chunk_size=8, ffn_chunk_size=16)))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_generate_on_a_ring_equals_one_device(layout):
    single = models.RingLM(LM, key=jax.random.key(2))
    mesh = make_mesh(dp=1, fsdp=1, tp=1, sp=4, devices=jax.devices()[:4])
    ring = models.respec(single, mesh=mesh, layout=layout)
    prompts = [np.arange(5) + 3, np.arange(11) % 7 + 1, np.arange(8) % 5 + 2]
    one = np.asarray(models.generate(single, prompts, 9))
    np.testing.assert_array_equal(np.asarray(models.generate(ring, prompts, 9)), one)
    # Rows split over dp=2 (three rows: one is padded on and dropped), the sequence over sp=4.
    data_ring = models.respec(single, mesh=make_mesh(dp=2, fsdp=1, tp=1, sp=4), layout=layout)
    np.testing.assert_array_equal(np.asarray(models.generate(data_ring, prompts, 9)), one)
    # Greedy decoding, checked against argmax of a full pass over each continued prompt.
    for prompt, row in zip(prompts, one, strict=True):
        sequence = list(prompt)
        for token in row:
            hidden = single(jnp.asarray(sequence + [0] * (32 - len(sequence)), jnp.int32))
            assert token == int(single.transformer.logits(hidden[len(sequence) - 1]).argmax())
            sequence.append(int(token))


@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
def test_generate_under_each_strategy_equals_one_device(strategy):
    single = models.RingLM(LM, key=jax.random.key(2))
    hybrid = dict(sp=2, usp=2) if strategy == "hybrid" else dict(sp=4)
    mesh = make_mesh(dp=2, fsdp=1, tp=1, **hybrid)
    prompts = [np.arange(5) + 3, np.arange(11) % 7 + 1]
    other = models.respec(single, mesh=mesh, layout="zigzag", strategy=strategy)
    np.testing.assert_array_equal(np.asarray(models.generate(other, prompts, 9)),
                                  np.asarray(models.generate(single, prompts, 9)))


def test_sampling_options():
    model = models.RingLM(LM, key=jax.random.key(3))
    prompts = [np.arange(6) + 1]
    greedy = np.asarray(models.generate(model, prompts, 8))
    key = jax.random.key(4)
    # top_k=1 and a tiny top_p both leave only the most likely token.
    np.testing.assert_array_equal(models.generate(model, prompts, 8, temperature=1.0, top_k=1, key=key), greedy)
    np.testing.assert_array_equal(models.generate(model, prompts, 8, temperature=1.0, top_p=1e-6, key=key), greedy)
    sampled = np.asarray(models.generate(model, prompts, 8, temperature=5.0, key=key))
    assert (sampled != greedy).any()
    allowed = np.zeros(97, bool)
    allowed[[7, 9]] = True
    constrained = np.asarray(models.generate(model, prompts, 8, temperature=5.0, key=key, allowed=allowed))
    assert set(constrained.ravel()) <= {7, 9}
    stopped = np.asarray(models.generate(model, prompts, 8, stop_tokens=[int(greedy[0, 2])]))
    np.testing.assert_array_equal(stopped[0, :3], greedy[0, :3])
    with pytest.raises(ValueError, match="needs a key"):
        models.generate(model, prompts, 4, temperature=1.0)


def test_lm_config_round_trip_through_respec():
    model = models.RingLM(LM, key=jax.random.key(5))
    moved = models.respec(model, layout="striped")
    assert moved.config == dataclasses.replace(LM, attention=LM.attention.replace(layout="striped"))


def test_respec_to_one_device_drops_the_head_axis():
    # A tensor-parallel model copied to one device for decoding: no mesh, so no axis to split heads over.
    mesh = make_mesh(dp=1, fsdp=1, tp=2, sp=4)
    model = models.RingLM(LM, mesh=mesh, head_axis="tp", key=jax.random.key(5))
    single = models.respec(model, mesh=None)
    prompt = [np.arange(5) % LM.vocab_size]
    np.testing.assert_array_equal(models.generate(single, prompt, 3), models.generate(
        models.respec(models.RingLM(LM, key=jax.random.key(5)), mesh=None), prompt, 3))


def test_kernel_tuning_is_chosen_per_call_without_rebuilding_the_model():
    model = transformer()
    tokens = jax.random.randint(jax.random.key(6), (SIZE,), 0, 97)
    other = eqx_ring.KernelTuning(query_chunk_size=8, key_chunk_size=16, ffn_chunk_size=8)
    run = eqx.filter_jit(lambda m, t, tuning: m(t, tuning=tuning))
    default, tuned = run(model, tokens, None), run(model, tokens, other)
    # The per-call tuning is what the model built with it computes; other tiles, the same attention.
    built = transformer()
    built = built.with_spec(built.spec.replace(tuning=other))
    np.testing.assert_array_equal(tuned, run(built, tokens, None))
    assert rel_err(tuned, default) <= 1e-5
    prefill = eqx.filter_jit(lambda m, t, tuning: m.prefill(t, length=13, tuning=tuning))
    np.testing.assert_array_equal(prefill(model, tokens, other)[0], prefill(built, tokens, None)[0])
    # Static under jit: the same model pytree with another tuning is another program (its tile sizes).
    lowered = [run.lower(model, tokens, t).as_text() for t in (None, other, eqx_ring.KernelTuning())]
    assert lowered[0] != lowered[1]
    assert lowered[2] == lowered[0]  # the spec's own tuning, given explicitly: the default program
    with pytest.raises(TypeError, match="tuning"):
        model(tokens, tuning={"query_chunk_size": 8})


def test_with_spec_runs_the_same_arrays_with_another_spec():
    single = transformer()
    mesh = make_mesh(sp=4)
    tuning = eqx_ring.KernelTuning(query_chunk_size=4, key_chunk_size=4, ffn_chunk_size=SIZE)
    ring = single.with_spec(eqx_ring.AttentionSpec(layout="zigzag", mesh=mesh, tuning=tuning))
    assert ring.spec.mesh is mesh and single.spec == transformer().spec  # the original keeps its own spec
    assert all(a is b for a, b in zip(jax.tree.leaves(ring), jax.tree.leaves(single), strict=True))
    tokens = jax.random.randint(jax.random.key(7), (SIZE,), 0, 97)
    run = eqx.filter_jit(lambda m, t: m(t))
    zigzag = run(ring, eqx_ring.to_layout(tokens, "zigzag", 4, axis=0))
    assert rel_err(eqx_ring.from_layout(zigzag, "zigzag", 4, axis=0), run(single, tokens)) <= 1e-5
    # A spec the heads do not suit is refused as the constructor refuses it.
    split = eqx_ring.AttentionSpec(mesh=make_mesh(tp=4, sp=2), head_axis="tp")
    with pytest.raises(ValueError, match=r"num_kv_heads=2 must be divisible by the size 4 of head_axis='tp'"):
        single.with_spec(split)
    with pytest.raises(TypeError, match="spec"):
        single.with_spec("zigzag")
