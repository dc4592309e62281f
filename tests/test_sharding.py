"""Meshes, parameter shardings, and one jitted train step that gives the single-device result on any mesh."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err
from jax.sharding import AxisType, PartitionSpec as P

import eqx_ring
from eqx_ring.sharding import BATCH_AXES, batch_sharding, make_mesh, param_shardings, shard_params

# ---- make_mesh ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "shape"),
    [
        ((), (1, 8, 1, 1)),
        ((1, -1, 2, 2), (1, 2, 2, 2)),
        (("2,1,1,-1",), (2, 1, 1, 4)),
        (("1,-1,4,1",), (1, 2, 4, 1)),
    ],
)
def test_make_mesh(args, shape):
    mesh = make_mesh(*args)
    assert mesh.axis_names == ("dp", "fsdp", "tp", "sp")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 4


def test_make_mesh_with_the_hybrids_axis():
    mesh = make_mesh(dp=2, fsdp=1, sp=-1, usp=2)
    assert mesh.axis_names == ("dp", "fsdp", "tp", "sp", "usp") and tuple(mesh.shape.values()) == (2, 1, 1, 2, 2)
    assert batch_sharding(mesh).spec == P(BATCH_AXES, ("sp", "usp"))
    assert batch_sharding(make_mesh(sp=8)).spec == P(BATCH_AXES, "sp")
    with pytest.raises(ValueError, match="usp must be a positive int or None, got 0"):
        make_mesh(sp=2, usp=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((3, -1), "8 devices cannot be split"),
        ((2, 2, 1, 1), r"needs 4 devices, but 8 are given"),
        ((-1, -1), "at most one -1"),
        (("1,2,x,4",), "four comma-separated ints"),
    ],
)
def test_make_mesh_errors(args, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(*args)


# ---- parameter shardings --------------------------------------------------------------------------

VOCAB, D_MODEL, T, BATCH = 64, 32, 128, 4


def build(mesh=None, layout="contiguous", head_axis=None, strategy="ring", **kw):
    """The 2-layer model of the train-step tests; the same key gives the same weights on every mesh."""
    tuning = eqx_ring.KernelTuning(query_chunk_size=16, key_chunk_size=16, ffn_chunk_size=32)
    spec = eqx_ring.AttentionSpec(layout=layout, mesh=mesh, head_axis=head_axis, tuning=tuning, strategy=strategy)
    return eqx_ring.RingTransformer(VOCAB, D_MODEL, 2, 4, spec=spec, num_kv_heads=2, hidden_size=64,
                                    key=jax.random.key(0), **kw)


def test_param_sharding_rules():
    mesh = make_mesh(fsdp=2, tp=2, sp=2)
    specs = jax.tree.map(lambda s: s.spec, param_shardings(build(mesh, head_axis="tp"), mesh))
    attention, ffn = specs.blocks.attention, specs.blocks.ffn
    # Stacked layers keep their leading layer axis whole.
    assert attention.query_proj.weight == P(None, "tp", "fsdp")
    assert attention.key_proj.weight == P(None, "tp", "fsdp")
    assert attention.output_proj.weight == P(None, "fsdp", "tp")
    assert ffn.gate_proj.weight == ffn.up_proj.weight == P(None, "tp", "fsdp")
    assert ffn.down_proj.weight == P(None, "fsdp", "tp")
    assert specs.embedding.weight == specs.lm_head.weight == P(None, "fsdp")
    assert specs.blocks.attention_norm.weight == P(None, None)
    assert specs.norm.weight == P(None)
    # An axis that does not divide a dimension leaves it whole (vocab 63 is odd; d_model 30 is not split 4 ways).
    odd = eqx_ring.RingTransformer(63, 30, 1, 3, key=jax.random.key(0), scan_layers=False)
    mesh4 = make_mesh(fsdp=4, tp=2, sp=1)
    odd_specs = jax.tree.map(lambda s: s.spec, param_shardings(odd, mesh4))
    assert odd_specs.embedding.weight == P(None, None)
    assert odd_specs.blocks[0].attention.query_proj.weight == P("tp", None)


# ---- the train step -------------------------------------------------------------------------------

OPTIMIZER = optax.adamw(1e-2)


def make_train_step(mesh):
    """The recipe of eqx_ring.sharding's docstring, returning the gradients too."""

    @eqx.filter_jit
    def train_step(model, opt_state, tokens, labels, mask, positions, segment_ids):
        batch = (tokens, labels, mask, positions, segment_ids)
        if mesh is not None:
            batch = eqx.filter_shard(batch, batch_sharding(mesh))
        tokens, labels, mask, positions, segment_ids = batch

        def loss_fn(model):
            def one(t, p, s):
                return model(t, positions=p, segment_ids=s)

            hidden = jax.vmap(one, **({} if mesh is None else dict(spmd_axis_name=BATCH_AXES)))(
                tokens, positions, segment_ids)
            return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, labels, mask, vocab_chunk_size=24)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int32
            updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        if mesh is not None:
            model = shard_params(model, mesh)
        return model, opt_state, loss, grads

    return train_step


