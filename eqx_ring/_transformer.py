"""`RingTransformerBlock`, `RingTransformer` and the vocab-chunked cross-entropy."""

import dataclasses
import math
import numbers
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Real

from ._attention import RingAttention, check_spec, inside_shard_map
from ._ffn import BlockwiseFFN, RMSNorm
from ._layout import layout_positions, layout_slot, shard_positions
from ._spec import AttentionSpec, KernelTuning

# The name under which offload_residuals marks each block's input for jax.checkpoint's offloading policy.
_BLOCK_INPUT = "eqx_ring.block_input"
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def _on_host(*arrays) -> bool:
    """Whether every one of `arrays` (`None` skipped) has a value this process can read now (not traced)."""
    return not any(isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.is_fully_addressable)
                   for a in arrays)


def check_ids(ids, limit: int, name: str, mask=None):
    """Where `ids` (where `mask` is nonzero) fall outside `[0, limit)`: `None` if nowhere, else a traced bool array.

    A value this process can read is checked in NumPy: a bad id raises, naming the first one and its
    index, and the result is `None`. For a traced one the result marks the bad ids, for the caller to
    turn what they touch into NaN. A run-time raise (`eqx.error_if`) is not used: its callback runs on
    one device, and on a mesh the others then wait forever in their next collective (measured on the
    8-device CPU mesh: a 40 s rendezvous time-out, then the process aborts without the message).
    """
    ids = jnp.asarray(ids) if isinstance(ids, numbers.Number) else ids
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer ids, got dtype {ids.dtype}")
    if _on_host(ids, mask):
        host = np.asarray(ids)
        bad = (host < 0) | (host >= limit)
        if mask is not None:
            bad &= np.asarray(mask) != 0
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            where = f" at index {at[0] if len(at) == 1 else at}" if at else ""
            raise ValueError(f"{_ids_message(name, limit)}, got {host[at]}{where}")
        return None
    bad = (ids < 0) | (ids >= limit)
    if mask is not None:
        bad &= jnp.asarray(mask).astype(bool)
    return bad


def _error_if(x, pred, message: str):
    """`x`, raising `message` at run time where `pred` holds: `eqx.error_if` on one scalar flag tied to `x`.

    `x` itself does not pass through the check's conditional: its result lives on one device, so a sharded
    `x` threaded through it would be gathered there and split again (XLA's "involuntary full
    rematerialization"). Inside a caller's `shard_map` the flag is decided on every device at once, as
    error_if's callback must return the same value on each.
    """
    flag = pred.any().astype(jnp.int32)
    varying = tuple(jax.typeof(pred).manual_axis_type.varying)
    if varying:
        flag = lax.psum(flag, varying)
    flag = eqx.error_if(flag, flag > 0, message)
    # Makes `x` depend on the checked flag, so that using `x` runs the check (an optimization barrier over
    # both does not: XLA drops the unused flag, tested). Taken only with EQX_ON_ERROR=off: then zeros.
    return jnp.where(flag > 0, jnp.zeros_like(x), x)


def _ids_message(name: str, limit: int) -> str:
    return f"{name} must be ids in [0, {limit}) (vocab_size={limit})"


