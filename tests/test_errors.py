"""Bad input gets an error that names the argument and the expected and actual values."""

import re
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import eqx_ring

q = jnp.ones((1, 64, 4, 8))
kv = jnp.ones((1, 64, 2, 8))


def ring_on(n, **kw):
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    return jax.shard_map(lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name="sp", **kw), mesh=mesh,
                         in_specs=P(None, "sp"), out_specs=P(None, "sp"))


# pyproject's addopts install jaxtyping's import hook for eqx_ring; `jaxtyping_disable` is read at
# call time, so switching it off shows what a user without the hook sees: the library's own check.
@pytest.fixture(params=["hook", "no_hook"])
def hook(request):
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", request.param == "no_hook")
    yield request.param == "hook"
    jaxtyping.config.update("jaxtyping_disable", before)


def named(hook, name, error, message):
    """The error for a mistake in argument `name` that its annotation also catches: with the hook on,
    the hook's `TypeCheckError` naming it; without, the library's own `error` matching `message`."""
    if hook:
        return pytest.raises(jaxtyping.TypeCheckError, match=f"parameter '{name}'")
    return pytest.raises(error, match=message)


def test_heads_not_divisible():
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of kv heads \(3\)"):
        eqx_ring.blockwise_attention(q, jnp.ones((1, 64, 3, 8)), jnp.ones((1, 64, 3, 8)))


def test_mismatched_dtypes():
    with pytest.raises(TypeError, match="q, k and v must share one dtype, got q=float32, k=bfloat16"):
        eqx_ring.blockwise_attention(q, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16))


def test_chunk_does_not_divide():
    with pytest.raises(ValueError, match="query_chunk_size=24 must divide q_seq=64"):
        eqx_ring.blockwise_attention(q, kv, kv, query_chunk_size=24)


def test_ring_chunk_does_not_divide_local_shard():
    with pytest.raises(ValueError, match=r"key_chunk_size=3 must divide kv_seq \(the local shard of 4 devices"):
        ring_on(4, key_chunk_size=3)(q, kv, kv)


def test_sequence_not_divisible_for_zigzag():
    # 8 devices × 2 zigzag chunks need a multiple of 16 tokens; 8 per device makes 64 = 16·4, so use 40.
    x, y = jnp.ones((1, 40, 4, 8)), jnp.ones((1, 40, 2, 8))
    with pytest.raises(ValueError, match=r"must be divisible by 16 \(2 × 8 shards\) for layout='zigzag'"):
        ring_on(8, layout="zigzag")(x, y, y)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of .* got 'spiral'"):
        ring_on(2, layout="spiral")(q, kv, kv)


def test_axis_not_bound():
    with pytest.raises(ValueError, match="axis_name='sp' is not a bound mesh axis: call ring_attention inside"):
        eqx_ring.ring_attention(q, kv, kv, axis_name="sp")


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match="causal_block_size must be a positive int, got 0"):
        eqx_ring.blockwise_attention(q, kv, kv, causal=True, causal_block_size=0)
    with pytest.raises(ValueError, match="sliding_window must be a positive int or None, got -2"):
        eqx_ring.blockwise_attention(q, kv, kv, sliding_window=-2)
    # With jaxtyping's hook on, the Int[...] contract answers first; both errors name the argument.
    with pytest.raises(TypeError, match="segment_ids"):
        eqx_ring.blockwise_attention(q, kv, kv, segment_ids=jnp.zeros((1, 64), jnp.float32))
    with pytest.raises(ValueError, match="kv_segment_ids needs segment_ids"):
        eqx_ring.blockwise_attention(q, kv, kv, kv_segment_ids=jnp.zeros((1, 64), jnp.int32))


# ---- Hyperparameters: a bad size is named when the layer is built, a bad setting when its spec is ----

