"""RingTransformer, KV-cached decoding, chunked_cross_entropy and models.generate refuse bad input by name."""

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import eqx_ring
import models
from eqx_ring.sharding import make_mesh

VOCAB, SIZE = 64, 16


def small(spec=None, **tuning):
    """A one-layer model with `spec` (default: the default spec), its chunk sizes 4 (FFN: 16) unless `tuning` says
    otherwise."""
    spec = eqx_ring.AttentionSpec() if spec is None else spec
    tuning = eqx_ring.KernelTuning(**dict(query_chunk_size=4, key_chunk_size=4, ffn_chunk_size=16) | tuning)
    return eqx_ring.RingTransformer(VOCAB, 16, 1, 2, spec=spec.replace(tuning=tuning), hidden_size=32,
                                    key=jax.random.key(0))


MODEL = small()
TOKENS = jnp.arange(SIZE, dtype=jnp.int32) % VOCAB


@pytest.mark.parametrize(("bad", "at"), [(VOCAB, 3), (500, 0), (-1, 7)])
def test_token_ids_outside_the_vocabulary(bad, at):
    tokens = TOKENS.at[at].set(bad)
    message = rf"tokens must be ids in \[0, 64\) \(vocab_size=64\), got {bad} at index {at}"
    with pytest.raises(ValueError, match=message):
        MODEL(tokens)
    with pytest.raises(ValueError, match=message):
        MODEL.prefill(tokens, length=8)
    # Traced (inside jit, batched): no raise, but NaN in the bad example (never a finite wrong value); the good
    # example is untouched.
    batched = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
    out = batched(MODEL, jnp.stack([TOKENS, tokens]))
    # The same program with a good second example: a batched product is not bitwise the unbatched one.
    np.testing.assert_array_equal(out[0], batched(MODEL, jnp.stack([TOKENS, TOKENS]))[0])
    assert np.isnan(out[1, at:]).all()
    hidden, cache = eqx.filter_jit(lambda m, t: m.prefill(t, length=8))(MODEL, tokens)
    assert np.isnan(hidden[at:]).all() and np.isnan(cache.values[:, at]).all()


def test_traced_ids_on_a_mesh_give_nan_without_a_callback():
    """On a (dp=2, sp=4) mesh: the bad example's outputs are NaN, the good one's are right, and the compiled step
    has no host callback (a run-time raise from one device left the others waiting: the process aborted)."""
    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
    model = small(eqx_ring.AttentionSpec(mesh=mesh), query_chunk_size=2, key_chunk_size=2)
    sharded = jax.device_put(jnp.stack([TOKENS, TOKENS.at[13].set(VOCAB)]),
                             jax.sharding.NamedSharding(mesh, P("dp", "sp")))
    run = eqx.filter_jit(lambda m, t: jax.vmap(m, spmd_axis_name="dp")(t))
    out = run(model, sharded)
    np.testing.assert_allclose(out[0], small()(TOKENS), rtol=1e-5, atol=1e-6)
    assert np.isnan(out[1, 13:]).all()
    text = run.lower(model, sharded).compile().compiled.as_text()
    assert "custom-call" not in text and "all-gather" not in text


def test_decode_step_token_outside_the_vocabulary():
    _, cache = MODEL.prefill(TOKENS, length=8)
    with pytest.raises(ValueError, match=r"token must be ids in \[0, 64\) \(vocab_size=64\), got 500$"):
        MODEL.decode_step(jnp.int32(500), cache)
    with pytest.raises(ValueError, match="got -2$"):
        MODEL.decode_step(jnp.int32(-2), cache)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"token must be ids in \[0, 64\)"):
        eqx.filter_jit(lambda m, t, c: m.decode_step(t, c))(MODEL, jnp.int32(VOCAB), cache)


def test_integer_inputs_and_shapes(no_hook):
    with pytest.raises(TypeError, match="tokens must be integer ids, got dtype float32"):
        MODEL(TOKENS.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tokens must be \[seq\] \(one example: batch with jax.vmap\), got shape "
                                         r"\(2, 16\)"):
        MODEL(jnp.stack([TOKENS, TOKENS]))
    with pytest.raises(ValueError, match=r"positions must be shaped like tokens, \(16,\), got \(8,\)"):
        MODEL(TOKENS, positions=jnp.arange(8))
    with pytest.raises(TypeError, match="positions must be integers, got dtype float32"):
        MODEL.prefill(TOKENS, length=8, positions=jnp.arange(SIZE, dtype=jnp.float32))
    with pytest.raises(TypeError, match="segment_ids must be integers, got dtype float32"):
        MODEL(TOKENS, segment_ids=jnp.zeros(SIZE, jnp.float32))
    _, cache = MODEL.prefill(TOKENS, length=8)
    with pytest.raises(ValueError, match=r"token must be a scalar id \(batch with jax.vmap\), got shape \(2,\)"):
        MODEL.decode_step(TOKENS[:2], cache)