def _check_length(length, size: int):
    """`length` as an int32 scalar, once it is known to lie in `[1, size]` (see `check_ids` for how)."""
    if not jnp.issubdtype(jnp.result_type(length), jnp.integer) or isinstance(length, bool):
        raise TypeError(f"length must be an int or an int scalar array, got {length!r}")
    if jnp.ndim(length) != 0:
        raise ValueError(f"length must be a scalar, got shape {jnp.shape(length)}")
    message = f"length must be in [1, {size}] (the prompt's tokens, at most the cache's {size} slots)"
    if _on_host(length):
        if not 1 <= int(length) <= size:
            raise ValueError(f"{message}, got {int(length)}")
        return jnp.asarray(length, jnp.int32)
    length = jnp.asarray(length, jnp.int32)
    return _error_if(length, (length < 1) | (length > size), message)


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class RingTransformerBlock(eqx.Module):
    """A pre-norm decoder block: `x + attention(norm(x))`, then `x + ffn(norm(x))`.

    Takes one example, `[seq, d_model]`, in the spec's layout, and the
    [`AttentionSpec`][eqx_ring.AttentionSpec] to attend with, like
    [`RingAttention`][eqx_ring.RingAttention]; [`RingTransformer`][eqx_ring.RingTransformer] stacks
    them and hands each its spec.
    """

    attention_norm: RMSNorm
    attention: RingAttention
    ffn_norm: RMSNorm
    ffn: BlockwiseFFN
    d_model: int = eqx.field(static=True)

    def __init__(self, attention: RingAttention, ffn: BlockwiseFFN, *, norm_eps: float = 1e-6):
        """**Arguments:**

        - `attention`: the block's [`RingAttention`][eqx_ring.RingAttention].
        - `ffn`: the block's [`BlockwiseFFN`][eqx_ring.BlockwiseFFN], of the same `d_model`.
        - `norm_eps`: epsilon of the block's two [`RMSNorm`][eqx_ring.RMSNorm]s (default `1e-6`).

        **Raises:**

        `ValueError` if `attention.d_model != ffn.d_model`.
        """
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
        spec: AttentionSpec | None = None,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """**Arguments:**

        - `x`: the sequence, `[seq, d_model]`, in the spec's layout order.
        - `spec`: the [`AttentionSpec`][eqx_ring.AttentionSpec] (its tuning's `ffn_chunk_size`
          chunks the FFN); default `None`: `AttentionSpec()`.
        - `positions`: `[seq]` RoPE positions; default `None`: the true position of each slot. See
          [`RingAttention.__call__`][eqx_ring.RingAttention.__call__].
        - `segment_ids`: `[seq]` packed-sequence ids; default `None`: one segment.
        - `key`: a `jax.random` key for the spec's attention dropout (see
          [`RingAttention.__call__`][eqx_ring.RingAttention.__call__]); default `None`.
        - `inference`: `True` turns dropout off for this call; default `None`: the spec's applies.

        **Returns:**

        The block's output, `[seq, d_model]`, like `x`.
        """
        with jax.named_scope("eqx_ring.RingTransformerBlock"):
            return self._prefill(x, spec, positions, segment_ids, key, inference)[0]

    def prefill(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        spec: AttentionSpec | None = None,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq {self.d_model}"], Float[Array, "seq kv_heads head_dim"],
               Float[Array, "seq kv_heads head_dim"]]:
        """The block's output and its attention's keys and values.

        See [`RingAttention.prefill`][eqx_ring.RingAttention.prefill].

        **Arguments:**

        - `x`: the sequence, `[seq, d_model]`, in the spec's layout order.
        - `spec`: the [`AttentionSpec`][eqx_ring.AttentionSpec]; default `None`: `AttentionSpec()`.
        - `positions`: `[seq]` RoPE positions; default `None`: the true position of each slot.
        - `segment_ids`: `[seq]` packed-sequence ids; default `None`: one segment.

        **Returns:**

        `(output, keys, values)`: the block's output `[seq, d_model]` and its attention's keys
        (after RoPE) and values, `[seq, kv_heads, head_dim]` each.
        """
        return self._prefill(x, spec, positions, segment_ids, None, True)

    def _prefill(self, x, spec, positions, segment_ids, key, inference: bool | None):
        """`prefill`, with the attention's dropout unless in inference mode (see `RingAttention._prefill`)."""
        spec = AttentionSpec() if spec is None else spec
        attended, keys, values = self.attention._prefill(self.attention_norm(x), spec, positions, segment_ids, key,
                                                         inference)
        x = x + attended
        return x + self.ffn(self.ffn_norm(x), chunk_size=spec.tuning.ffn_chunk_size), keys, values

    def decode_step(
        self,
        x: Float[Array, " {self.d_model}"],
        keys: Float[Array, "cache kv_heads head_dim"],
        values: Float[Array, "cache kv_heads head_dim"],
        segment_ids: Int[Array, " cache"],
        *,
        index: Int[Array, ""],
        position: Int[Array, ""],
        segment: Int[Array, ""],
        spec: AttentionSpec | None = None,
    ) -> tuple[Float[Array, " {self.d_model}"], Float[Array, "cache kv_heads head_dim"],
               Float[Array, "cache kv_heads head_dim"]]:
        """One new token through the block over a KV cache.

        See [`RingAttention.decode_step`][eqx_ring.RingAttention.decode_step].

        **Arguments:**

        - `x`: the new token's input, `[d_model]`.
        - `keys`: this block's cached keys, `[cache, kv_heads, head_dim]`, in layout order.
        - `values`: this block's cached values, `[cache, kv_heads, head_dim]`.
        - `segment_ids`: `[cache]`, the cached tokens' segments.
        - `index`: scalar int, the token's natural-order index (keyword only, like the three below).
        - `position`: scalar int, its RoPE position.
        - `segment`: scalar int, its segment id.
        - `spec`: the [`AttentionSpec`][eqx_ring.AttentionSpec] the cache was prefilled with;
          default `None`: `AttentionSpec()`.

        **Returns:**

        `(output, keys, values)`: the block's output `[d_model]` and the updated cache,
        `[cache, kv_heads, head_dim]` each.
        """
        spec = check_spec(spec, self.attention.num_heads, self.attention.num_kv_heads, self.attention.head_dim)
        return self._decode_step(self.attention.decode_step, x, keys, values, segment_ids, index=index,
                                 position=position, segment=segment, spec=spec)

    def _decode_step(self, attend, x, keys, values, segment_ids, *, index, position, segment, spec):
        """`decode_step` with `attend` as the attention's step (its checked or unchecked one)."""
        attended, keys, values = attend(self.attention_norm(x), keys, values, segment_ids, index=index,
                                        position=position, segment=segment, spec=spec)
        x = x + attended
        return x + self.ffn(self.ffn_norm(x[None]))[0], keys, values