KEY = jax.random.key(0)
X16 = jnp.ones((16, 16))


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: eqx_ring.RingAttention(32, 0, key=KEY), ValueError, "num_heads must be a positive int, got 0"),
        (lambda: eqx_ring.RingAttention(-32, 4, key=KEY), ValueError, "d_model must be a positive int, got -32"),
        (lambda: eqx_ring.RingAttention(0, 4, key=KEY), ValueError, "d_model must be a positive int, got 0"),
        (lambda: eqx_ring.RingAttention(32, 4, num_kv_heads=0, key=KEY), ValueError,
         "num_kv_heads must be a positive int or None, got 0"),
        (lambda: eqx_ring.RingAttention(32, 4, num_kv_heads=-2, key=KEY), ValueError,
         "num_kv_heads must be a positive int or None, got -2"),
        (lambda: eqx_ring.RingAttention(32, 4, head_dim=0, key=KEY), ValueError,
         "head_dim must be a positive int or None, got 0"),
        (lambda: eqx_ring.RingAttention(32, 4, head_dim=-2, key=KEY), ValueError,
         "head_dim must be a positive int or None, got -2"),
        (lambda: eqx_ring.AttentionSpec(rope_theta=0.0), ValueError,
         "rope_theta must be a positive finite number or None, got 0.0"),
        (lambda: eqx_ring.AttentionSpec(rope_theta=-1e4), ValueError,
         "rope_theta must be a positive finite number or None, got -10000.0"),
        (lambda: eqx_ring.AttentionSpec(head_axis="tp"), ValueError,
         "head_axis='tp' splits the heads over a mesh axis, so it needs a mesh; got mesh=None"),
        (lambda: eqx_ring.AttentionSpec(causal=False, causal_block_size=4), ValueError,
         "causal_block_size=4 sets the block of the causal mask, so it needs causal=True; got causal=False"),
        (lambda: eqx_ring.BlockwiseFFN(0, 64, key=KEY), ValueError, "d_model must be a positive int, got 0"),
        (lambda: eqx_ring.BlockwiseFFN(-16, 64, key=KEY), ValueError, "d_model must be a positive int, got -16"),
        (lambda: eqx_ring.BlockwiseFFN(16, 0, key=KEY), ValueError, "hidden_size must be a positive int, got 0"),
        (lambda: eqx_ring.BlockwiseFFN(16, -1, key=KEY), ValueError, "hidden_size must be a positive int, got -1"),
        (lambda: eqx_ring.BlockwiseFFN(16, 64, key=KEY)(X16, chunk_size=-8), ValueError,
         "chunk_size must be a positive int, got -8"),
        (lambda: eqx_ring.KernelTuning(ffn_chunk_size=-8), ValueError, "ffn_chunk_size must be a positive int, got -8"),
        (lambda: eqx_ring.KernelTuning(query_chunk_size=0), ValueError,
         "query_chunk_size must be a positive int, got 0"),
        (lambda: eqx_ring.KernelTuning(implementation="triton"), ValueError,
         r"implementation must be one of \('xla', 'pallas'\) or None, got 'triton'"),
        (lambda: eqx_ring.BlockwiseFFN(16, 64, activation="relu", key=KEY), ValueError,
         r"activation must be one of \('swiglu', 'gelu'\), got 'relu'"),
        (lambda: eqx_ring.RMSNorm(0), ValueError, "dim must be a positive int, got 0"),
        (lambda: eqx_ring.RMSNorm(-4), ValueError, "dim must be a positive int, got -4"),
        (lambda: eqx_ring.RMSNorm(4, eps=-1e-6), ValueError, r"eps must be a finite number >= 0, got -1e-06"),
    ],
)
def test_bad_layer_settings_are_named(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_attention_spec_causal_must_be_a_bool(hook):
    with named(hook, "causal", TypeError, "causal must be a bool, got 'yes'"):
        eqx_ring.AttentionSpec(causal="yes")


# ---- Kernel arguments -----------------------------------------------------------------------------

q3, kv3 = jnp.ones((64, 4, 8)), jnp.ones((64, 2, 8))
KERNELS = {
    "dense": eqx_ring.dot_product_attention,
    "blockwise": eqx_ring.blockwise_attention,
    "ring": lambda q, k, v, **kw: ring_on(4, **kw)(q, k, v),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_two_dimensional_q_is_named(kernel, hook):
    q2 = jnp.ones((64, 32))  # [seq, d_model]: the heads were never split off
    local = (16, 32) if kernel == "ring" else (64, 32)  # the ring checks each device's shard
    message = r"q must have shape \[\*batch, seq, heads, head_dim\], got shape " + re.escape(str(local))
    with named(hook, "q", ValueError, message):
        if kernel == "ring":
            jax.shard_map(lambda q: eqx_ring.ring_attention(q, q, q, axis_name="sp"), mesh=ring_mesh(4),
                          in_specs=P("sp"), out_specs=P("sp"))(q2)
        else:
            KERNELS[kernel](q2, q2, q2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_block_size_without_causal_is_named(kernel):
    with pytest.raises(ValueError, match="causal_block_size=4 sets the block of the causal mask, so it needs "
                                         "causal=True; got causal=False"):
        KERNELS[kernel](q, kv, kv, causal_block_size=4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_axes_are_named(kernel):
    with pytest.raises(ValueError, match=r"kv_heads must be at least 1, got kv_heads=0"):
        KERNELS[kernel](q, jnp.ones((1, 64, 0, 8)), jnp.ones((1, 64, 0, 8)))
    if kernel != "ring":  # an empty sequence cannot be split over the ring's shard_map
        empty = jnp.ones((1, 0, 4, 8))
        with pytest.raises(ValueError, match=r"q_seq must be at least 1, got q_seq=0"):
            KERNELS[kernel](empty, empty, empty)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_scale_and_causal_are_named(kernel, hook):
    with pytest.raises(ValueError, match="scale must be finite, got nan"):
        KERNELS[kernel](q, kv, kv, scale=float("nan"))
    with named(hook, "causal", TypeError, r"causal must be a bool \(a static Python value\), got JitTracer"):
        jax.jit(lambda c: KERNELS[kernel](q, kv, kv, causal=c))(True)


def test_traced_scale_is_named_where_it_must_be_static(hook):
    with named(hook, "scale", TypeError, r"scale must be a Python float or None \(it is static here\), got a traced"):
        jax.jit(lambda s: eqx_ring.blockwise_attention(q, kv, kv, scale=s))(0.5)
    if not hook:  # the dense reference is an ordinary function of scale: a traced one still works there
        out = jax.jit(lambda s: eqx_ring.dot_product_attention(q, kv, kv, scale=s))(0.5)
        assert jnp.array_equal(out, eqx_ring.dot_product_attention(q, kv, kv, scale=0.5))


def test_ring_unknown_implementation_and_key_bias_are_named(hook):
    with pytest.raises(ValueError, match=r"implementation must be one of \('xla', 'pallas'\) or None, got 'triton'"):
        ring_on(4, implementation="triton")(q, kv, kv)
    message = r"key_bias must broadcast to \(1, 16\) \(\[\*batch, kv_seq\]\), got \(5,\)"
    with named(hook, "key_bias", ValueError, message):
        ring_on(4, key_bias=jnp.zeros(5))(q, kv, kv)


def ring_mesh(n):
    return jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


# ---- Layouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [eqx_ring.to_layout, eqx_ring.from_layout])
@pytest.mark.parametrize("array", [np.ones((4, 8)), jnp.ones((4, 8))])
@pytest.mark.parametrize("axis", [2, -3])
def test_layout_axis_out_of_range_is_named(fn, array, axis):
    with pytest.raises(ValueError, match=rf"axis must be an int in \[-2, 2\) \(an axis of x, whose shape is "
                                         rf"\(4, 8\)\), got {axis}"):
        fn(array, "zigzag", 2, axis=axis)


def test_negative_seq_len_is_named():
    with pytest.raises(ValueError, match="seq_len must be a non-negative int, got -8"):
        eqx_ring.layout_positions(-8, "zigzag", 2)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("position", [8, 9, -1, jnp.array([0, 8]), jnp.array([3, -2])])
def test_layout_slot_of_a_position_past_the_sequence_is_named(layout, position):
    bad = [p for p in np.atleast_1d(position) if not 0 <= p < 8][0]
    with pytest.raises(ValueError, match=rf"position must be in \[0, seq_len=8\), got {bad}"):
        eqx_ring.layout_slot(position, 8, layout, 2)


def test_layout_slot_of_a_float_position_is_named(hook):
    with named(hook, "position", TypeError, "position must be an int or an integer array, got float32"):
        eqx_ring.layout_slot(jnp.arange(8.0), 8, "zigzag", 2)


def test_layout_slot_of_traced_positions_is_unchecked_and_exact_in_range():
    slots = jax.jit(lambda p: eqx_ring.layout_slot(p, 16, "zigzag", 4))(jnp.arange(16))
    assert (eqx_ring.layout_positions(16, "zigzag", 4)[np.asarray(slots)] == np.arange(16)).all()


# ---- make_mesh ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message", "typed"),
    [
        ((), dict(devices=[]), ValueError, "devices must hold at least one jax.Device, got an empty sequence", None),
        ((), dict(devices=[0, 1]), TypeError, r"devices must be jax.Device objects, got \['int', 'int'\]", "devices"),
        ((), dict(devices=[jax.devices()[0]] * 2), ValueError, "devices must be distinct, got 2 entries for 1 devices",
         None),
        ((4, 2.0), {}, TypeError, r"fsdp must be an int \(a size, or -1\), got 2.0", "fsdp"),
        ((True,), {}, TypeError, r"dp must be an int \(a size, or -1\), got True", None),
        (("1,-1,1,1",), dict(sp=2), ValueError, "a mesh string gives all four sizes, so leave fsdp, tp and sp at their "
                                                "defaults; got dp='1,-1,1,1' with fsdp=-1, tp=1, sp=2", None),
        (("1,2,4",), {}, ValueError, r"four comma-separated ints like '1,-1,4,1', optionally after a '!' "
                                     r"\('!1,-1,4,1'\), got '1,2,4'", None),
        (("!!1,-1,4,1",), {}, ValueError, "four comma-separated ints", None),
    ],
)
def test_bad_make_mesh_arguments_are_named(args, kwargs, error, message, typed, hook):
    from eqx_ring.sharding import make_mesh

    with named(hook and typed, typed, error, message):
        make_mesh(*args, **kwargs)


def test_make_mesh_takes_lwm_bang_strings_as_devices_in_their_given_order():
    from eqx_ring.sharding import make_mesh

    mesh = make_mesh("!1,-1,4,1")
    assert dict(mesh.shape) == {"dp": 1, "fsdp": 2, "tp": 4, "sp": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert mesh.devices.flatten().tolist() == jax.devices()
    backwards = jax.devices()[::-1]
    mesh = make_mesh("!2,1,1,-1", devices=backwards)
    assert dict(mesh.shape) == {"dp": 2, "fsdp": 1, "tp": 1, "sp": 4}
    assert mesh.devices.flatten().tolist() == backwards
    assert mesh.devices[1, 0, 0, 0] == backwards[4]  # row-major over (dp, fsdp, tp, sp)


# ---- Shapes at each module call, with and without jaxtyping's hook ---------------------------------


ATTN = eqx_ring.RingAttention(32, 4, num_kv_heads=2, key=KEY)
SPEC = eqx_ring.AttentionSpec(tuning=eqx_ring.KernelTuning(query_chunk_size=8, key_chunk_size=8))
FFN = eqx_ring.BlockwiseFFN(16, 32, key=KEY)
X = jnp.ones((16, 32))
I32 = partial(jnp.asarray, dtype=jnp.int32)


def decode(**changes):
    """`ATTN.decode_step` on a 16-slot cache, with `changes` to its arguments."""
    args = dict(x=X[0], keys=jnp.ones((16, 2, 8)), values=jnp.ones((16, 2, 8)), segment_ids=jnp.zeros(16, jnp.int32),
                index=I32(3), position=I32(3), segment=I32(0), spec=SPEC) | changes
    return ATTN.decode_step(args.pop("x"), args.pop("keys"), args.pop("values"), args.pop("segment_ids"), **args)


SHAPE_MISTAKES = {
    "attn_batched": (lambda: ATTN(jnp.ones((2, 16, 32)), spec=SPEC), "x", ValueError,
                     r"x must have shape \[seq, d_model=32\], got shape \(2, 16, 32\)"),
    "attn_width": (lambda: ATTN(jnp.ones((16, 24)), spec=SPEC), "x", ValueError,
                   r"x must have shape \[seq, d_model=32\], got shape \(16, 24\)"),
    "attn_int_x": (lambda: ATTN(jnp.ones((16, 32), jnp.int32), spec=SPEC), "x", TypeError,
                   "x must have a floating dtype, got int32"),
    "attn_positions_length": (lambda: ATTN(X, spec=SPEC, positions=jnp.arange(8)), "positions", ValueError,
                              r"positions must have shape \[seq=16\], got shape \(8,\)"),
    "attn_float_positions": (lambda: ATTN(X, spec=SPEC, positions=jnp.arange(16.0)), "positions", TypeError,
                             "positions must have an integer dtype, got float32"),
    "attn_segment_ids_length": (lambda: ATTN(X, spec=SPEC, segment_ids=jnp.zeros(8, jnp.int32)), "segment_ids",
                                ValueError,
                                r"segment_ids must have shape \[seq=16\], got shape \(8,\)"),
    "prefill_batched": (lambda: ATTN.prefill(jnp.ones((2, 16, 32)), spec=SPEC), "x", ValueError,
                        r"x must have shape \[seq, d_model=32\], got shape \(2, 16, 32\)"),
    "decode_x_batched": (lambda: decode(x=X[:2]), "x", ValueError,
                         r"x must have shape \[d_model=32\], got shape \(2, 32\)"),
    "decode_keys_heads": (lambda: decode(keys=jnp.ones((16, 4, 8))), "keys", ValueError,
                          r"keys must have shape \[cache, num_kv_heads=2, head_dim=8\], got shape \(16, 4, 8\)"),
    "decode_values_length": (lambda: decode(values=jnp.ones((8, 2, 8))), "values", ValueError,
                             r"values must have shape \[cache=16, num_kv_heads=2, head_dim=8\], got shape \(8, 2, 8\)"),
    "decode_segment_ids_length": (lambda: decode(segment_ids=jnp.zeros(8, jnp.int32)), "segment_ids", ValueError,
                                  r"segment_ids must have shape \[cache=16\], got shape \(8,\)"),
    "decode_index_vector": (lambda: decode(index=jnp.arange(2)), "index", ValueError,
                            r"index must have shape \[\] \(a scalar\), got shape \(2,\)"),
    "decode_float_position": (lambda: decode(position=jnp.float32(3)), "position", TypeError,
                              "position must have an integer dtype, got float32"),
    "ffn_3d": (lambda: FFN(jnp.ones((2, 8, 16)), chunk_size=4), "x", ValueError,
               r"x must have shape \[seq, d_model=16\], got shape \(2, 8, 16\)"),
    "ffn_width": (lambda: FFN(jnp.ones((8, 12)), chunk_size=4), "x", ValueError,
                  r"x must have shape \[seq, d_model=16\], got shape \(8, 12\)"),
    "ffn_dense_width": (lambda: FFN.dense(jnp.ones((8, 12))), "x", ValueError,
                        r"x must have shape \[tokens, d_model=16\], got shape \(8, 12\)"),
    "rmsnorm_width": (lambda: eqx_ring.RMSNorm(4)(jnp.ones((3, 5))), "x", ValueError,
                      r"x must have shape \[\*batch, dim=4\], got shape \(3, 5\)"),
}


@pytest.mark.parametrize("case", SHAPE_MISTAKES)
def test_shape_mistakes_name_the_argument(case, hook):
    call, name, error, message = SHAPE_MISTAKES[case]
    if hook:  # the annotation's check answers first, naming the same argument
        with pytest.raises(jaxtyping.TypeCheckError, match=f"parameter '{name}'"):
            call()
    else:
        with pytest.raises(error, match=message):
            call()


def test_ring_module_shape_mistakes_name_the_argument(hook):
    from eqx_ring.sharding import make_mesh

    ring = eqx_ring.AttentionSpec(mesh=make_mesh(sp=4, devices=jax.devices()[:4]))
    error, message = ((jaxtyping.TypeCheckError, "parameter 'positions'") if hook else
                      (ValueError, r"positions must have shape \[seq=64\], got shape \(32,\)"))
    with pytest.raises(error, match=message):
        eqx_ring.RingAttention(32, 4, key=KEY)(jnp.ones((64, 32)), spec=ring, positions=jnp.arange(32))


# ---- RingAttention.decode_step against its cache's size ---------------------------------------------


@pytest.mark.parametrize("index", [16, 17, -1])
def test_decode_step_index_outside_the_cache_is_named(index):
    with pytest.raises(ValueError, match=rf"index must be in \[0, 16\): the KV cache has 16 slots \(keys.shape\[0\]\), "
                                         rf"got index={index}"):
        decode(index=I32(index), position=I32(index))


def test_decode_step_traced_index_outside_the_cache_raises_at_run_time():
    step = eqx.filter_jit(lambda index: decode(index=index, position=index)[0])
    assert step(I32(15)).shape == (32,)  # the last slot is fine
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"index must be in \[0, 16\): the KV cache has 16 slots"):
        step(I32(16)).block_until_ready()
    batched = eqx.filter_jit(jax.vmap(lambda index: decode(index=index, position=index)[0]))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"index must be in \[0, 16\)"):
        batched(I32([3, 16])).block_until_ready()