def test_cross_entropy_labels(no_hook):
    hidden = jax.random.normal(jax.random.key(1), (2, SIZE, 16))
    labels = jnp.stack([TOKENS, TOKENS[::-1]])
    mask = jnp.ones((2, SIZE), bool).at[1, 5].set(False)
    loss = eqx_ring.chunked_cross_entropy
    with pytest.raises(TypeError, match="labels must be integer ids, got dtype float32"):
        loss(hidden, MODEL.head_weight, labels.astype(jnp.float32))
    message = r"labels must be ids in \[0, 64\) \(vocab_size=64\), got {} at index \(1, 5\)"
    with pytest.raises(ValueError, match=message.format(64)):
        loss(hidden, MODEL.head_weight, labels.at[1, 5].set(VOCAB))
    with pytest.raises(ValueError, match=message.format(-100)):
        loss(hidden, MODEL.head_weight, labels.at[1, 5].set(-100), jnp.ones((2, SIZE)))
    assert np.isnan(eqx.filter_jit(loss)(hidden, MODEL.head_weight, labels.at[0, 0].set(VOCAB)))  # traced: NaN
    per_token = eqx.filter_jit(partial(loss, reduction="none"))(hidden, MODEL.head_weight, labels.at[0, 3].set(-1))
    assert np.isnan(per_token[0, 3]) and np.isfinite(np.delete(np.asarray(per_token).ravel(), 3)).all()
    # A label that does not count may be anything (a padding id): the loss is that of the valid label.
    expected = loss(hidden, MODEL.head_weight, labels, mask)
    for masked in (loss, eqx.filter_jit(loss)):
        assert masked(hidden, MODEL.head_weight, labels.at[1, 5].set(-100), mask) == expected


