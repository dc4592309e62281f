"""`RingLM`: a LLaMA-style text language model on `RingTransformer`, with size presets."""

import dataclasses
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from eqx_ring import RingTransformer, chunked_cross_entropy


@dataclass(frozen=True)
class LMConfig:
    """Hyperparameters of a [`RingLM`][models.RingLM]; JSON-serialisable (`dataclasses.asdict`)."""

    vocab_size: int = 263
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    hidden_size: int | None = None
    rope_theta: float = 10_000.0
    causal_block_size: int = 1
    tie_embeddings: bool = False
    layout: str = "contiguous"
    query_chunk_size: int = 512
    key_chunk_size: int = 512
    ffn_chunk_size: int = 2048
    remat_policy: str | None = "nothing_saveable"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LMConfig":
        """A named size: `"tiny"` and `"small"` train on a CPU; `"1b"` and `"7b"` are LLaMA-shaped for real meshes."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, LMConfig] = {
    "tiny": LMConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=192),
    "small": LMConfig(d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, hidden_size=768),
    # LLaMA-style shapes; vocab_size should be overridden with the real tokenizer's.
    "1b": LMConfig(vocab_size=32_000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, hidden_size=5632),
    "7b": LMConfig(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, hidden_size=11008),
}


class RingLM(eqx.Module):
    """A decoder-only language model: [`RingTransformer`][eqx_ring.RingTransformer] built from an `LMConfig`.

    Single-example like every Equinox module: `__call__` maps `[seq]` tokens to `[seq, d_model]`
    hidden states; `loss` is the mean next-token cross-entropy of a batch, never building the logits.
    """

    transformer: RingTransformer
    config: LMConfig = eqx.field(static=True)

    def __init__(self, config: LMConfig, *, mesh: Mesh | None = None, head_axis: str | None = None,
                 key: PRNGKeyArray):
        """**Arguments:** the `config`, an optional `mesh` (and `head_axis`) to run the ring on, and a PRNG `key`."""
        c = config
        self.transformer = RingTransformer(
            c.vocab_size, c.d_model, c.num_layers, c.num_heads, num_kv_heads=c.num_kv_heads,
            hidden_size=c.hidden_size, rope_theta=c.rope_theta, causal_block_size=c.causal_block_size,
            tie_embeddings=c.tie_embeddings, layout=c.layout, query_chunk_size=c.query_chunk_size,
            key_chunk_size=c.key_chunk_size, ffn_chunk_size=c.ffn_chunk_size, remat_policy=c.remat_policy,
            mesh=mesh, head_axis=head_axis, key=key,
        )
        self.config = config

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq d_model"]:
        """Final hidden states; arguments as [`RingTransformer`][eqx_ring.RingTransformer]."""
        return self.transformer(tokens, positions=positions, segment_ids=segment_ids)

    def loss(self, batch: dict[str, Array], *, spmd_axis_name: tuple[str, ...] | None = None) -> Float[Array, ""]:
        """Mean next-token loss of a batch of packed rows (`[batch, seq]` arrays as `data_pipelines` makes them).

        Uses `tokens`, `positions`, `segment_ids`, `targets` and `target_mask`; the targets were
        taken in natural order before any ring layout, so no shift happens here. Pass
        `spmd_axis_name=("dp", "fsdp")` on a mesh.
        """

        hidden = batch_hidden(self.transformer, batch, spmd_axis_name)
        return chunked_cross_entropy(hidden, self.transformer.head_weight, batch["targets"], batch["target_mask"])


def batch_hidden(
    transformer: RingTransformer, batch: dict[str, Array], spmd_axis_name: tuple[str, ...] | None
) -> Float[Array, "batch seq d_model"]:
    """The final hidden states of a batch of packed rows: `transformer` vmapped over `tokens`, `positions` and
    `segment_ids`, each data shard keeping its own rows when `spmd_axis_name` names the data axes."""

    def one(tokens, positions, segment_ids):
        return transformer(tokens, positions=positions, segment_ids=segment_ids)

    vmap_kw = {} if spmd_axis_name is None else dict(spmd_axis_name=spmd_axis_name)
    return jax.vmap(one, **vmap_kw)(batch["tokens"], batch["positions"], batch["segment_ids"])
