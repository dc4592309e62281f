"""`RingLM`: a LLaMA-style text language model on `RingTransformer`, with size presets."""

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float, PRNGKeyArray

from eqx_ring import AttentionSpec, KernelTuning, RingTransformer, chunked_cross_entropy

from ._protocol import RingModel

WHOLE_BATCH = "whole_batch"
"""The key under which [`make_train_step`][models.make_train_step] hands each microbatch the whole batch."""


def require_int(config: Any, name: str, minimum: int = 1, *, optional: bool = False) -> None:
    """Refuse `config.name` unless it is an int (not a bool) `>= minimum` (or `None` when `optional`)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{type(config).__name__}.{name} must be {what}{' or None' if optional else ''}, "
                         f"got {value!r}")


def require_float(config: Any, name: str, *, low: float, high: float | None = None, open_low: bool = False,
                  optional: bool = False) -> None:
    """Refuse `config.name` unless it is a finite real in `[low, high]` (`(low, high]` when `open_low`)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not real or value < low or (open_low and value == low) or (high is not None and value > high):
        if high is not None:
            what = f"a float in {'(' if open_low else '['}{low:g}, {high:g}]"
        else:
            what = f"a finite float {'>' if open_low else '>='} {low:g}"
        raise ValueError(f"{type(config).__name__}.{name} must be {what}{' or None' if optional else ''}, "
                         f"got {value!r}")


