"""RingAttention, BlockwiseFFN, RMSNorm, RingTransformer and chunked_cross_entropy against plain references."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from helpers import rel_err
from jax.sharding import PartitionSpec as P

import eqx_ring
from eqx_ring import AttentionSpec, KernelTuning
from eqx_ring.sharding import make_mesh

D_MODEL, T = 32, 64
CHUNK8 = KernelTuning(query_chunk_size=8, key_chunk_size=8)


def jit_call(module, *args, **kwargs):
    return eqx.filter_jit(lambda m, *a: m(*a, **kwargs))(module, *args)


def grads_of(module, f, *args):
    """Gradients of sum(f(module, *args) * fixed cotangent) w.r.t. every array in `module`."""
    out = f(module, *args)
    ct = jax.random.normal(jax.random.key(9), out.shape)
    return eqx.filter_jit(eqx.filter_grad(lambda m: jnp.vdot(f(m, *args), ct)))(module)


def tree_rel_err(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---- an independent plain-JAX reference for RingAttention -------------------------------------


def scaled_frequency(freq, scaling):
    """One RoPE frequency after `scaling`, from the definitions (position interpolation; Llama 3.1's bands)."""
    if scaling is None:
        return freq
    if scaling.kind == "linear":
        return freq / scaling.factor
    wavelength = 2 * np.pi / freq
    old = scaling.original_max_position_embeddings
    if wavelength < old / scaling.high_freq_factor:  # fast rotations: kept
        return freq
    if wavelength > old / scaling.low_freq_factor:  # slow ones: interpolated
        return freq / scaling.factor
    blend = (old / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    return blend * freq + (1 - blend) * freq / scaling.factor


def rope_reference(x, positions, theta, scaling=None):
    """RoPE as a complex rotation of (first half + i * second half) of each head."""
    half = x.shape[-1] // 2
    freq = np.array([scaled_frequency(1.0 / theta ** (i / half), scaling) for i in range(half)])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, None, None] * freq)
    return np.concatenate([z.real, z.imag], -1)


DEFAULT = AttentionSpec()


def attention_reference(attn: eqx_ring.RingAttention, x, *, spec=DEFAULT, positions=None, segment_ids=None):
    """float64 NumPy self-attention with attn's weights and spec's settings: projections, RoPE, GQA, causal/segment
    masks."""
    x = np.asarray(x, np.float64)
    seq = x.shape[0]
    positions = np.arange(seq) if positions is None else np.asarray(positions)

    def proj(layer, n):
        y = x @ np.asarray(layer.weight, np.float64).T
        y = y if layer.bias is None else y + np.asarray(layer.bias, np.float64)
        return y.reshape(seq, n, attn.head_dim)

    q, k, v = proj(attn.query_proj, attn.num_heads), proj(attn.key_proj, attn.num_kv_heads), proj(
        attn.value_proj, attn.num_kv_heads)
    if spec.rope_theta is not None:
        q, k = (rope_reference(a, positions, spec.rope_theta, spec.rope_scaling) for a in (q, k))
    groups = attn.num_heads // attn.num_kv_heads
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(attn.head_dim)
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    visible = np.ones((seq, seq), bool)
    if spec.causal:
        visible &= j // spec.causal_block_size <= i // spec.causal_block_size
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        visible &= ids[:, None] == ids[None, :]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(seq, -1)
    return o @ np.asarray(attn.output_proj.weight, np.float64).T + (
        0 if attn.output_proj.bias is None else np.asarray(attn.output_proj.bias, np.float64))


def packed(seq=T):
    """Segment ids and per-segment positions of three packed documents."""
    lengths = [23, 30, seq - 53]
    ids = np.repeat(np.arange(3), lengths).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(positions)


def x_input(seq=T, d=D_MODEL, seed=1):
    return jax.random.normal(jax.random.key(seed), (seq, d))