def test_cross_entropy_arguments(no_hook):
    hidden, labels = jnp.ones((SIZE, 16)), TOKENS
    loss = eqx_ring.chunked_cross_entropy
    for size in (0, -8, 2.5):
        with pytest.raises(ValueError, match=f"vocab_chunk_size must be a positive int, got {size}"):
            loss(hidden, MODEL.head_weight, labels, vocab_chunk_size=size)
    with pytest.raises(ValueError, match=r"mask must be shaped like hidden without its last axis, \(16,\), got \(8,\)"):
        loss(hidden, MODEL.head_weight, labels, jnp.ones(8, bool))
    with pytest.raises(ValueError, match=r"head_weight must be \[vocab, d_model=16\] \(hidden's width\), got shape "
                                         r"\(64, 8\)"):
        loss(hidden, jnp.ones((VOCAB, 8)), labels)
    # A chunk that does not divide the vocabulary pads it (as documented): the same loss as one that does.
    hidden = jax.random.normal(jax.random.key(2), (SIZE, 16))
    np.testing.assert_allclose(loss(hidden, MODEL.head_weight, labels, vocab_chunk_size=24),
                               loss(hidden, MODEL.head_weight, labels, vocab_chunk_size=16), rtol=1e-6)


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("num_layers", 0, "num_layers must be a positive int, got 0"),
    ("num_layers", -2, "num_layers must be a positive int, got -2"),
    ("vocab_size", 0, "vocab_size must be a positive int, got 0"),
    ("vocab_size", -5, "vocab_size must be a positive int, got -5"),
    ("d_model", -16, "d_model must be a positive int, got -16"),
    ("num_heads", 0, "num_heads must be a positive int, got 0"),
    ("hidden_size", -1, "hidden_size must be a positive int, got -1"),
    ("hidden_size", 0, "hidden_size must be a positive int, got 0"),
    ("norm_eps", -1e-6, "norm_eps must be a finite number >= 0, got -1e-06"),
    # The settings the layers share are the spec's: the constructor checks that the heads suit it.
    ("head_dim", 3, "RoPE rotates pairs of features: head_dim=3 must be even"),
    ("spec", eqx_ring.AttentionSpec(mesh=make_mesh(tp=4, sp=2), head_axis="tp"),
     r"num_kv_heads=2 must be divisible by the size 4 of head_axis='tp'"),
])
def test_constructor_arguments(argument, value, message):
    kw = dict(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, hidden_size=32, key=jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        eqx_ring.RingTransformer(**(kw | {argument: value}))


@pytest.mark.parametrize("theta", [0.0, -10_000.0, float("inf")])
def test_rope_theta_is_refused_by_the_spec(theta):
    with pytest.raises(ValueError, match=f"rope_theta must be a positive finite number or None, got {theta}"):
        eqx_ring.AttentionSpec(rope_theta=theta)


def test_spec_must_be_an_attention_spec(no_hook):
    kw = dict(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, hidden_size=32, key=jax.random.key(0))
    with pytest.raises(TypeError, match="spec must be an eqx_ring.AttentionSpec, got dict"):
        eqx_ring.RingTransformer(**kw, spec={"layout": "zigzag"})
    with pytest.raises(TypeError, match="tuning must be an eqx_ring.KernelTuning or None, got dict"):
        MODEL(TOKENS, tuning={"query_chunk_size": 8})


def test_decoding_past_the_cache():
    with pytest.raises(ValueError, match=r"length must be in \[1, 16\] \(the prompt's tokens, at most the cache's 16 "
                                         r"slots\), got 20"):
        MODEL.prefill(TOKENS, length=20)
    with pytest.raises(ValueError, match=r"length must be in \[1, 16\] .*got 0"):
        MODEL.prefill(TOKENS, length=0)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"length must be in \[1, 16\]"):
        eqx.filter_jit(lambda m, t, n: m.prefill(t, length=n))(MODEL, TOKENS, jnp.int32(17))
    _, cache = MODEL.prefill(TOKENS, length=15)
    _, cache = MODEL.decode_step(TOKENS[15], cache)  # the last slot
    assert int(cache.length) == SIZE
    with pytest.raises(ValueError, match=r"the cache is full: cache.length must be < 16 \(its slots\) to append a "
                                         r"token, got cache.length=16"):
        MODEL.decode_step(TOKENS[0], cache)
    step = eqx.filter_jit(lambda m, t, c: m.decode_step(t, c))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"the cache is full: cache.length must be < 16"):
        step(MODEL, TOKENS[0], cache)
    # Both wrong at once: the full cache is reported.
    with pytest.raises(eqx.EquinoxRuntimeError, match="the cache is full"):
        step(MODEL, jnp.int32(-1), cache)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_prefill_inside_a_callers_shard_map(layout):
    mesh = make_mesh(dp=1, fsdp=1, tp=1, sp=4, devices=jax.devices()[:4])
    model = small(eqx_ring.AttentionSpec(layout=layout, mesh=mesh), query_chunk_size=2, key_chunk_size=2)
    tokens = jax.random.randint(jax.random.key(3), (SIZE,), 0, VOCAB)
    prompt = 11  # its last token is in the middle of a shard
    segments = jnp.asarray(eqx_ring.to_layout(np.where(np.arange(SIZE) < prompt, 1, 2), layout, 4, axis=0))
    outside_hidden, outside = eqx.filter_jit(lambda m, t, s: m.prefill(t, length=prompt, segment_ids=s))(
        model, tokens, segments)

    split = P("sp")
    cache_split = jax.tree.unflatten(jax.tree.structure(outside), [P(None, "sp")] * 2 + [split] + [P()] * 3)
    inside_hidden, inside = jax.jit(jax.shard_map(
        lambda t, s: model.prefill(t, length=prompt, segment_ids=s), mesh=mesh, in_specs=(split, split),
        out_specs=(split, cache_split)))(tokens, segments)
    np.testing.assert_allclose(inside_hidden, outside_hidden, rtol=1e-5, atol=1e-6)
    for name in ("keys", "values"):
        np.testing.assert_allclose(getattr(inside, name), getattr(outside, name), rtol=1e-5, atol=1e-6)
    for name in ("segment_ids", "length", "position", "segment"):
        np.testing.assert_array_equal(getattr(inside, name), getattr(outside, name))
    assert (int(inside.length), int(inside.position), int(inside.segment)) == (prompt, prompt, 1)


