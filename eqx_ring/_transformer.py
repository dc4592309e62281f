"""`RingTransformerBlock`, `RingTransformer` and the vocab-chunked cross-entropy."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Real

from ._attention import RingAttention
from ._ffn import BlockwiseFFN, RMSNorm

REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


class RingTransformerBlock(eqx.Module):
    """A pre-norm decoder block: `x + attention(norm(x))`, then `x + ffn(norm(x))`."""

    attention_norm: RMSNorm
    attention: RingAttention
    ffn_norm: RMSNorm
    ffn: BlockwiseFFN
    d_model: int = eqx.field(static=True)

    def __init__(self, attention: RingAttention, ffn: BlockwiseFFN, *, norm_eps: float = 1e-6):
        """**Arguments:** the block's `attention` and `ffn` (of equal `d_model`), and `norm_eps`
        for its two [`RMSNorm`][eqx_ring.RMSNorm]s."""
        self.attention_norm = RMSNorm(attention.d_model, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(ffn.d_model, eps=norm_eps)
        self.ffn = ffn
        self.d_model = attention.d_model

    def __check_init__(self):
        if self.ffn.d_model != self.attention.d_model:
            raise ValueError(
                f"attention.d_model={self.attention.d_model} and ffn.d_model={self.ffn.d_model} must be equal"
            )

    def __call__(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """Arguments as [`RingAttention`][eqx_ring.RingAttention]; returns an array like `x`."""
        with jax.named_scope("eqx_ring.RingTransformerBlock"):
            x = x + self.attention(self.attention_norm(x), positions=positions, segment_ids=segment_ids)
            return x + self.ffn(self.ffn_norm(x))


class RingTransformer(eqx.Module):
    """A decoder-only language model of [`RingTransformerBlock`][eqx_ring.RingTransformerBlock]s.

    Token embedding, `num_layers` pre-norm blocks, a final [`RMSNorm`][eqx_ring.RMSNorm] and an LM
    head (optionally tied to the embedding). With `scan_layers=True` the blocks are stored stacked
    (each array has a leading `num_layers` axis) and run by one `lax.scan`, so compile time does
    not grow with depth. Each block runs under `jax.checkpoint` with `remat_policy` (`None`
    disables rematerialisation).

    `__call__` returns the final hidden states, not logits: at long context the `[seq, vocab]`
    logits are the largest array in the model. Train with
    [`chunked_cross_entropy`][eqx_ring.chunked_cross_entropy]`(hidden, model.head_weight, ...)`,
    which never builds them; use [`logits`][eqx_ring.RingTransformer.logits] for short sequences.
    """

    embedding: eqx.nn.Embedding
    blocks: RingTransformerBlock | tuple[RingTransformerBlock, ...]
    norm: RMSNorm
    lm_head: eqx.nn.Linear | None
    vocab_size: int = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)
    remat_policy: str | None = eqx.field(static=True)

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        hidden_size: int | None = None,
        activation: str = "swiglu",
        tie_embeddings: bool = False,
        causal: bool = True,
        causal_block_size: int = 1,
        sliding_window: int | None = None,
        rope_theta: float | None = 10_000.0,
        layout: str = "contiguous",
        query_chunk_size: int = 512,
        key_chunk_size: int = 512,
        ffn_chunk_size: int = 2048,
        mesh: Mesh | None = None,
        seq_axis: str = "sp",
        head_axis: str | None = None,
        scan_layers: bool = True,
        remat_policy: str | None = "nothing_saveable",
        norm_eps: float = 1e-6,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `vocab_size`, `d_model`, `num_layers`, `num_heads`: the model's size.
        - `num_kv_heads`, `head_dim`, `causal`, `causal_block_size`, `sliding_window`,
          `rope_theta`, `layout`, `query_chunk_size`, `key_chunk_size`, `mesh`, `seq_axis`,
          `head_axis`: passed to every [`RingAttention`][eqx_ring.RingAttention].
        - `hidden_size`, `activation`, `ffn_chunk_size`: the [`BlockwiseFFN`][eqx_ring.BlockwiseFFN]
          (`hidden_size` defaults to `4 * d_model`).
        - `tie_embeddings`: use the embedding matrix as the LM head.
        - `scan_layers`: stack the blocks and `lax.scan` over them.
        - `remat_policy`: a name in `jax.checkpoint_policies` (one of
          `"nothing_saveable"`, `"dots_saveable"`, `"dots_with_no_batch_dims_saveable"`,
          `"everything_saveable"`), or `None` for no rematerialisation.
        - `norm_eps`: the RMSNorms' epsilon.
        - `dtype`: parameter dtype; defaults to float32.
        - `key`: a `jax.random.PRNGKey` for the initialisation.
        """
        ek, hk, bk = jax.random.split(key, 3)
        hidden_size = 4 * d_model if hidden_size is None else hidden_size

        def block(k):
            ak, fk = jax.random.split(k)
            attention = RingAttention(
                d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
                causal_block_size=causal_block_size, sliding_window=sliding_window, rope_theta=rope_theta,
                layout=layout, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, mesh=mesh,
                seq_axis=seq_axis, head_axis=head_axis, dtype=dtype, key=ak,
            )
            ffn = BlockwiseFFN(d_model, hidden_size, activation=activation, chunk_size=ffn_chunk_size, dtype=dtype,
                               key=fk)
            return RingTransformerBlock(attention, ffn, norm_eps=norm_eps)

        keys = jax.random.split(bk, num_layers)
        self.blocks = eqx.filter_vmap(block)(keys) if scan_layers else tuple(block(k) for k in keys)
        self.embedding = eqx.nn.Embedding(vocab_size, d_model, dtype=dtype, key=ek)
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = None if tie_embeddings else eqx.nn.Linear(d_model, vocab_size, use_bias=False, dtype=dtype,
                                                                 key=hk)
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.num_layers = num_layers
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy

    def __check_init__(self):
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be None or one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")

    @property
    def head_weight(self) -> Float[Array, "{self.vocab_size} {self.d_model}"]:
        """The LM head's `[vocab_size, d_model]` matrix (the embedding's when tied)."""
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """**Arguments:**

        - `tokens`: token ids, in the attention layout's order.
        - `positions`, `segment_ids`: as [`RingAttention`][eqx_ring.RingAttention].
        - `key`, `inference`: unused (there is no dropout).

        **Returns:** the final (normalised) hidden states.
        """
        del key, inference
        with jax.named_scope("eqx_ring.RingTransformer"):
            x = jnp.take(self.embedding.weight, tokens, axis=0)

            def layer(x, block):
                return block(x, positions=positions, segment_ids=segment_ids)

            if self.remat_policy is not None:
                layer = eqx.filter_checkpoint(layer, policy=getattr(jax.checkpoint_policies, self.remat_policy))
            if self.scan_layers:
                params, static = eqx.partition(self.blocks, eqx.is_array)

                def body(x, p):
                    return layer(x, eqx.combine(p, static)), None

                x, _ = lax.scan(body, x, params)
            else:
                for block in self.blocks:
                    x = layer(x, block)
            return self.norm(x)

    def logits(self, hidden: Float[Array, "*batch {self.d_model}"]) -> Float[Array, "*batch {self.vocab_size}"]:
        """Project hidden states to logits (materialises `[*batch, vocab_size]`)."""
        return hidden @ self.head_weight.T