# ---- RingAttention --------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_size", [None, 4])
def test_from_multihead_attention_equals_equinox(mesh_size):
    mha = eqx.nn.MultiheadAttention(4, D_MODEL, use_query_bias=True, use_output_bias=True, key=jax.random.key(0))
    mesh = None if mesh_size is None else make_mesh(sp=mesh_size, devices=jax.devices()[:mesh_size])
    attn = eqx_ring.RingAttention.from_multihead_attention(mha)
    spec = eqx_ring.RingAttention.MHA_SPEC.replace(mesh=mesh, tuning=CHUNK8)
    x = x_input()
    expected = mha(x, x, x)
    assert rel_err(jit_call(attn, x, spec=spec), expected) <= 1e-5
    # Asking for a causal mask gives what MultiheadAttention computes with the same mask.
    causal = spec.replace(causal=True)
    assert rel_err(jit_call(attn, x, spec=causal), mha(x, x, x, mask=jnp.tril(jnp.ones((T, T), bool)))) <= 1e-5


def test_from_multihead_attention_rejects_what_it_cannot_express():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"mha.dropout.p=0.1: .* spec=RingAttention.MHA_SPEC.replace\(dropout=0.1\)"):
        eqx_ring.RingAttention.from_multihead_attention(eqx.nn.MultiheadAttention(4, 32, dropout_p=0.1, key=key))
    with pytest.raises(ValueError, match="query/key/value/output sizes"):
        eqx_ring.RingAttention.from_multihead_attention(eqx.nn.MultiheadAttention(4, 32, key_size=16, key=key))