def packed_batch():
    """Natural-order packed documents: tokens, next-token labels, loss mask, per-document positions, ids."""
    rng = np.random.default_rng(0)
    lengths = [[50, 40, 38], [128], [10, 100, 18], [64, 64]]
    ids = np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in ls]) for ls in lengths]).astype(np.int32)
    tokens = rng.integers(0, VOCAB, (BATCH, T + 1)).astype(np.int32)
    # No loss across a document boundary.
    mask = np.concatenate([ids[:, 1:] == ids[:, :-1], np.zeros((BATCH, 1), bool)], axis=1)
    return tokens[:, :-1], tokens[:, 1:], mask, positions, ids


@pytest.fixture(scope="module")
def single_device_step():
    model = build()
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    return make_train_step(None)(model, opt_state, *packed_batch())


MESHES = {"1": (1, 1, 1, 1), "sp8": (1, 1, 1, 8), "dp2_sp4": (2, 1, 1, 4), "fsdp2_tp2_sp2": (1, 2, 2, 2)}


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_step_equals_single_device(mesh_name, layout, single_device_step):
    check_train_step(MESHES[mesh_name], layout, "ring", single_device_step)


# (dp, fsdp, tp, sp[, usp]) per strategy; the model has 4 query and 2 kv heads.
STRATEGY_MESHES = [
    ("allgather", (1, 1, 1, 8), "zigzag"), ("allgather", (1, 2, 2, 2), "contiguous"),
    ("ulysses", (2, 1, 1, 4), "zigzag"), ("ulysses", (1, 2, 2, 2), "striped"),  # 2 local q heads over sp=2
    ("hybrid", (2, 1, 1, 2, 2), "zigzag"), ("hybrid", (1, 1, 1, 2, 4), "contiguous"),
]


@pytest.mark.parametrize(("strategy", "sizes", "layout"), STRATEGY_MESHES)
def test_train_step_with_each_strategy_equals_single_device(strategy, sizes, layout, single_device_step):
    check_train_step(sizes, layout, strategy, single_device_step)


def check_train_step(sizes, layout, strategy, single_device_step):
    dp, fsdp, tp, sp, usp = (*sizes, None) if len(sizes) == 4 else sizes
    mesh = make_mesh(dp, fsdp, tp, sp, usp=usp, devices=jax.devices()[: dp * fsdp * tp * sp * (usp or 1)])
    model = shard_params(build(mesh, layout, head_axis="tp" if tp > 1 else None, strategy=strategy), mesh)
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    # The pipeline puts every per-token array in the ring's layout once.
    batch = [eqx_ring.to_layout(a, layout, model.spec.ring_size, axis=1) for a in packed_batch()]
    new_model, _, loss, grads = make_train_step(mesh)(model, opt_state, *batch)
    _, _, ref_loss, ref_grads = single_device_step
    assert rel_err(loss, ref_loss) <= 1e-5
    leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves)
    for g, r in zip(leaves, ref_leaves, strict=True):
        assert rel_err(g, r) <= 1e-5
    # The updated parameters stay sharded by the rules.
    w = new_model.blocks.attention.query_proj.weight
    expected = P(None, "tp" if tp > 1 else None, "fsdp" if fsdp > 1 else None)
    assert w.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, expected), w.ndim)


def test_vmap_with_spmd_axis_name_keeps_examples_on_their_shard():
    """Compiled HLO: with spmd_axis_name each data shard attends over its own examples, no batch all-gather."""
    mesh = make_mesh(2, 1, 1, 4)
    attn = shard_params(eqx_ring.RingAttention(D_MODEL, 4, key=jax.random.key(0)), mesh)
    spec = eqx_ring.AttentionSpec(mesh=mesh, tuning=eqx_ring.KernelTuning(query_chunk_size=8, key_chunk_size=8))
    params, static = eqx.partition(attn, eqx.is_array)
    x = jax.device_put(jnp.ones((4, 64, D_MODEL)), batch_sharding(mesh))

    def compiled_hlo(**vmap_kw):
        f = jax.jit(lambda p, x: jax.vmap(lambda x: eqx.combine(p, static)(x, spec=spec), **vmap_kw)(x))
        return f.lower(params, x).compile().as_text()

    assert "all-gather" not in compiled_hlo(spmd_axis_name=BATCH_AXES)
    assert "all-gather" in compiled_hlo()  # without it the batch is gathered onto every device