def chunked_cross_entropy(
    hidden: Float[Array, "*batch d_model"],
    head_weight: Float[Array, "vocab d_model"],
    labels: Int[Array, "*batch"],
    mask: Bool[Array, "*batch"] | Real[Array, "*batch"] | None = None,
    *,
    vocab_chunk_size: int = 8192,
) -> Float[Array, ""]:
    """Mean next-token cross-entropy of `hidden @ head_weight.T` against `labels`, over `mask`.

    The vocabulary is processed `vocab_chunk_size` rows of `head_weight` at a time with an online
    log-sum-exp, each chunk under `jax.checkpoint`, so neither pass ever holds more than
    `[*batch, vocab_chunk_size]` logits. Logits are accumulated in float32.

    **Arguments:**

    - `hidden`: final hidden states, any leading dims (e.g. `[batch, seq]`).
    - `head_weight`: the `[vocab, d_model]` output matrix (`RingTransformer.head_weight`).
    - `labels`: target ids, shaped like `hidden` without its last axis.
    - `mask`: which tokens count (bool or 0/1 weights); all of them when `None`.
    - `vocab_chunk_size`: rows of `head_weight` per chunk; the vocabulary is padded to a multiple.

    **Returns:** `sum(mask * loss) / max(sum(mask), 1)`, a float32 scalar.
    """
    vocab, d = head_weight.shape
    chunk = min(vocab_chunk_size, vocab)
    num_chunks = -(-vocab // chunk)
    weight = jnp.pad(head_weight, ((0, num_chunks * chunk - vocab), (0, 0))).reshape(num_chunks, chunk, d)
    batch = labels.shape
    labels = labels.astype(jnp.int32)

    @jax.checkpoint
    def step(carry, inputs):
        m, l, picked = carry
        w, start = inputs
        logits = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        ids = start + jnp.arange(chunk)
        logits = jnp.where(ids < vocab, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        l = l * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        local = labels - start
        hit = (local >= 0) & (local < chunk)
        mine = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        return (m_new, l, picked + jnp.where(hit, mine, 0.0)), None

    init = (jnp.full(batch, -jnp.inf, jnp.float32), jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.float32))
    (m, l, picked), _ = lax.scan(step, init, (weight, jnp.arange(num_chunks) * chunk))
    loss = m + jnp.log(l) - picked
    weights = jnp.ones(batch, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return (loss * weights).sum() / jnp.maximum(weights.sum(), 1.0)