ATTENTION_CASES = {  # (layer arguments, spec arguments)
    "rope_gqa_causal": (dict(num_heads=4, num_kv_heads=2), {}),
    "mqa_bias": (dict(num_heads=4, num_kv_heads=1, use_bias=True), {}),
    "qkv_bias_head_dim": (dict(num_heads=4, num_kv_heads=2, head_dim=6, qkv_bias=True), {}),
    # Position interpolation, and Llama 3's bands: with 64 pretrained positions the head's 4 frequencies
    # (wavelengths 6.3 to 6,283) fall in all three (kept, blended, interpolated).
    "rope_linear": (dict(num_heads=4, num_kv_heads=2), dict(rope_scaling=eqx_ring.RopeScaling("linear", 4.0))),
    "rope_llama3": (dict(num_heads=4, num_kv_heads=2), dict(rope_scaling=eqx_ring.RopeScaling(
        "llama3", 8.0, original_max_position_embeddings=64))),
    "block_causal_no_rope": (dict(num_heads=2), dict(causal_block_size=16, rope_theta=None)),
    "packed": (dict(num_heads=4, num_kv_heads=2), dict(packed=True)),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("mesh_size", [None, 4])
def test_ring_attention_module_equals_reference(case, mesh_size):
    kw, spec_kw = ATTENTION_CASES[case]
    spec_kw = dict(spec_kw)
    is_packed = spec_kw.pop("packed", False)
    mesh = None if mesh_size is None else make_mesh(sp=mesh_size, devices=jax.devices()[:mesh_size])
    attn = eqx_ring.RingAttention(D_MODEL, key=jax.random.key(0), **kw)
    spec = AttentionSpec(mesh=mesh, tuning=CHUNK8, **spec_kw)
    x = x_input()
    ids, positions = packed() if is_packed else (None, None)
    call_kw = dict(positions=positions, segment_ids=ids) if is_packed else {}
    assert rel_err(jit_call(attn, x, spec=spec, **call_kw), attention_reference(attn, x, spec=spec, **call_kw)) <= 1e-5


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_layouts_give_the_natural_order_result(layout):
    """x in layout order on a 4-device ring equals the natural-order single-device result, permuted."""
    mesh = make_mesh(sp=4, devices=jax.devices()[:4])
    attn = eqx_ring.RingAttention(D_MODEL, 4, num_kv_heads=2, key=jax.random.key(0))
    single = AttentionSpec(tuning=CHUNK8)
    ring = single.replace(layout=layout, mesh=mesh)
    x = x_input()
    ids, positions = packed()

    def lay(a):
        return jnp.asarray(eqx_ring.to_layout(np.asarray(a), layout, 4, axis=0))

    out = jit_call(attn, lay(x), spec=ring, positions=lay(positions), segment_ids=lay(ids))
    expected = jit_call(attn, x, spec=single, positions=positions, segment_ids=ids)
    assert rel_err(eqx_ring.from_layout(np.asarray(out), layout, 4, axis=0), expected) <= 1e-5
    # Without positions, RoPE uses each slot's true position, not its index in the layout.
    out = jit_call(attn, lay(x), spec=ring)
    assert rel_err(eqx_ring.from_layout(np.asarray(out), layout, 4, axis=0), jit_call(attn, x, spec=single)) <= 1e-5


def test_kv_pieces_from_the_spec_reach_the_ring():
    attn = eqx_ring.RingAttention(D_MODEL, 4, num_kv_heads=2, key=jax.random.key(0))
    mesh = make_mesh(sp=4, devices=jax.devices()[:4])
    tuning = KernelTuning(query_chunk_size=8, key_chunk_size=4, kv_pieces=4)
    spec = AttentionSpec(mesh=mesh, layout="zigzag", tuning=tuning)
    x = x_input()
    ids, positions = packed()
    out = jit_call(attn, eqx_ring.to_layout(x, "zigzag", 4, axis=0), spec=spec,
                   positions=eqx_ring.to_layout(positions, "zigzag", 4, axis=0),
                   segment_ids=eqx_ring.to_layout(ids, "zigzag", 4, axis=0))
    expected = attention_reference(attn, x, spec=spec, positions=positions, segment_ids=ids)
    assert rel_err(eqx_ring.from_layout(out, "zigzag", 4, axis=0), expected) <= 1e-5
    with pytest.raises(ValueError, match="kv_pieces=3 must divide the local kv_seq = 16"):
        jit_call(attn, x, spec=spec.replace(layout="contiguous", tuning=KernelTuning(8, 4, kv_pieces=3)))


def test_ring_attention_gradients_equal_single_device():
    mesh = make_mesh(sp=4, devices=jax.devices()[:4])
    attn = eqx_ring.RingAttention(D_MODEL, 4, num_kv_heads=2, key=jax.random.key(0))
    single = AttentionSpec(layout="zigzag", tuning=CHUNK8)
    ring = single.replace(mesh=mesh)
    slot_position = jnp.asarray(eqx_ring.layout_positions(T, "zigzag", 4))

    def natural_order_ring(m, x):
        return m(x[slot_position], spec=ring)[jnp.argsort(slot_position)]

    x = x_input()
    assert tree_rel_err(grads_of(attn, natural_order_ring, x),
                        grads_of(attn, lambda m, x: m(x, spec=single), x)) <= 1e-5


def test_fused_kernel_module_equals_single_device():
    """implementation="pallas" (interpreted off GPU) through the module's own shard_map: same value and gradients."""
    mesh = make_mesh(sp=4, devices=jax.devices()[:4])
    attn = eqx_ring.RingAttention(D_MODEL, 4, num_kv_heads=2, key=jax.random.key(0))
    ring = AttentionSpec(layout="zigzag", mesh=mesh, tuning=KernelTuning(implementation="pallas"))
    single = AttentionSpec(layout="zigzag", tuning=KernelTuning(implementation="xla"))
    slot_position = jnp.asarray(eqx_ring.layout_positions(T, "zigzag", 4))

    def natural_order_ring(m, x):
        return m(x[slot_position], spec=ring)[jnp.argsort(slot_position)]

    x = x_input()
    assert tree_rel_err(grads_of(attn, natural_order_ring, x),
                        grads_of(attn, lambda m, x: m(x, spec=single), x)) <= 1e-5


def test_inside_a_callers_shard_map():
    """Called on local shards inside the caller's shard_map, the module runs the ring directly."""
    mesh = make_mesh(sp=4, devices=jax.devices()[:4])
    attn = eqx_ring.RingAttention(D_MODEL, 4, num_kv_heads=2, key=jax.random.key(0))
    spec = AttentionSpec(layout="striped", tuning=CHUNK8)
    params, static = eqx.partition(attn, eqx.is_array)
    ids, _ = packed()

    def local(params, x, ids):
        return eqx.combine(params, static)(x, spec=spec, segment_ids=ids)

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("sp"), P("sp")), out_specs=P("sp")))
    lay = lambda a: jnp.asarray(eqx_ring.to_layout(np.asarray(a), "striped", 4, axis=0))  # noqa: E731
    x = x_input()
    out = eqx_ring.from_layout(np.asarray(sharded(params, lay(x), lay(ids))), "striped", 4, axis=0)
    assert rel_err(out, attention_reference(attn, x, segment_ids=ids)) <= 1e-5


