"""Parameter sharding by declared logical axes: every array of every zoo model placed by rule, none by default."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import eqx_ring
import models
from eqx_ring.sharding import DEFAULT_RULES, logical_axes, make_mesh, param_shardings, shard_params

VOCAB, D_MODEL, LAYERS, HEADS, KV_HEADS, HIDDEN = 64, 32, 2, 4, 2, 64
MESH = make_mesh(fsdp=2, tp=2, sp=2)


def transformer(scan_layers=True, tie_embeddings=False):
    return eqx_ring.RingTransformer(VOCAB, D_MODEL, LAYERS, HEADS, num_kv_heads=KV_HEADS, hidden_size=HIDDEN,
                                    scan_layers=scan_layers, tie_embeddings=tie_embeddings, key=jax.random.key(0))


def specs_by_path(tree, **kw) -> dict[str, P]:
    """`param_shardings(tree)` as {keystr(path): spec}, one entry per array."""
    shardings = param_shardings(tree, MESH, **kw)
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    return {jax.tree_util.keystr(path): s.spec for path, s in flat[0] if s is not None}


# ---- the intended placement, written out by hand ------------------------------------------------------------------


def expected_transformer(prefix="", stacked=True, tied=False) -> dict[str, P]:
    """Column layers [out, in]: (tp, fsdp); row layers: (fsdp, tp); vocab tables: (None, fsdp); norms whole."""
    layer = (None,) if stacked else ()  # the stacked layer axis stays whole
    table = {f"{prefix}.embedding.weight": P(None, "fsdp"), f"{prefix}.norm.weight": P(None)}
    if not tied:
        table[f"{prefix}.lm_head.weight"] = P(None, "fsdp")
    for block in [f"{prefix}.blocks"] if stacked else [f"{prefix}.blocks[{i}]" for i in range(LAYERS)]:
        table |= {
            f"{block}.attention_norm.weight": P(*layer, None),
            f"{block}.ffn_norm.weight": P(*layer, None),
            f"{block}.attention.query_proj.weight": P(*layer, "tp", "fsdp"),
            f"{block}.attention.key_proj.weight": P(*layer, "tp", "fsdp"),
            f"{block}.attention.value_proj.weight": P(*layer, "tp", "fsdp"),
            f"{block}.attention.output_proj.weight": P(*layer, "fsdp", "tp"),
            f"{block}.ffn.gate_proj.weight": P(*layer, "tp", "fsdp"),
            f"{block}.ffn.up_proj.weight": P(*layer, "tp", "fsdp"),
            f"{block}.ffn.down_proj.weight": P(*layer, "fsdp", "tp"),
        }
    return table


VQ_CONFIG = models.VQConfig(frame_size=16, patch=4, hidden=16, codebook_size=8, code_dim=4)


def expected_vq() -> dict[str, P]:
    """Coders like an FFN (hidden channels over tp, the other side over fsdp; the conv's kernel whole), the
    codebook like an embedding table."""
    table = {".codebook": P(None, "fsdp")}
    for coder in (".encoder", ".decoder"):
        table |= {
            f"{coder}.into.weight": P("tp", "fsdp"), f"{coder}.into.bias": P("tp"),
            f"{coder}.mix.weight": P("tp", "fsdp", None, None), f"{coder}.mix.bias": P("tp", None, None),
            f"{coder}.out.weight": P("fsdp", "tp"), f"{coder}.out.bias": P(None),
        }
    return table


def lm(tie_embeddings=False):
    config = models.LMConfig(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS,
                             num_kv_heads=KV_HEADS, hidden_size=HIDDEN, tie_embeddings=tie_embeddings)
    return models.RingLM(config, key=jax.random.key(0))


def video_text_lm():
    config = models.VideoTextConfig(text_vocab_size=VOCAB - 8, codebook_size=8, d_model=D_MODEL, num_layers=LAYERS,
                                    num_heads=HEADS, num_kv_heads=KV_HEADS, hidden_size=HIDDEN)
    return models.VideoTextLM(config, key=jax.random.key(0))


ZOO = {
    "RingTransformer-scanned": (lambda: transformer(), lambda: expected_transformer()),
    "RingTransformer-unrolled": (lambda: transformer(scan_layers=False), lambda: expected_transformer(stacked=False)),
    "RingLM": (lm, lambda: expected_transformer(".transformer")),
    "RingLM-tied": (lambda: lm(tie_embeddings=True), lambda: expected_transformer(".transformer", tied=True)),
    "VideoTextLM": (video_text_lm, lambda: expected_transformer(".transformer")),
    "VideoVQ": (lambda: models.VideoVQ(VQ_CONFIG, key=jax.random.key(0)), expected_vq),
}


@pytest.mark.parametrize("name", ZOO)
def test_every_parameter_gets_its_intended_sharding(name):
    build, expected = ZOO[name]
    model = build()
    # Dict equality: no array is missing from the table, and none is left over.
    assert specs_by_path(model) == expected()
    placed = shard_params(model, MESH)
    flat = jax.tree_util.tree_flatten_with_path(eqx.filter(placed, eqx.is_array))[0]
    assert {jax.tree_util.keystr(path): x.sharding.spec for path, x in flat} == expected()


def test_logical_axes_names_every_array_and_nothing_else():
    axes = logical_axes(transformer())
    assert axes.blocks.attention.query_proj.weight == ("layers", "heads", "embed")
    assert axes.blocks.attention.key_proj.weight == ("layers", "kv_heads", "embed")
    assert axes.blocks.ffn.down_proj.weight == ("layers", "embed", "mlp")
    assert axes.blocks.ffn_norm.weight == ("layers", "norm")
    assert axes.lm_head.weight == ("vocab", "embed")
    unrolled = logical_axes(transformer(scan_layers=False))
    assert unrolled.blocks[1].attention.output_proj.weight == ("embed", "heads")  # no layer axis to name
    # Arrays outside every module are not parameters; non-array leaves have no axes.
    tree = logical_axes({"step": jnp.zeros(()), "scale": 2.0, "norm": eqx_ring.RMSNorm(4)})
    assert tree["step"] is None and tree["scale"] is None and tree["norm"].weight == ("norm",)
    assert param_shardings({"step": jnp.zeros((2, 4))}, MESH)["step"].spec == P(None, None)


# ---- undeclared arrays, declarations that do not fit, and which declaration wins -------------------------------------


class Undeclared(eqx.Module):
    """Declares its linear layer but not its own array `extra`."""

    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "proj.weight": ("heads", "embed"), "proj.bias": ("heads",),
    }

    proj: eqx.nn.Linear
    extra: jax.Array

    def __init__(self):
        self.proj = eqx.nn.Linear(8, 4, key=jax.random.key(0))
        self.extra = jnp.ones((4, 8))


class Bare(eqx.Module):
    """Declares nothing."""

    proj: eqx.nn.Linear

    def __init__(self):
        self.proj = eqx.nn.Linear(8, 4, key=jax.random.key(0))


def test_an_undeclared_array_is_an_error_naming_its_path_and_module():
    with pytest.raises(ValueError, match=r"array at \['model'\]\.extra \(shape \(4, 8\)\) in a Undeclared has no "
                                         r"declared logical axes.*'extra' in Undeclared\.param_axes"):
        param_shardings({"model": Undeclared()}, MESH)
    # Inside a layer of another library: the message names that layer and the modules searched.
    with pytest.raises(ValueError, match=r"array at \[1\]\.proj\.weight \(shape \(4, 8\)\) in a Linear .*"
                                         r"\(Linear, Bare\)"):
        logical_axes((jnp.zeros(3), Bare()))


class Wrong(eqx.Module):
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {"w": ("heads", "embed", "mlp")}
    w: jax.Array


def test_a_declaration_with_more_axes_than_its_array_is_an_error():
    with pytest.raises(ValueError, match=r"declares 3 axes \('heads', 'embed', 'mlp'\) for the array at \.w, which "
                                         r"has 2 \(shape \(4, 8\)\)"):
        logical_axes(Wrong(jnp.ones((4, 8))))


class Inner(eqx.Module):
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {"w": ("heads", "embed")}
    w: jax.Array


class Outer(eqx.Module):
    # "inner.w" is shadowed by Inner's own declaration; "layers.1.weight" reaches into a tuple of Linears.
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "inner.w": ("embed", "heads"), "layers.0.weight": ("mlp", "embed"), "layers.1.weight": ("embed", "mlp"),
    }
    inner: Inner
    layers: tuple[eqx.nn.Linear, eqx.nn.Linear]


def test_the_nearest_declaration_wins_and_sequence_indices_are_path_components():
    key = jax.random.key(0)
    outer = Outer(Inner(jnp.ones((4, 8))), (eqx.nn.Linear(8, 4, use_bias=False, key=key),
                                            eqx.nn.Linear(4, 8, use_bias=False, key=key)))
    assert specs_by_path(outer) == {".inner.w": P("tp", "fsdp"), ".layers[0].weight": P("tp", "fsdp"),
                                    ".layers[1].weight": P("fsdp", "tp")}


# ---- custom rules --------------------------------------------------------------------------------------------------


def test_custom_rules():
    model = transformer()
    tp_only = specs_by_path(model, rules={**DEFAULT_RULES, "embed": None, "vocab": "tp"})
    assert tp_only[".blocks.attention.query_proj.weight"] == P(None, "tp", None)
    assert tp_only[".embedding.weight"] == P("tp", None)
    # A tuple of mesh axes splits a dimension over their product (32 over fsdp × sp = 4).
    wide = specs_by_path(model, rules={**DEFAULT_RULES, "embed": ("fsdp", "sp")})
    assert wide[".blocks.ffn.down_proj.weight"] == P(None, ("fsdp", "sp"), "tp")
    # A mesh axis splits one dimension at most: the first that asks for it.
    twice = specs_by_path(model, rules={**DEFAULT_RULES, "vocab": "fsdp"})
    assert twice[".embedding.weight"] == P("fsdp", None)
    # The layer axis can be split too (over a mesh axis whose size divides num_layers).
    layered = specs_by_path(model, rules={**DEFAULT_RULES, "layers": "sp"})
    assert layered[".blocks.attention_norm.weight"] == P("sp", None)


@pytest.mark.parametrize(
    ("rules", "error", "message"),
    [
        ({k: v for k, v in DEFAULT_RULES.items() if k != "mlp"}, ValueError,
         r"rules have no entry for the logical axis 'mlp' of the array at \.blocks\.ffn\.gate_proj\.weight"),
        ({**DEFAULT_RULES, "embed": "model"}, ValueError,
         r"rules\['embed'\]='model' names mesh axes \['model'\] that the mesh lacks; it has "
         r"\('dp', 'fsdp', 'tp', 'sp'\)"),
        ({**DEFAULT_RULES, "heads": 2}, TypeError,
         r"rules\['heads'\] must be a mesh axis name, a tuple of them or None, got 2"),
    ],
)
def test_bad_rules(rules, error, message):
    with pytest.raises(error, match=message):
        param_shardings(transformer(), MESH, rules=rules)


# ---- optimizer states ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [optax.adamw(1e-3), models.make_optimizer(
    models.TrainConfig(stages=(models.Stage(seq_len=64, steps=10),), warmup_steps=2))], ids=["adamw", "make_optimizer"])
def test_optimizer_state_mirrors_the_model(optimizer):
    model = lm()
    params = eqx.filter(model, eqx.is_array)
    model_specs = specs_by_path(params)
    state_specs = specs_by_path(optimizer.init(params))
    moments = {path: spec for path, spec in state_specs.items() if ".mu." in path or ".nu." in path}
    prefix = next(iter(moments)).split(".mu.")[0]
    # Both moments, every parameter, the model's shardings; everything else (step counts) replicated.
    assert moments == {f"{prefix}.{m}{path}": spec for m in ("mu", "nu") for path, spec in model_specs.items()}
    others = {path: spec for path, spec in state_specs.items() if path not in moments}
    assert others and all(spec == P() for spec in others.values()), others


# ---- a model placed by these rules still computes what it did ------------------------------------------------------


def test_sharded_video_vq_gives_the_replicated_result():
    vq = models.VideoVQ(VQ_CONFIG, key=jax.random.key(0))
    frames = jax.random.uniform(jax.random.key(1), (2, 3, 16, 16), minval=-1.0, maxval=1.0)
    run = eqx.filter_jit(lambda m, x: m(x))
    expected, got = run(vq, frames), run(shard_params(vq, MESH), frames)
    assert jnp.array_equal(got.codes, expected.codes)
    assert jnp.allclose(got.reconstruction, expected.reconstruction, atol=1e-5)