class KVCache(eqx.Module):
    """Keys and values of every layer for a sequence whose first `length` tokens are known.

    Made by [`RingTransformer.prefill`][eqx_ring.RingTransformer.prefill] and advanced by
    [`RingTransformer.decode_step`][eqx_ring.RingTransformer.decode_step]; one example (batch
    with `jax.vmap`). Its slots are in the model's `layout` and, with a mesh, split over the
    sequence axis like the prefilled sequence: each device keeps the cache of its own tokens.
    `segment_ids` are the tokens' segments; the next token takes RoPE `position` and continues
    `segment`. These two are scalars so that a step never reads the split arrays at an index
    (which would gather them).

    **Arguments:**

    - `keys`: every layer's cached keys (after RoPE), `[layers, cache, kv_heads, head_dim]`, in
      layout order.
    - `values`: every layer's cached values, `[layers, cache, kv_heads, head_dim]`.
    - `segment_ids`: `[cache]` int32, each slot's segment id (layout order).
    - `length`: scalar int32, how many tokens (natural order) are known: the next token's index.
    - `position`: scalar int32, the next token's RoPE position.
    - `segment`: scalar int32, the next token's segment id.
    """

    keys: Float[Array, "layers cache kv_heads head_dim"]
    values: Float[Array, "layers cache kv_heads head_dim"]
    segment_ids: Int[Array, " cache"]
    length: Int[Array, ""]
    position: Int[Array, ""]
    segment: Int[Array, ""]


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
    [`prefill`][eqx_ring.RingTransformer.prefill] and
    [`decode_step`][eqx_ring.RingTransformer.decode_step] generate with a [`KVCache`][eqx_ring.KVCache].

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import eqx_ring

    model = eqx_ring.RingTransformer(vocab_size=64, d_model=32, num_layers=2, num_heads=4, key=jax.random.key(0))
    tokens = jnp.arange(16) % 64  # [seq]
    labels = jnp.roll(tokens, -1)  # next tokens (the last one's is meaningless: mask it out)
    mask = jnp.arange(16) < 15

    @eqx.filter_jit
    def losses(model, tokens, labels, mask):
        hidden = model(tokens)  # [seq, d_model]: final hidden states, not logits
        loss = eqx_ring.chunked_cross_entropy(hidden, model.head_weight, labels, mask, vocab_chunk_size=16)
        logits = model.logits(hidden)  # [seq, vocab_size]: fine for short sequences
        ref = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        return loss, (ref * mask).sum() / mask.sum()

    loss, ref = losses(model, tokens, labels, mask)
    assert jnp.allclose(loss, ref, atol=1e-5)
    ```
    """

    # Logical axes for eqx_ring.sharding (see DEFAULT_RULES); the blocks' layers declare their own.
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "embedding.weight": ("vocab", "embed"), "lm_head.weight": ("vocab", "embed"),
    }

    embedding: eqx.nn.Embedding
    blocks: RingTransformerBlock | tuple[RingTransformerBlock, ...]
    norm: RMSNorm
    lm_head: eqx.nn.Linear | None
    spec: AttentionSpec = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)
    remat_policy: str | None = eqx.field(static=True)
    offload_residuals: bool = eqx.field(static=True)

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        *,
        spec: AttentionSpec | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        use_sinks: bool = False,
        hidden_size: int | None = None,
        activation: str = "swiglu",
        tie_embeddings: bool = False,
        scan_layers: bool = True,
        remat_policy: str | None = "nothing_saveable",
        offload_residuals: bool = False,
        norm_eps: float = 1e-6,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        The model takes its settings once, as `spec`, and its dimensions; the blocks hold only
        parameters and dimensions, and receive the spec at every call.

        - `vocab_size`: number of token ids.
        - `d_model`: width of the residual stream.
        - `num_layers`: number of blocks.
        - `num_heads`: query heads per block.
        - `spec`: the [`AttentionSpec`][eqx_ring.AttentionSpec] every block attends with (masks,
          RoPE, layout, mesh, kernel tuning); default `None`: `AttentionSpec()` (causal, RoPE, one
          device). Replace it later with [`with_spec`][eqx_ring.RingTransformer.with_spec], or the
          tuning alone per call (`tuning=`).
        - `num_kv_heads`: key/value heads (GQA); defaults to `num_heads`.
        - `head_dim`: width of each head; defaults to `d_model // num_heads`.
        - `qkv_bias`: biases on the query, key and value projections (Qwen2's); default `False`.
        - `use_sinks`: a learnable sink logit per query head in every block (gpt-oss's); default
          `False`. See [`RingAttention`][eqx_ring.RingAttention].
        - `hidden_size`: the FFN's hidden width; defaults to `4 * d_model`.
        - `activation`: the FFN's activation, `"swiglu"` (default) or `"gelu"`.
        - `tie_embeddings`: use the embedding matrix as the LM head (default `False`).
        - `scan_layers`: stack the blocks and `lax.scan` over them (default `True`).
        - `remat_policy`: a name in `jax.checkpoint_policies` (one of
          `"nothing_saveable"`, `"dots_saveable"`, `"dots_with_no_batch_dims_saveable"`,
          `"everything_saveable"`), or `None` for no rematerialisation.
          Default `"nothing_saveable"`.
        - `offload_residuals`: keep what the backward pass needs of each block, its input (with
          `remat_policy="nothing_saveable"`, the only residual), in the host's pinned memory
          instead of the accelerator's, fetched back when the block's backward runs
          (`jax.checkpoint_policies.save_and_offload_only_these_names`). Default `False`. The
          results are the same; what it saves is the accelerator memory of `num_layers` inputs.
          Needs `remat_policy="nothing_saveable"` and a backend with a `"pinned_host"` memory
          (GPU, TPU; the CPU backend accepts it, with host and device memory the same).
        - `norm_eps`: the RMSNorms' epsilon (default `1e-6`).
        - `dtype`: parameter dtype; defaults to float32 (the RMSNorm scales are always float32).
        - `key`: a `jax.random.PRNGKey` for the initialisation.

        **Raises:**

        `ValueError` if `vocab_size`, `d_model`, `num_layers`, `num_heads` or `hidden_size` is not
        a positive int, `norm_eps` is negative or not finite, `remat_policy` is unknown or
        `offload_residuals` is asked for without `remat_policy="nothing_saveable"`, the head
        sizes are invalid (see [`RingAttention`][eqx_ring.RingAttention]) or do not suit `spec`
        (RoPE needs an even `head_dim`; `spec.head_axis` must divide `num_kv_heads`), or the FFN
        arguments are invalid (see [`BlockwiseFFN`][eqx_ring.BlockwiseFFN]); `TypeError` if
        `spec` is not an `AttentionSpec`.
        """
        # Checked before anything is built: a bad size otherwise fails deep inside the initialisation.
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("num_layers", num_layers),
                            ("num_heads", num_heads)):
            _positive_int(value, name)
        if hidden_size is not None:
            _positive_int(hidden_size, "hidden_size")
        if not (isinstance(norm_eps, numbers.Real) and 0 <= norm_eps < math.inf):
            raise ValueError(f"norm_eps must be a finite number >= 0, got {norm_eps!r}")
        ek, hk, bk = jax.random.split(key, 3)
        hidden_size = 4 * d_model if hidden_size is None else hidden_size

        def block(k):
            ak, fk = jax.random.split(k)
            attention = RingAttention(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                      qkv_bias=qkv_bias, use_sinks=use_sinks, dtype=dtype, key=ak)
            ffn = BlockwiseFFN(d_model, hidden_size, activation=activation, dtype=dtype, key=fk)
            return RingTransformerBlock(attention, ffn, norm_eps=norm_eps)

        keys = jax.random.split(bk, num_layers)
        self.blocks = eqx.filter_vmap(block)(keys) if scan_layers else tuple(block(k) for k in keys)
        self.embedding = eqx.nn.Embedding(vocab_size, d_model, dtype=dtype, key=ek)
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = None if tie_embeddings else eqx.nn.Linear(d_model, vocab_size, use_bias=False, dtype=dtype,
                                                                 key=hk)
        self.spec = AttentionSpec() if spec is None else spec
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.num_layers = num_layers
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.offload_residuals = offload_residuals

    def __check_init__(self):
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be None or one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.offload_residuals and self.remat_policy != "nothing_saveable":
            raise ValueError(f"offload_residuals=True offloads each block's input, the one residual of "
                             f"remat_policy='nothing_saveable'; got remat_policy={self.remat_policy!r}")
        attention = (self.blocks if self.scan_layers else self.blocks[0]).attention
        check_spec(self.spec, attention.num_heads, attention.num_kv_heads, attention.head_dim)

    def with_spec(self, spec: AttentionSpec) -> "RingTransformer":
        """The same model (the same arrays, nothing copied or moved) run with another spec.

        E.g. `model.with_spec(model.spec.replace(mesh=None))` for a one-device copy, or another
        `layout` or `rope_theta`. A spec changes no parameter, so any spec the head sizes suit works.

        **Arguments:**

        - `spec`: the new [`AttentionSpec`][eqx_ring.AttentionSpec].

        **Returns:** a `RingTransformer` with `spec` and this model's parameters.

        **Raises:** `TypeError` / `ValueError` as the constructor, if `spec` is not an
        `AttentionSpec` or does not suit the head sizes.
        """
        # `spec` is a static field, which eqx.tree_at cannot replace: rebuild the node from its fields, as
        # Equinox's own unflattening does.
        new = object.__new__(type(self))
        for field in dataclasses.fields(self):
            object.__setattr__(new, field.name, spec if field.name == "spec" else getattr(self, field.name))
        new.__check_init__()
        return new

    def _spec(self, tuning: KernelTuning | None) -> AttentionSpec:
        """The model's spec, with `tuning` in place of its own when one is given."""
        if tuning is None:
            return self.spec
        if not isinstance(tuning, KernelTuning):
            raise TypeError(f"tuning must be an eqx_ring.KernelTuning or None, got {type(tuning).__name__}")
        return self.spec.replace(tuning=tuning)

    @property
    def head_weight(self) -> Float[Array, "{self.vocab_size} {self.d_model}"]:
        """The LM head's `[vocab_size, d_model]` matrix (the embedding's when tied).

        **Returns:**

        `[vocab_size, d_model]`: pass it to [`chunked_cross_entropy`][eqx_ring.chunked_cross_entropy].
        """
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        tuning: KernelTuning | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """**Arguments:**

        - `tokens`: `[seq]` token ids, in the spec's layout order (see
          [`to_layout`][eqx_ring.to_layout]). With a mesh, `seq` must split over `seq_axis`.
        - `positions`: `[seq]` RoPE positions, in the same order; default `None`: the true position
          of each slot. See [`RingAttention.__call__`][eqx_ring.RingAttention.__call__].
        - `segment_ids`: `[seq]` packed-sequence ids; tokens attend only within their own id.
          Default `None`: one segment.
        - `tuning`: a [`KernelTuning`][eqx_ring.KernelTuning] to run this call with instead of
          `spec.tuning` (chunk sizes, kernel); default `None`: the spec's.
        - `key`: a `jax.random` key for the spec's attention `dropout`, split over the layers;
          needed when it is not 0, unless `inference=True`. Default `None`.
        - `inference`: `True` turns dropout off for this call (Equinox's convention); default
          `None`: the spec's `dropout` applies.

        **Returns:**

        The final (normalised) hidden states, `[seq, d_model]`, in layout order. Not logits: see
        [`logits`][eqx_ring.RingTransformer.logits] and
        [`chunked_cross_entropy`][eqx_ring.chunked_cross_entropy].

        **Raises:**

        `TypeError` if `tokens`, `positions` or `segment_ids` are not integers; `ValueError` if
        `tokens` is not one-dimensional or `positions`/`segment_ids` are not shaped like it, or if
        a token id is outside `[0, vocab_size)` (the message names the first one and its index).
        Traced tokens (inside `jit`) cannot raise: a bad id's embedding is NaN, so the outputs it
        reaches and any loss over them are NaN ([`models.train`][models.train] stops on a NaN loss
        and says so).
        """
        with jax.named_scope("eqx_ring.RingTransformer"):
            bad = self._check_inputs(tokens, positions, segment_ids)
            return self._layers(tokens, positions, segment_ids, self._spec(tuning), with_cache=False, bad=bad,
                                key=key, inference=inference)[0]

    def prefill(
        self,
        tokens: Int[Array, " seq"],
        *,
        length: int | Int[Array, ""],
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        tuning: KernelTuning | None = None,
    ) -> tuple[Float[Array, "seq {self.d_model}"], KVCache]:
        """Run a prompt through the model (the ring, on a mesh) and keep every layer's keys and values.

        **Arguments:**

        - `tokens`: `[seq]`, the whole sequence to be, in `layout` order as for `__call__`: the
          prompt's `length` tokens, then room for those to be generated (any ids; they are
          overwritten). Its length is the cache's size.
        - `length`: how many tokens (natural order) the prompt has, an int or a scalar int array
          (keyword only); at least 1.
        - `positions`: `[seq]` RoPE positions, as for `__call__`; default `None`: the true position
          of each slot.
        - `segment_ids`: `[seq]` segment ids, as for `__call__`; default `None`: all zeros. Give the
          room after the prompt a segment id of its own, so that the ring skips it.
        - `tuning`: a [`KernelTuning`][eqx_ring.KernelTuning] for this call, as for `__call__`.

        **Returns:**

        `(hidden, cache)`: final hidden states of every slot, `[seq, d_model]` in layout order
        (those of the prompt's last token give the first new token's logits), and a
        [`KVCache`][eqx_ring.KVCache] whose next token has index `length`, the position after the
        prompt's last token and its segment.

        Inside a caller's `jax.shard_map` over `seq_axis`, `tokens` (and `positions`, `segment_ids`)
        are the local shard, as for `__call__`; the cache then holds this device's slots and its
        size is the whole sequence's.

        **Raises:**

        `ValueError` unless the attention is causal with `causal_block_size=1`, or if `length` is
        not in `[1, cache size]`; `TypeError`/`ValueError` for bad `tokens`, `positions` or
        `segment_ids`, as for `__call__` (traced bad tokens give NaN, as there). A traced `length` is
        checked by `eqx.error_if`, raising `equinox.EquinoxRuntimeError` when the computation runs.
        """
        self._check_decodable()
        with jax.named_scope("eqx_ring.RingTransformer.prefill"):
            bad = self._check_inputs(tokens, positions, segment_ids)
            spec = self._spec(tuning)
            seq, layout, seq_axis = tokens.shape[0], spec.layout, spec.sequence_axes
            # Inside a caller's shard_map (its manual axes) `tokens` is this device's shard of the sequence.
            inside = inside_shard_map(spec)
            ring = lax.axis_size(seq_axis) if inside else spec.ring_size
            size = seq * ring if inside else seq
            length = _check_length(length, size)
            if positions is None:
                positions = (shard_positions(lax.axis_index(seq_axis), seq, layout, ring) if inside
                             else jnp.asarray(layout_positions(seq, layout, ring)))
            segment_ids = jnp.zeros(seq, jnp.int32) if segment_ids is None else segment_ids
            hidden, keys, values = self._layers(tokens, positions, segment_ids, spec, with_cache=True, bad=bad)
            last = layout_slot(length - 1, size, layout, ring)

            def at_last(a):
                a = a.astype(jnp.int32)
                if not inside:
                    return a[last]
                # One device holds the prompt's last token: every device takes its value from there.
                owner, slot = last // seq, last % seq
                return lax.psum(jnp.where(lax.axis_index(seq_axis) == owner, a[slot], 0), seq_axis)

            cache = KVCache(keys, values, segment_ids.astype(jnp.int32), length, at_last(positions) + 1,
                            at_last(segment_ids))
            return hidden, cache

    def decode_step(self, token: Int[Array, ""], cache: KVCache) -> tuple[Float[Array, " {self.d_model}"], KVCache]:
        """Append `token` to the sequence in `cache`: its final hidden state, and the cache with it.

        The token takes the next RoPE position and the segment of the token before it, and sees
        the cached tokens exactly as a causal pass over the whole sequence would (sliding window
        and GQA included), at O(cache / devices) work per device and layer. The cache has a fixed
        size: decode at most `cache - length` tokens.

        **Arguments:**

        - `token`: scalar int, the id of the token at index `cache.length`.
        - `cache`: the [`KVCache`][eqx_ring.KVCache] from [`prefill`][eqx_ring.RingTransformer.prefill]
          or a previous `decode_step`.

        **Returns:**

        `(hidden, cache)`: the token's final hidden state, `[d_model]` (`logits(hidden)` predicts the
        next token), and the cache with the token's keys, values and segment written and
        `length`/`position` advanced by one.

        **Raises:**

        `ValueError` unless the attention is causal with `causal_block_size=1`, if it has a
        `head_axis`, if called inside a `shard_map` over `seq_axis` (a step runs in the global view:
        the model's mesh keeps the cache split), if `token` is not a scalar id in `[0, vocab_size)`
        (`TypeError` if not an integer), or if the cache is full (`cache.length` equals its size).
        Traced, the id and the cache's length are checked together by one `eqx.branched_error_if`,
        which raises an `equinox.EquinoxRuntimeError` when the computation runs (`EQX_ON_ERROR=off`
        removes it).
        """
        self._check_decodable()
        seq_axis = self.spec.sequence_axes
        if inside_shard_map(self.spec):
            # The step computes which slot is the token's from the whole cache's layout, not a shard's.
            raise ValueError(f"decode_step runs in the global view: call it outside a shard_map over "
                             f"seq_axis={seq_axis!r} (with a mesh, the cache stays split over it)")
        with jax.named_scope("eqx_ring.RingTransformer.decode_step"):
            size, layout, ring = cache.segment_ids.shape[0], self.spec.layout, self.spec.ring_size
            token = jnp.asarray(token) if isinstance(token, numbers.Number) else token
            if jnp.ndim(token) != 0:
                raise ValueError(f"token must be a scalar id (batch with jax.vmap), got shape {jnp.shape(token)}")
            full = f"the cache is full: cache.length must be < {size} (its slots) to append a token"
            if _on_host(token, cache.length):
                check_ids(token, self.vocab_size, "token")
                if int(cache.length) >= size:
                    raise ValueError(f"{full}, got cache.length={int(cache.length)}")
                index = cache.length
            else:
                if not jnp.issubdtype(token.dtype, jnp.integer):
                    raise TypeError(f"token must be an integer id, got dtype {token.dtype}")
                is_full = cache.length >= size
                # One check for both, so that a decoding loop pays for one conditional per step.
                token, index = eqx.branched_error_if(
                    (token, cache.length), is_full | (token < 0) | (token >= self.vocab_size),
                    is_full.astype(jnp.int32), [_ids_message("token", self.vocab_size), full])
            position, segment = cache.position, cache.segment
            x = self.embedding.weight[token]

            def layer(x, block, keys, values):
                # The index was checked once above, so each layer takes the attention's unchecked step.
                return block._decode_step(block.attention._decode_step, x, keys, values, cache.segment_ids,
                                          index=index, position=position, segment=segment, spec=self.spec)

            if self.scan_layers:
                params, static = eqx.partition(self.blocks, eqx.is_array)

                def body(x, inputs):
                    p, keys, values = inputs
                    x, keys, values = layer(x, eqx.combine(p, static), keys, values)
                    return x, (keys, values)

                x, (keys, values) = lax.scan(body, x, (params, cache.keys, cache.values))
            else:
                outs = []
                for block, k, v in zip(self.blocks, cache.keys, cache.values, strict=True):
                    x, k, v = layer(x, block, k, v)
                    outs.append((k, v))
                keys, values = (jnp.stack(a) for a in zip(*outs, strict=True))
            # Elementwise against the layout's positions: each device updates its own slots.
            mine = jnp.asarray(layout_positions(size, layout, ring)) == index
            cache = KVCache(keys, values, jnp.where(mine, segment, cache.segment_ids), index + 1, position + 1,
                            segment)
            return self.norm(x[None])[0], cache

    def _check_inputs(self, tokens, positions, segment_ids):
        """Checks (see `__call__`'s **Raises:**); shapes and dtypes cost nothing at run time. Returns
        [`check_ids`][]'s marks of traced bad tokens (`None` when known to be good)."""
        if jnp.ndim(tokens) != 1:
            raise ValueError(f"tokens must be [seq] (one example: batch with jax.vmap), got shape {jnp.shape(tokens)}")
        for name, a in (("positions", positions), ("segment_ids", segment_ids)):
            if a is None:
                continue
            if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
                raise TypeError(f"{name} must be integers, got dtype {jnp.result_type(a)}")
            if jnp.shape(a) != jnp.shape(tokens):
                raise ValueError(f"{name} must be shaped like tokens, {jnp.shape(tokens)}, got {jnp.shape(a)}")
        return check_ids(tokens, self.vocab_size, "tokens")

    def _check_decodable(self) -> None:
        causal, block = self.spec.causal, self.spec.causal_block_size
        if not causal or block != 1:
            # With blocks, earlier tokens of a block see later ones: a new token would change them.
            raise ValueError(f"KV-cache decoding needs causal attention with causal_block_size=1, got causal={causal}, "
                             f"causal_block_size={block}")

    def _layers(self, tokens, positions, segment_ids, spec: AttentionSpec, *, with_cache: bool, bad=None, key=None,
                inference: bool | None = True):
        """The embedding, every block and the final norm; with the blocks' keys and values if `with_cache`.

        `bad` marks token ids outside the vocabulary: their embeddings are NaN (see `check_ids`). `key` (one per
        layer after a split) and `inference` drive the attention dropout."""
        x = jnp.take(self.embedding.weight, tokens, axis=0, mode="clip")
        if bad is not None:
            x = jnp.where(bad[:, None], jnp.nan, x)

        offload = self.offload_residuals and not with_cache

        def layer(x, block, key):
            if offload:
                x = checkpoint_name(x, _BLOCK_INPUT)
            y, keys, values = block._prefill(x, spec, positions, segment_ids, key, inference)
            return y, ((keys, values) if with_cache else None)

        if offload:
            kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
            if "pinned_host" not in kinds:
                raise ValueError(f"offload_residuals=True moves residuals to the 'pinned_host' memory, which the "
                                 f"{jax.default_backend()} backend lacks (its memories: {sorted(kinds)}); use "
                                 "offload_residuals=False here")
            policy = jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=(), names_which_can_be_offloaded=(_BLOCK_INPUT,), offload_src="device",
                offload_dst="pinned_host")
            layer = eqx.filter_checkpoint(layer, policy=policy)
        elif self.remat_policy is not None and not with_cache:
            layer = eqx.filter_checkpoint(layer, policy=getattr(jax.checkpoint_policies, self.remat_policy))
        keys = [None] * self.num_layers if key is None else jax.random.split(key, self.num_layers)
        if self.scan_layers:
            params, static = eqx.partition(self.blocks, eqx.is_array)
            x, kv = lax.scan(lambda x, pk: layer(x, eqx.combine(pk[0], static), pk[1]), x,
                             (params, None if key is None else keys))
        else:
            kvs = []
            for block, block_key in zip(self.blocks, keys, strict=True):
                x, kv = layer(x, block, block_key)
                kvs.append(kv)
            kv = tuple(jnp.stack(a) for a in zip(*kvs, strict=True)) if with_cache else None
        x = self.norm(x)
        return (x, *kv) if with_cache else (x,)

    def logits(self, hidden: Float[Array, "*batch {self.d_model}"]) -> Float[Array, "*batch {self.vocab_size}"]:
        """Project hidden states to logits (materialises `[*batch, vocab_size]`).

        **Arguments:**

        - `hidden`: `[*batch, d_model]`, e.g. the output of `__call__` or `decode_step`.

        **Returns:**

        `hidden @ head_weight.T`, `[*batch, vocab_size]`.
        """
        return hidden @ self.head_weight.T


def chunked_cross_entropy(
    hidden: Float[Array, "*batch d_model"],
    head_weight: Float[Array, "vocab d_model"],
    labels: Int[Array, "*batch"],
    mask: Bool[Array, "*batch"] | Real[Array, "*batch"] | None = None,
    *,
    vocab_chunk_size: int = 8192,
    reduction: str = "mean",
) -> Float[Array, ""] | Float[Array, "*batch"]:
    """Mean cross-entropy of the logits `hidden @ head_weight.T` against `labels`, over `mask`.

    The vocabulary is processed `vocab_chunk_size` rows of `head_weight` at a time with an online
    log-sum-exp, each chunk under `jax.checkpoint`, so neither pass ever holds more than
    `[*batch, vocab_chunk_size]` logits. Logits are accumulated in float32. `labels` are taken as
    they are: for next-token prediction, pass labels already shifted by one (in layout order, like
    `hidden`).

    **Arguments:**

    - `hidden`: final hidden states, `[*batch, d_model]`, any leading dims (e.g. `[batch, seq]`).
    - `head_weight`: the `[vocab, d_model]` output matrix
      ([`RingTransformer.head_weight`][eqx_ring.RingTransformer.head_weight]).
    - `labels`: `[*batch]` target ids in `[0, vocab)`, shaped like `hidden` without its last axis.
    - `mask`: `[*batch]`, which tokens count (bool or 0/1 weights); all of them when `None` (default).
    - `vocab_chunk_size`: rows of `head_weight` per chunk (default 8192; capped at `vocab`); the
      vocabulary is padded to a multiple.
    - `reduction`: `"mean"` (default), or `"none"` for the float32 per-token losses `[*batch]`
      (times `mask` when given), e.g. to weigh several masks from one pass over the vocabulary.

    **Returns:**

    `sum(mask * loss) / max(sum(mask), 1)`, a float32 scalar; per-token losses `[*batch]` with
    `reduction="none"`.

    **Raises:**

    `ValueError` if `reduction` is neither `"mean"` nor `"none"`, `vocab_chunk_size` is not a
    positive int, the shapes disagree (`labels` and `mask` must be `hidden`'s without its last
    axis, `head_weight`'s width `hidden`'s), or a label that counts (nonzero `mask`) is outside
    `[0, vocab)` (the message names the first one and its index); `TypeError` if `labels` are not
    integers. Traced labels (inside `jit`) cannot raise: the loss of a bad label that counts is
    NaN, and so is the mean. Labels where `mask` is zero may be anything (e.g. padding ids).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    _positive_int(vocab_chunk_size, "vocab_chunk_size")
    batch = hidden.shape[:-1]
    if head_weight.ndim != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_weight must be [vocab, d_model={hidden.shape[-1]}] (hidden's width), "
                         f"got shape {head_weight.shape}")
    vocab, d = head_weight.shape
    for name, a in (("labels", labels), ("mask", mask)):
        if a is not None and jnp.shape(a) != batch:
            raise ValueError(f"{name} must be shaped like hidden without its last axis, {batch}, got {jnp.shape(a)}")
    bad = check_ids(labels, vocab, "labels", mask)
    labels = labels.astype(jnp.int32)
    chunk = min(vocab_chunk_size, vocab)
    num_chunks = -(-vocab // chunk)
    weight = jnp.pad(head_weight, ((0, num_chunks * chunk - vocab), (0, 0))).reshape(num_chunks, chunk, d)

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
    if bad is not None:
        loss = jnp.where(bad, jnp.nan, loss)
    weights = jnp.ones(batch, jnp.float32) if mask is None else mask.astype(jnp.float32)
    if reduction == "none":
        return loss * weights
    return (loss * weights).sum() / jnp.maximum(weights.sum(), 1.0)