def test_bfloat16_module():
    attn = eqx_ring.RingAttention(D_MODEL, 4, num_kv_heads=2, dtype=jnp.bfloat16, key=jax.random.key(0))
    x = x_input().astype(jnp.bfloat16)
    out = jit_call(attn, x, spec=AttentionSpec(tuning=KernelTuning(query_chunk_size=16, key_chunk_size=16)))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, attention_reference(attn, x.astype(jnp.float32))) <= 2e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(d_model=30, num_heads=4), "d_model=30 must be divisible by num_heads=4"),
        (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eqx_ring.RingAttention(**{"d_model": D_MODEL, **kwargs}, key=jax.random.key(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tuning=dict(query_chunk_size=0)), "query_chunk_size must be a positive int, got 0"),
        (dict(tuning=dict(ffn_chunk_size=-2)), "ffn_chunk_size must be a positive int, got -2"),
        (dict(layout="spiral"), "layout must be one of"),
        (dict(tuning=dict(implementation="cuda")), "implementation must be one of"),
        (dict(mesh="sp8", seq_axis="seq"), "seq_axis='seq' is not an axis of the mesh"),
        (dict(head_axis="tp"), "head_axis='tp' splits the heads over a mesh axis, so it needs a mesh"),
        (dict(causal=False, causal_block_size=4), "causal_block_size=4 sets the block of the causal mask"),
        (dict(rope_theta=-1.0), "rope_theta must be a positive finite number or None, got -1.0"),
        (dict(sliding_window=0), "sliding_window must be a positive int or None, got 0"),
        (dict(rope_theta=None, rope_scaling=eqx_ring.RopeScaling("linear", 2.0)),
         "rope_scaling rescales RoPE's frequencies, so it needs a rope_theta; got rope_theta=None"),
        (dict(strategy="spiral"), r"strategy must be one of \('ring', 'allgather', 'ulysses', 'hybrid'\)"),
        (dict(mesh="sp8", strategy="hybrid"), "ulysses_axis='usp' is not an axis of the mesh"),
        (dict(strategy="hybrid", ulysses_axis="sp"), "strategy='hybrid' needs two mesh axes"),
        (dict(tuning=dict(kv_pieces=0)), "kv_pieces must be a positive int, got 0"),
    ],
)
def test_bad_spec_settings_are_named(kwargs, message):
    kwargs = dict(kwargs)
    if "mesh" in kwargs:
        kwargs["mesh"] = make_mesh(sp=8)
    with pytest.raises(ValueError, match=message):
        AttentionSpec(**{**kwargs, "tuning": KernelTuning(**kwargs["tuning"])} if "tuning" in kwargs else kwargs)


@pytest.mark.parametrize(
    ("layer", "spec", "message"),
    [
        (dict(num_heads=4, head_dim=7), AttentionSpec(), "head_dim=7 must be even"),
        (dict(num_heads=4, num_kv_heads=1), "tp2", "num_kv_heads=1 must be divisible by the size 2 of head_axis='tp'"),
    ],
)
def test_a_spec_the_heads_do_not_suit_is_named_at_the_call(layer, spec, message):
    """Settings that depend on the head sizes are checked where a spec meets a layer: at its call."""
    attn = eqx_ring.RingAttention(D_MODEL, key=jax.random.key(0), **layer)
    if spec == "tp2":
        spec = AttentionSpec(mesh=make_mesh(tp=2, sp=4), head_axis="tp")
    with pytest.raises(ValueError, match=message):
        attn(x_input(), spec=spec)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="yarn", factor=2.0), r"RopeScaling.kind must be one of \('linear', 'llama3'\), got 'yarn'"),
        (dict(kind="linear", factor=0.0), "RopeScaling.factor must be a finite float > 0, got 0.0"),
        (dict(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0),
         "RopeScaling.high_freq_factor=4.0 must exceed low_freq_factor=4.0"),
        (dict(kind="llama3", factor=8.0, original_max_position_embeddings=0),
         "RopeScaling.original_max_position_embeddings must be a positive int, got 0"),
    ],
)
def test_bad_rope_scaling_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eqx_ring.RopeScaling(**kwargs)