def test_decode_step_inside_a_callers_shard_map():
    mesh = make_mesh(dp=1, fsdp=1, tp=1, sp=4, devices=jax.devices()[:4])
    _, cache = MODEL.prefill(TOKENS, length=8)
    cache_split = jax.tree.unflatten(jax.tree.structure(cache), [P(None, "sp")] * 2 + [P("sp")] + [P()] * 3)
    step = jax.shard_map(lambda c: MODEL.decode_step(TOKENS[8], c)[1], mesh=mesh, in_specs=(cache_split,),
                         out_specs=cache_split)
    with pytest.raises(ValueError, match="decode_step runs in the global view: call it outside a shard_map over "
                                         "seq_axis='sp'"):
        step(cache)


LM = models.RingLM(models.LMConfig.preset("tiny", vocab_size=97, attention=eqx_ring.AttentionSpec(
    tuning=eqx_ring.KernelTuning(query_chunk_size=8, key_chunk_size=8, ffn_chunk_size=16))), key=jax.random.key(4))
PROMPTS = [np.arange(5) + 3, np.arange(7) % 5 + 1]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(prompts=[np.arange(5), np.array([1, 2, 500])]), ValueError,
     r"prompts\[1\] must be token ids in \[0, 97\) \(vocab_size=97\), got 500 at position 2"),
    (dict(prompts=[np.array([3, -1, 4])]), ValueError, r"prompts\[0\] must be token ids in \[0, 97\).*got -1 at "
                                                       r"position 1"),
    (dict(prompts=[np.array([1.0, 2.0])]), TypeError, r"prompts\[0\] must be integer token ids, got dtype float64"),
    (dict(prompts=[]), ValueError, "prompts must hold at least one prompt, got none"),
    (dict(prompts=[np.arange(4), []]), ValueError,
     r"prompts\[1\] must be a non-empty \[_prompt\] of token ids, got shape \(0,\)"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int, got 0"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be a positive int, got 2.0"),
    (dict(temperature=-0.5), ValueError, "temperature must be >= 0, got -0.5"),
    (dict(temperature=1.0), ValueError, r"temperature=1.0 > 0 samples, which needs a key, got key=None"),
    (dict(top_k=0), ValueError, "top_k must be None or a positive int, got 0"),
    (dict(top_p=1.5), ValueError, r"top_p must be None or in \(0, 1\], got 1.5"),
    (dict(top_p=0.0), ValueError, r"top_p must be None or in \(0, 1\], got 0.0"),
    (dict(stop_tokens=[3, 97]), ValueError, r"stop_tokens must be token ids in \[0, 97\).*got 97 at index 1"),
    (dict(forced=np.array([-1, 5])), ValueError,
     r"forced must be \[max_new_tokens=4\] \(-1 where the token is chosen\), got shape \(2,\)"),
    (dict(forced=np.array([-1, 97, -1, -1])), ValueError,
     r"forced must be -1 or token ids in \[0, 97\) \(vocab_size=97\), got 97 at step 1"),
    (dict(forced=np.array([-1, -1, -3, -1])), ValueError, r"forced must be -1 or token ids.*got -3 at step 2"),
    (dict(allowed=np.ones(96, bool)), ValueError,
     r"allowed must be \[vocab_size=97\] or \[max_new_tokens=4, vocab_size=97\], got shape \(96,\)"),
    (dict(allowed=np.ones(97, np.int32)), TypeError, "allowed must be bool, got dtype int32"),
    (dict(allowed=np.zeros((4, 97), bool)), ValueError,
     r"allowed must allow a token at every step that chooses one \(forced -1\), got none at step 0"),
])
def test_generate_arguments(kwargs, error, message, no_hook):
    kw = dict(prompts=PROMPTS, max_new_tokens=4) | kwargs
    with pytest.raises(error, match=message):
        models.generate(LM, **kw)


def test_generate_allowed_and_forced_together():
    allowed = np.ones((4, 97), bool)
    allowed[2] = False
    with pytest.raises(ValueError, match="got none at step 2"):
        models.generate(LM, PROMPTS, 4, allowed=allowed)
    # A step whose token is forced needs no allowed token; the forced ids are placed as given.
    out = np.asarray(models.generate(LM, PROMPTS, 4, allowed=allowed, forced=np.array([-1, -1, 96, -1])))
    assert out.shape == (2, 4) and (out[:, 2] == 96).all()