def config_from_dict(config_cls: type, fields: Mapping[str, Any], where: str | None = None) -> Any:
    """The config of class `config_cls` that `fields` (as JSON gives it back) describes: its `attention`, if
    any, a mapping of [`AttentionSpec`][eqx_ring.AttentionSpec] fields, becomes a spec. Unknown fields are
    refused naming `where` (default: the class's name)."""
    where = config_cls.__name__ if where is None else where
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{where} has no fields {unknown}")
    fields = dict(fields)
    if isinstance(fields.get("attention"), Mapping):
        try:
            fields["attention"] = AttentionSpec.from_dict(fields["attention"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}.attention: {error}") from None
    return config_cls(**fields)


def check_transformer_fields(config: Any, head_dim: int | None = None) -> None:
    """The checks shared by [`LMConfig`][models.LMConfig] and [`VideoTextConfig`][models.VideoTextConfig]:
    the dimensions they give [`RingTransformer`][eqx_ring.RingTransformer] (heads of `head_dim` features,
    `None`: `d_model // num_heads`), and their `attention` spec."""
    owner = type(config).__name__
    for name in ("d_model", "num_layers", "num_heads"):
        require_int(config, name)
    require_int(config, "num_kv_heads", optional=True)
    require_int(config, "hidden_size", optional=True)
    if head_dim is None and config.d_model % config.num_heads:
        raise ValueError(f"{owner}.num_heads must divide d_model={config.d_model}, got {config.num_heads}")
    if config.num_kv_heads is not None and config.num_heads % config.num_kv_heads:
        raise ValueError(f"{owner}.num_kv_heads must divide num_heads={config.num_heads}, got {config.num_kv_heads}")
    policy = config.remat_policy
    if policy is not None and not (isinstance(policy, str) and callable(getattr(jax.checkpoint_policies, policy,
                                                                                   None))):
        raise ValueError(f"{owner}.remat_policy must be None or a name in jax.checkpoint_policies (e.g. "
                         f"'nothing_saveable', 'dots_saveable'), got {policy!r}")
    attention = config.attention
    if not isinstance(attention, AttentionSpec):
        raise ValueError(f"{owner}.attention must be an eqx_ring.AttentionSpec, got {type(attention).__name__}")
    if attention.mesh is not None or attention.head_axis is not None:
        raise ValueError(f"{owner}.attention must not hold a placement (mesh={attention.mesh}, head_axis="
                         f"{attention.head_axis!r}): a config is what is saved; pass mesh= and head_axis= to the model")
    head_dim, given = (config.d_model // config.num_heads, "d_model // num_heads") if head_dim is None else (
        head_dim, "head_dim")
    if attention.rope_theta is not None and head_dim % 2:
        raise ValueError(f"{owner}.attention.rope_theta={attention.rope_theta} needs an even head size, got "
                         f"{given} = {head_dim}")


def build_transformer(config: Any, *, mesh: Mesh | None, head_axis: str | None, tie_embeddings: bool,
                      key: PRNGKeyArray, **structure: Any) -> RingTransformer:
    """The [`RingTransformer`][eqx_ring.RingTransformer] of a config checked by `check_transformer_fields`, its
    spec the config's `attention` placed on `mesh` (heads over `head_axis`); `structure` holds the constructor's
    other arguments the config sets (e.g. `head_dim=`, `qkv_bias=`, `norm_eps=`)."""
    c = config
    spec = c.attention.replace(mesh=mesh, head_axis=head_axis)
    return RingTransformer(c.vocab_size, c.d_model, c.num_layers, c.num_heads, spec=spec, num_kv_heads=c.num_kv_heads,
                           hidden_size=c.hidden_size, tie_embeddings=tie_embeddings, remat_policy=c.remat_policy,
                           key=key, **structure)


def token_count(batch: Mapping[str, Any], count: Callable[[Mapping[str, Any]], Array]) -> Array:
    """What a token mean over `batch` divides by: `count(batch)`, or under gradient accumulation (a microbatch
    holding [`WHOLE_BATCH`][models._lm.WHOLE_BATCH]) the whole batch's count times this microbatch's share of its
    rows, so that the mean of the microbatches' values is the whole batch's token mean."""
    whole = batch.get(WHOLE_BATCH)
    if whole is None:
        return count(batch)
    return count(whole) * (batch["tokens"].shape[0] / whole["tokens"].shape[0])


PARAM_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LMConfig:
    """Hyperparameters of a [`RingLM`][models.RingLM]; JSON-serialisable (`dataclasses.asdict`).

    The dimensions are passed to the [`RingTransformer`][eqx_ring.RingTransformer] the model builds
    (its other settings keep their defaults: stacked, scanned layers, SwiGLU), and `attention` is its
    [`AttentionSpec`][eqx_ring.AttentionSpec] once the model adds its mesh. Named sizes are in
    [`PRESETS`][models.PRESETS]; get one with [`preset`][models.LMConfig.preset].

    **Arguments:**

    - `vocab_size`: token ids the model embeds and predicts. The default, 263, is the
      [`ByteTokenizer`][data_pipelines.ByteTokenizer]'s 256 bytes and 7 special tokens.
    - `d_model`: width of the residual stream.
    - `num_layers`: decoder blocks.
    - `num_heads`: query heads; must divide `d_model`.
    - `num_kv_heads`: key/value heads (GQA/MQA); must divide `num_heads`. `None`: `num_heads`.
    - `hidden_size`: width of the SwiGLU feed-forward layer. `None`: `4 * d_model`.
    - `head_dim`: width of each attention head. `None` (default): `d_model // num_heads`, which
      must then divide evenly.
    - `qkv_bias`: biases on the query, key and value projections (Qwen2's); default `False`.
    - `use_sinks`: a learnable attention sink per query head in every block (gpt-oss's); default
      `False`.
    - `norm_eps`: the RMSNorms' epsilon (default `1e-6`; LLaMA-family checkpoints give theirs).
    - `param_dtype`: the weights' dtype, `"float32"` (default), `"bfloat16"` or `"float16"`; the
      RMSNorm scales are float32 whatever it is. Zoo files record it, so a bfloat16 checkpoint
      loads as one.
    - `tie_embeddings`: use the embedding matrix as the LM head.
    - `remat_policy`: a name in `jax.checkpoint_policies` each block is rematerialised with
      (e.g. `"nothing_saveable"`, `"dots_saveable"`), or `None` for no rematerialisation.
    - `attention`: the [`AttentionSpec`][eqx_ring.AttentionSpec] without placement (no mesh or
      head axis: the model's constructor adds those): masks (KV-cached decoding with
      [`generate`][models.generate] needs `causal_block_size=1`), `rope_theta`, the ring `layout`
      (batches must be laid out to match) and the kernel `tuning`. Default: `AttentionSpec()`.

    **Raises:** `ValueError`, naming the field and its value, for a size or head count that is not a
    positive int, `num_heads` not dividing `d_model` (without `head_dim`), a `norm_eps` that is not a
    finite float >= 0, a `qkv_bias` or `use_sinks` that is not a bool, an unknown `param_dtype`, `num_kv_heads` not
    dividing `num_heads`, an unknown `remat_policy`, a `tie_embeddings` that is not a bool, or an
    `attention` that is not a valid spec, holds a mesh or head axis, or has RoPE over an odd head size.
    """

    vocab_size: int = 263
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    hidden_size: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    use_sinks: bool = False
    norm_eps: float = 1e-6
    param_dtype: str = "float32"
    tie_embeddings: bool = False
    remat_policy: str | None = "nothing_saveable"
    attention: AttentionSpec = AttentionSpec()

    def __post_init__(self):
        require_int(self, "vocab_size")
        require_int(self, "head_dim", optional=True)
        require_float(self, "norm_eps", low=0.0)
        check_transformer_fields(self, self.head_dim)
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"LMConfig.param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}")
        for name in ("tie_embeddings", "qkv_bias", "use_sinks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LMConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LMConfig":
        """A named size from [`PRESETS`][models.PRESETS], with some fields replaced.

        `"tiny"` and `"small"` train on a CPU; `"1b"` and `"7b"` are LLaMA-shaped for real meshes
        (override their `vocab_size` with the real tokenizer's).

        **Arguments:**

        - `name`: a key of [`PRESETS`][models.PRESETS]: `"tiny"`, `"small"`, `"1b"` or `"7b"`.
        - `**overrides`: fields to replace, e.g. `vocab_size=32_000` or
          `attention=AttentionSpec(layout="zigzag")`.

        **Returns:** a new `LMConfig`.

        **Raises:** `ValueError` if `name` is not a preset or an override is a value `LMConfig` refuses
        (and `TypeError` for an unknown field).

        **Example:**

        ```python
        import models

        config = models.LMConfig.preset("7b", vocab_size=1000)
        assert (config.d_model, config.num_layers, config.vocab_size) == (4096, 32, 1000)
        ```
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: name must be one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, LMConfig] = {
    "tiny": LMConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=192),
    "small": LMConfig(d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, hidden_size=768),
    # LLaMA-style shapes; vocab_size should be overridden with the real tokenizer's.
    "1b": LMConfig(vocab_size=32_000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, hidden_size=5632),
    "7b": LMConfig(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, hidden_size=11008),
}
"""Named [`LMConfig`][models.LMConfig]s, used by [`LMConfig.preset`][models.LMConfig.preset].

- `"tiny"`: `d_model=64`, 2 layers, 4 heads (2 key/value heads), `hidden_size=192`: trains on a CPU.
- `"small"`: `d_model=256`, 4 layers, 8 heads (4 key/value heads), `hidden_size=768`.
- `"1b"`: LLaMA-style, `d_model=2048`, 22 layers, 32 heads (4 key/value heads), `hidden_size=5632`,
  `vocab_size=32_000` (about 1.1 billion parameters).
- `"7b"`: LLaMA-7B's shape, `d_model=4096`, 32 layers, 32 heads, `hidden_size=11008`, `vocab_size=32_000`.

The other fields keep the `LMConfig` defaults; `"tiny"` and `"small"` keep `vocab_size=263` (the
[`ByteTokenizer`][data_pipelines.ByteTokenizer]'s). Override `vocab_size` of the large ones with
the real tokenizer's.
"""


class RingLM(RingModel):
    """A LLaMA-style decoder-only language model: a [`RingTransformer`][eqx_ring.RingTransformer] built
    from an [`LMConfig`][models.LMConfig].

    Single-example like every Equinox module: `__call__` maps `[seq]` tokens to `[seq, d_model]`
    hidden states (not logits; `model.transformer.logits(hidden)` gives those for short sequences);
    `loss` is the mean next-token cross-entropy of a batch, never building the logits. Generate
    text with [`generate`][models.generate]; save and load with [`save`][models.save] /
    [`load`][models.load]. On a mesh, the sequence is split over its `"sp"` axis and must be in
    the config's `attention.layout` order.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import models

    config = models.LMConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, hidden_size=32)
    model = models.RingLM(config, key=jax.random.key(0))
    hidden = model(jnp.arange(8))
    assert hidden.shape == (8, 16)  # [seq, d_model]
    assert model.transformer.logits(hidden).shape == (8, 32)  # [seq, vocab_size]
    ```
    """

    transformer: RingTransformer
    config: LMConfig = eqx.field(static=True)

    def __init__(self, config: LMConfig, *, mesh: Mesh | None = None, head_axis: str | None = None,
                 key: PRNGKeyArray):
        """Build the model with freshly initialised weights.

        **Arguments:**

        - `config`: the [`LMConfig`][models.LMConfig].
        - `mesh`: a mesh with an `"sp"` axis to run the ring attention over, or `None` (the default)
          for one device: the model's spec is `config.attention.replace(mesh=mesh, head_axis=head_axis)`.
          The weights are not placed on it: use [`shard_params`][eqx_ring.sharding.shard_params].
        - `head_axis`: a mesh axis to split the attention heads over (tensor parallelism), or `None`.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only argument.)
        """
        self.transformer = build_transformer(config, mesh=mesh, head_axis=head_axis,
                                             tie_embeddings=config.tie_embeddings, key=key, head_dim=config.head_dim,
                                             qkv_bias=config.qkv_bias, use_sinks=config.use_sinks,
                                             norm_eps=config.norm_eps,
                                             dtype=jnp.dtype(config.param_dtype))
        self.config = config

    def loss(self, batch: Mapping[str, Any], *, spmd_axis_name: tuple[str, ...] | None = None,
             tuning: KernelTuning | None = None, key: PRNGKeyArray | None = None) -> Float[Array, ""]:
        """Mean next-token cross-entropy of a batch of packed rows, never building the `[seq, vocab]` logits.

        The targets were taken in natural order before any ring layout (as
        [`packed_batches`][data_pipelines.packed_batches] and
        [`global_packed_batches`][data_pipelines.global_packed_batches] make them), so no shift
        happens here. [`train`][models.train] wants `(loss, metrics)`: pass it
        `lambda m, b: (m.loss(b, spmd_axis_name=BATCH_AXES), {})`. Under gradient accumulation
        [`make_train_step`][models.make_train_step] adds the whole batch to each microbatch (key
        `"whole_batch"`); the sum over this microbatch's targets is then divided by the whole
        batch's target count over the number of microbatches, so that the mean of the microbatches'
        losses is the whole batch's token mean however the targets fall among them.

        **Arguments:**

        - `batch`: `[batch, seq]` arrays `"tokens"`, `"positions"`, `"segment_ids"` (int),
          `"targets"` (int) and `"target_mask"` (bool: which targets count), all in the spec's
          `layout` order; other keys are ignored.
        - `spmd_axis_name`: the mesh's data axes (`("dp", "fsdp")`, i.e.
          [`BATCH_AXES`][eqx_ring.sharding.BATCH_AXES]) when the model is on a mesh, so that each
          data shard keeps its own rows; `None` (the default) without a mesh.
        - `tuning`: a [`KernelTuning`][eqx_ring.KernelTuning] for this call instead of the spec's
          (default `None`: the spec's); no rebuild.
        - `key`: a `jax.random` key for the spec's attention dropout (split over the rows); needed
          when `config.attention.dropout` is not 0, ignored otherwise. [`train`][models.train] given
          `key=` passes one per step. Default `None`.

        **Returns:** the mean loss over the targets in `target_mask` (0 when there are none), a
        float32 scalar.
        """

        hidden = batch_hidden(self.transformer, batch, spmd_axis_name, tuning, key)
        per_token = chunked_cross_entropy(hidden, self.transformer.head_weight, batch["targets"],
                                          batch["target_mask"], reduction="none")
        count = token_count(batch, lambda b: b["target_mask"].sum(dtype=jnp.float32))
        return per_token.sum() / jnp.where(count > 0, count, 1.0)


def batch_hidden(
    transformer: RingTransformer, batch: Mapping[str, Any], spmd_axis_name: tuple[str, ...] | None,
    tuning: KernelTuning | None = None, key: PRNGKeyArray | None = None,
) -> Float[Array, "batch seq d_model"]:
    """The final hidden states of a batch of packed rows: `transformer` (with `tuning`, if given) vmapped over
    `tokens`, `positions` and `segment_ids`, each data shard keeping its own rows when `spmd_axis_name` names the
    data axes; `key` (the attention dropout's) is split into one per row."""

    def one(tokens, positions, segment_ids, key):
        return transformer(tokens, positions=positions, segment_ids=segment_ids, tuning=tuning, key=key)

    vmap_kw = {} if spmd_axis_name is None else dict(spmd_axis_name=spmd_axis_name)
    keys = None if key is None else jax.random.split(key, batch["tokens"].shape[0])
    return jax.vmap(one, **vmap_kw)(batch["tokens"], batch["positions"], batch["segment_ids"], keys)