def test_sequence_axes_and_shards_follow_the_strategy():
    spec = AttentionSpec(mesh=make_mesh(fsdp=1, sp=2, usp=4), strategy="hybrid")
    assert spec.sequence_axes == ("sp", "usp") and spec.ring_size == 8
    assert spec.replace(strategy="ulysses").sequence_axes == "sp" and spec.replace(strategy="ulysses").ring_size == 2
    assert AttentionSpec.from_dict(spec.to_dict()) == spec.replace(mesh=None)  # the strategy is saved


def test_spec_with_rope_scaling_round_trips_through_json():
    spec = AttentionSpec(rope_theta=5e5, rope_scaling=eqx_ring.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    saved = json.loads(json.dumps(spec.to_dict()))
    assert saved["rope_scaling"] == {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert AttentionSpec.from_dict(saved) == spec
    assert AttentionSpec.from_dict(AttentionSpec().to_dict()).rope_scaling is None


def test_spec_must_be_an_attention_spec():
    """Without jaxtyping's hook (which names the parameter first) the layer's own check names it."""
    attn = eqx_ring.RingAttention(D_MODEL, 4, key=jax.random.key(0))
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'spec'"):
        attn(x_input(), spec={"causal": True})
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with pytest.raises(TypeError, match="spec must be an eqx_ring.AttentionSpec, got dict"):
            attn(x_input(), spec={"causal": True})
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def test_sequence_not_divisible_by_the_ring_is_named():
    attn = eqx_ring.RingAttention(D_MODEL, 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"x seq \(split over 'sp'\)=40 must be divisible by 16"):
        attn(x_input(seq=40), spec=AttentionSpec(layout="zigzag", mesh=make_mesh(sp=8)))


def test_wrong_d_model_shape_error():
    """The message a user sees for a wrong input width (the jaxtyping hook is on in the tests)."""
    attn = eqx_ring.RingAttention(D_MODEL, 4, key=jax.random.key(0))
    with pytest.raises(jaxtyping.TypeCheckError) as info:
        attn(jnp.ones((T, 16)))
    message = str(info.value)
    assert "RingAttention.__call__" in message
    assert "parameter 'x'" in message
    assert "Actual value: f32[64,16]" in message
    assert "seq {self.d_model}" in message
    assert "seq=64" in message
    # The chained beartype error underneath says which dimension is wrong and what it is bound to.
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("the dimension size 16 does not equal the existing value of {self.d_model}=32" in m for m in chain)


# ---- BlockwiseFFN, RMSNorm ------------------------------------------------------------------------


def plain_ffn(ffn: eqx_ring.BlockwiseFFN, x):
    up = x @ ffn.up_proj.weight.T
    if ffn.activation == "swiglu":
        gate = x @ ffn.gate_proj.weight.T
        return (gate * jax.nn.sigmoid(gate) * up) @ ffn.down_proj.weight.T
    return (0.5 * up * (1 + jax.scipy.special.erf(up / np.sqrt(2)))) @ ffn.down_proj.weight.T


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("chunk_size", [8, 64, 4096])
def test_blockwise_ffn_equals_plain_ffn(activation, chunk_size):
    ffn = eqx_ring.BlockwiseFFN(D_MODEL, 96, activation=activation, key=jax.random.key(0))
    x = x_input()
    assert rel_err(jit_call(ffn, x, chunk_size=chunk_size), plain_ffn(ffn, x)) <= 1e-5
    assert tree_rel_err(grads_of(ffn, lambda m, x: m(x, chunk_size=chunk_size), x), grads_of(ffn, plain_ffn, x)) <= 1e-5
    dx = eqx.filter_jit(jax.grad(lambda x: jnp.sum(ffn(x, chunk_size=chunk_size) ** 2)))(x)
    assert rel_err(dx, jax.grad(lambda x: jnp.sum(plain_ffn(ffn, x) ** 2))(x)) <= 1e-5


def test_blockwise_ffn_chunk_must_divide():
    ffn = eqx_ring.BlockwiseFFN(D_MODEL, 64, key=jax.random.key(0))
    with pytest.raises(ValueError, match="chunk_size=24 must divide the sequence length 64"):
        ffn(x_input(), chunk_size=24)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        ffn(x_input(), chunk_size=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        eqx_ring.BlockwiseFFN(D_MODEL, 64, activation="relu", key=jax.random.key(0))


def test_rms_norm():
    norm = eqx.tree_at(lambda n: n.weight, eqx_ring.RMSNorm(D_MODEL), jnp.linspace(0.5, 2.0, D_MODEL))
    x = x_input().astype(jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2.0, D_MODEL)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, expected) <= 1e-2


# ---- chunked cross-entropy, RingTransformer -------------------------------------------------------


@pytest.mark.parametrize("vocab_chunk_size", [7, 16, 100])
def test_chunked_cross_entropy_equals_optax(vocab_chunk_size):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (2, 24, 16))
    weight = jax.random.normal(keys[1], (50, 16))
    labels = jax.random.randint(keys[2], (2, 24), 0, 50)
    mask = jax.random.bernoulli(keys[3], 0.7, (2, 24))

    def ours(hidden, weight):
        return eqx_ring.chunked_cross_entropy(hidden, weight, labels, mask, vocab_chunk_size=vocab_chunk_size)

    def reference(hidden, weight):
        losses = optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T, labels)
        weights = mask.astype(jnp.float32)
        return jnp.sum(losses * weights) / jnp.sum(weights)

    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(hidden, weight)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(hidden, weight)
    assert rel_err(value, ref_value) <= 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 1e-5


def test_chunked_cross_entropy_never_builds_the_logits():
    """4096 tokens x 32768 vocab: the logits alone are 512 MiB; the chunked loss and its gradient need a fraction."""
    hidden = jax.ShapeDtypeStruct((4096, 64), jnp.float32)
    weight = jax.ShapeDtypeStruct((32768, 64), jnp.float32)
    labels = jax.ShapeDtypeStruct((4096,), jnp.int32)

    def chunked(h, w, y):
        return eqx_ring.chunked_cross_entropy(h, w, y, vocab_chunk_size=1024)

    def dense(h, w, y):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean()

    def temp(f):
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(hidden, weight, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 4096 * 32768 * 4
    assert temp(dense) >= logits_bytes
    assert temp(chunked) <= logits_bytes // 4


def transformer(**kw):
    base = dict(num_kv_heads=2, hidden_size=64, key=jax.random.key(0),
                spec=AttentionSpec(tuning=KernelTuning(query_chunk_size=16, key_chunk_size=16, ffn_chunk_size=16)))
    return eqx_ring.RingTransformer(48, D_MODEL, 3, 4, **{**base, **kw})


def lm_loss(model, tokens):
    hidden = jax.vmap(model)(tokens[:, :-1])
    return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, tokens[:, 1:], vocab_chunk_size=20)


def test_transformer_scan_remat_and_unrolled_agree():
    tokens = jax.random.randint(jax.random.key(3), (2, T + 1), 0, 48)
    scanned = transformer()
    unrolled = transformer(scan_layers=False, remat_policy=None)
    # Same key, same weights: the unrolled blocks are the scanned stack's slices.
    first = jax.tree.map(lambda a: a[0], eqx.filter(scanned.blocks, eqx.is_array))
    assert tree_rel_err(eqx.filter(unrolled.blocks[0], eqx.is_array), first) == 0
    results = [eqx.filter_jit(eqx.filter_value_and_grad(lm_loss))(m, tokens) for m in (scanned, unrolled)]
    (loss_s, grads_s), (loss_u, grads_u) = results
    assert rel_err(loss_s, loss_u) <= 1e-6
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[eqx.filter(b, eqx.is_array) for b in grads_u.blocks])
    assert tree_rel_err(eqx.filter(grads_s.blocks, eqx.is_array), stacked) <= 1e-5
    assert tree_rel_err(grads_s.embedding, grads_u.embedding) <= 1e-5


def test_transformer_with_sinks_and_attention_dropout():
    tokens = jax.random.randint(jax.random.key(3), (2, T + 1), 0, 48)
    spec = AttentionSpec(dropout=0.2, tuning=KernelTuning(query_chunk_size=16, key_chunk_size=16, ffn_chunk_size=16))
    scanned, unrolled = (transformer(use_sinks=True, spec=spec, **kw)
                         for kw in ({}, dict(scan_layers=False, remat_policy=None)))
    assert scanned.blocks.attention.sinks.shape == (3, 4) and unrolled.blocks[2].attention.sinks.shape == (4,)
    keys = jax.random.split(jax.random.key(9), 2)

    def loss(model, tokens, keys, **call):
        hidden = jax.vmap(lambda t, k: model(t, key=k, **call))(tokens[:, :-1], keys)
        return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, tokens[:, 1:], vocab_chunk_size=20)

    # One key per example, split over the layers the same way whether they are scanned or unrolled.
    (loss_s, grads_s), (loss_u, grads_u) = (eqx.filter_jit(eqx.filter_value_and_grad(loss))(m, tokens, keys)
                                            for m in (scanned, unrolled))
    assert rel_err(loss_s, loss_u) <= 1e-6
    assert tree_rel_err(grads_s.embedding, grads_u.embedding) <= 1e-5
    assert float(jnp.abs(grads_s.blocks.attention.sinks).min()) > 0
    # The same key on a (sp=4, zigzag) mesh drops the same probabilities: the same hidden states.
    on_ring = scanned.spec.replace(mesh=make_mesh(sp=4, devices=jax.devices()[:4]), layout="zigzag")
    laid = eqx_ring.to_layout(tokens[0, :-1], "zigzag", 4, axis=0)
    on_mesh = eqx.filter_jit(lambda m, t, k: m(t, key=k))(scanned.with_spec(on_ring), laid, keys[0])
    one = eqx.filter_jit(lambda m, t, k: m(t, key=k))(scanned, tokens[0, :-1], keys[0])
    assert rel_err(eqx_ring.from_layout(on_mesh, "zigzag", 4, axis=0), one) <= 1e-5
    # Inference is the model without dropout, exactly; training without a key is refused.
    plain = scanned.with_spec(spec.replace(dropout=0.0))
    assert eqx.filter_jit(loss)(scanned, tokens, keys, inference=True) == eqx.filter_jit(loss)(plain, tokens, keys)
    # (At initialisation the loss hardly moves; the hidden states do.)
    assert rel_err(one, eqx.filter_jit(lambda m, t, k: m(t, key=k))(plain, tokens[0, :-1], keys[0])) > 0.05
    with pytest.raises(ValueError, match=r"AttentionSpec\(dropout=0.2\) needs key="):
        scanned(tokens[0, :-1])


def test_offloaded_residuals_give_the_same_loss_and_gradients_on_a_mesh():
    tokens = jax.random.randint(jax.random.key(3), (2, T + 1), 0, 48)
    mesh = make_mesh(dp=2, sp=4)
    spec = AttentionSpec(mesh=mesh, layout="zigzag", tuning=KernelTuning(16, 16, 16))
    tokens_in = jnp.concatenate([eqx_ring.to_layout(tokens[:, :-1], "zigzag", 4, axis=1), tokens[:, -1:]], axis=1)
    kept, offloaded = transformer(spec=spec), transformer(spec=spec, offload_residuals=True)

    def loss(model, tokens):
        hidden = jax.vmap(model, spmd_axis_name=("dp", "fsdp"))(tokens[:, :-1])
        return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, jnp.roll(tokens[:, :-1], -1, axis=1))

    (loss_k, grads_k), (loss_o, grads_o) = (eqx.filter_jit(eqx.filter_value_and_grad(loss))(m, tokens_in)
                                            for m in (kept, offloaded))
    assert loss_k == loss_o and tree_rel_err(grads_o, grads_k) == 0
    # The policy moves each block's input to pinned host memory and back (on this CPU backend the same memory).
    jaxpr = str(jax.make_jaxpr(eqx.filter_grad(loss))(offloaded, tokens_in))
    assert "offload_only_these_names" in jaxpr and "device_put" in jaxpr
    assert "device_put" not in str(jax.make_jaxpr(eqx.filter_grad(loss))(kept, tokens_in))


def test_offloading_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="offload_residuals=True offloads each block's input, the one residual of "
                                         "remat_policy='nothing_saveable'; got remat_policy='dots_saveable'"):
        transformer(offload_residuals=True, remat_policy="dots_saveable")
    model = transformer(offload_residuals=True)

    class NoHostMemory:
        def addressable_memories(self):
            return [type("Memory", (), {"kind": "device"})()]

    monkeypatch.setattr(jax, "devices", lambda *a: [NoHostMemory()])
    with pytest.raises(ValueError, match=r"offload_residuals=True moves residuals to the 'pinned_host' memory, which "
                                         r"the cpu backend lacks \(its memories: \['device'\]\)"):
        jax.make_jaxpr(model)(jnp.arange(T))


def test_transformer_logits_and_tied_head():
    model = transformer(tie_embeddings=True)
    assert model.lm_head is None and model.head_weight is model.embedding.weight
    tokens = jax.random.randint(jax.random.key(3), (T,), 0, 48)
    hidden = jit_call(model, tokens)
    logits = model.logits(hidden)
    assert logits.shape == (T, 48)
    labels = jnp.roll(tokens, -1)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert rel_err(eqx_ring.chunked_cross_entropy(hidden, model.head_weight, labels), expected) <= 1e-6


def test_transformer_rejects_unknown_remat_policy():
    with pytest.raises(ValueError, match="remat_policy must be None or one of"):
        transformer(remat_policy="save_everything")


def test_transformer_hands_its_spec_to_every_block():
    """The blocks hold no settings: the model's spec reaches every block, and with_spec keeps the very arrays."""
    tokens = jax.random.randint(jax.random.key(3), (T,), 0, 48)
    model = transformer(scan_layers=False, remat_policy=None)
    windowed = model.with_spec(model.spec.replace(sliding_window=8))
    assert windowed.blocks is model.blocks and windowed.embedding is model.embedding

    def by_hand(spec):
        x = model.embedding.weight[tokens]
        for block in model.blocks:
            x = block(x, spec=spec)
        return model.norm(x)

    assert rel_err(jit_call(windowed, tokens), eqx.filter_jit(by_hand)(windowed.spec)) <= 1e-6
    assert rel_err(jit_call(windowed, tokens), jit_call(model, tokens)) > 1e-3
    # A window as long as the sequence hides nothing: the causal result.
    wide = model.with_spec(model.spec.replace(sliding_window=T))
    assert rel_err(jit_call(wide, tokens), jit_call(model, tokens)) <= 1e-6


def test_transformer_rejects_a_spec_its_heads_do_not_suit():
    with pytest.raises(ValueError, match="num_kv_heads=2 must be divisible by the size 4 of head_axis='tp'"):
        transformer(spec=AttentionSpec(mesh=make_mesh(tp=4, sp=2), head_axis="tp"))
    model = transformer()
    jaxtyping.config.update("jaxtyping_disable", True)  # the hook would name the parameter first
    try:
        with pytest.raises(TypeError, match="spec must be an eqx_ring.AttentionSpec, got str"):
            transformer(spec="causal")
        with pytest.raises(TypeError, match="tuning must be an eqx_ring.KernelTuning or None, got dict"):
            model(jnp.zeros(T, jnp.int32), tuning={"query_chunk_size": 8})
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
