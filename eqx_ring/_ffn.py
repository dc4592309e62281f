"""`BlockwiseFFN` and `RMSNorm`: the position-wise layers of a blockwise transformer."""

import math
import numbers
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

from ._buffers import zeros_after
from ._checks import check_array, check_positive_int

ACTIVATIONS = ("swiglu", "gelu")


class BlockwiseFFN(eqx.Module):
    """The feed-forward network applied to `chunk_size` tokens at a time under `jax.checkpoint`.

    Equal to the plain FFN in value and gradient, but the `[seq, hidden_size]` activations never
    exist at once: the forward pass keeps one chunk's, and the backward pass recomputes each chunk
    from its input. Peak activation memory is O(chunk_size · hidden_size) instead of
    O(seq · hidden_size) (`benchmarks/ffn_memory.py` measures it).

    - `"swiglu"`: `down(silu(gate(x)) * up(x))` (LLaMA).
    - `"gelu"`: `down(gelu(up(x)))` with the exact (erf) GELU.

    Like every Equinox layer it takes one example, `[seq, d_model]`; batch it with `jax.vmap`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_ring

    ffn = eqx_ring.BlockwiseFFN(16, 64, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (32, 16))  # [seq, d_model]: 4 chunks of 8 tokens
    assert jnp.allclose(ffn(x, chunk_size=8), ffn.dense(x), atol=1e-5)
    ```
    """

    # Logical axes for eqx_ring.sharding (see DEFAULT_RULES): weights are [out, in].
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "gate_proj.weight": ("mlp", "embed"), "gate_proj.bias": ("mlp",),
        "up_proj.weight": ("mlp", "embed"), "up_proj.bias": ("mlp",),
        # The d_model-wide bias is added to an output whose d_model is whole: it stays whole.
        "down_proj.weight": ("embed", "mlp"), "down_proj.bias": (None,),
    }

    gate_proj: eqx.nn.Linear | None
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear
    d_model: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        hidden_size: int,
        *,
        activation: str = "swiglu",
        use_bias: bool = False,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: width of the input and output.
        - `hidden_size`: width of the hidden layer.
        - `activation`: `"swiglu"` or `"gelu"`.
        - `use_bias`: whether the projections have biases.
        - `dtype`: parameter dtype; defaults to float32.
        - `key`: a `jax.random.PRNGKey` for the initialisation.

        **Raises:**

        `ValueError` if `d_model` or `hidden_size` is not a positive int, or if `activation` is unknown.
        """
        # Sizes are checked before they size the projections (0 or less fails inside JAX otherwise).
        check_positive_int("d_model", d_model)
        check_positive_int("hidden_size", hidden_size)
        gk, uk, dk = jax.random.split(key, 3)
        self.gate_proj = (
            eqx.nn.Linear(d_model, hidden_size, use_bias=use_bias, dtype=dtype, key=gk)
            if activation == "swiglu"
            else None
        )
        self.up_proj = eqx.nn.Linear(d_model, hidden_size, use_bias=use_bias, dtype=dtype, key=uk)
        self.down_proj = eqx.nn.Linear(hidden_size, d_model, use_bias=use_bias, dtype=dtype, key=dk)
        self.d_model = d_model
        self.hidden_size = hidden_size
        self.activation = activation

    def __check_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    def dense(self, x: Float[Array, "tokens {self.d_model}"]) -> Float[Array, "tokens {self.d_model}"]:
        """The plain (unchunked) FFN: what `__call__` computes, with every activation at once.

        **Arguments:**

        - `x`: `[tokens, d_model]`, any number of tokens.

        **Returns:**

        `[tokens, d_model]`, like `x`. The `[tokens, hidden_size]` activations are all materialised.

        **Raises:**

        `ValueError` if `x` is not `[tokens, d_model]`; `TypeError` if it is not floating.
        """
        check_array("x", x, (None, self.d_model), ("tokens", "d_model"))
        up = jax.vmap(self.up_proj)(x)
        if self.gate_proj is None:
            hidden = jax.nn.gelu(up, approximate=False)
        else:
            hidden = jax.nn.silu(jax.vmap(self.gate_proj)(x)) * up
        return jax.vmap(self.down_proj)(hidden)

    def __call__(
        self,
        x: Float[Array, "seq {self.d_model}"],
        *,
        chunk_size: int = 2048,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq {self.d_model}"]:
        """**Arguments:**

        - `x`: the sequence, `[seq, d_model]`; `seq` must be a multiple of `chunk_size` (or at most
          `chunk_size`). Chunk `i` holds the tokens `i, i + m, i + 2m, ...` where `m` is the number
          of chunks, so a sequence split over a mesh splits every chunk evenly with it.
        - `chunk_size`: tokens per chunk (default 2048; a longer chunk is shortened to the
          sequence, and a single chunk is simply the plain FFN, keeping its activations). Tuning,
          not a parameter: a [`RingTransformer`][eqx_ring.RingTransformer] passes its
          [`KernelTuning.ffn_chunk_size`][eqx_ring.KernelTuning]. Over a mesh each chunk is spread
          evenly across the sequence's devices, so a device holds `chunk_size / devices` tokens'
          activations.
        - `key`: unused (there is no dropout); accepted for Equinox compatibility.
        - `inference`: unused, likewise.

        **Returns:**

        `[seq, d_model]`, like `x`: equal to [`dense`][eqx_ring.BlockwiseFFN.dense]`(x)`.

        **Raises:**

        `ValueError` if `x` is not `[seq, d_model]` (a batch needs `jax.vmap`), if `chunk_size` is
        not a positive int or does not divide `seq`; `TypeError` if `x` is not floating. (With
        jaxtyping's import hook on, its `TypeCheckError` names a wrong shape or dtype first.)
        """
        del key, inference
        with jax.named_scope("eqx_ring.BlockwiseFFN"):
            check_array("x", x, (None, self.d_model), ("seq", "d_model"))
            check_positive_int("chunk_size", chunk_size)
            seq, d = x.shape
            chunk = min(chunk_size, seq)
            if seq % chunk:
                raise ValueError(f"chunk_size={chunk} must divide the sequence length {seq}")
            # Chunk i takes tokens i, i + m, i + 2m, ... (m chunks): the loop runs over an axis that
            # is never sharded, and a sequence split over a mesh splits every chunk evenly with it.
            m = seq // chunk
            if m == 1:
                # One chunk is the plain FFN: autodiff keeps its activations (one chunk's, as promised) rather
                # than recomputing them, which had made a RingLM "small" train step (1,024-token rows) 1.15x slower
                # than before the in-place chunks (benchmarks/compare_trees.py).
                return self.dense(x)
            return _chunkwise(self, x.reshape(chunk, m, d)).reshape(seq, d)


@jax.custom_vjp
def _chunkwise(ffn: BlockwiseFFN, x: Float[Array, "chunk m d"]) -> Float[Array, "chunk m d"]:
    """`ffn.dense` of every chunk `x[:, j]`, written in place: the chunks are read where they lie.

    What it replaces, `lax.map(jax.checkpoint(ffn.dense), x.swapaxes(0, 1))`, copies the input into chunk
    order and the output back, and autodiff adds the same copies of the cotangent and a zeroed chunk-order
    gradient: three [seq, d_model] buffers held through a rematerialised layer's backward pass, 0.75 GiB a device
    at the million-token train step of `benchmarks/memory_floor.py`. Here the forward pass and the backward pass
    (which recomputes each chunk) touch one chunk's activations at a time and nothing else. Time on XLA:CPU, fwd+bwd
    at chunk 2048 and 32K tokens, side by side (`benchmarks/ffn_memory.py`): 1.04x the plain FFN, 1.05x the
    `lax.map` form, a difference of the size of that run's noise.
    """
    return _chunkwise_forward(ffn, x)[0]


def _chunkwise_forward(ffn: BlockwiseFFN, x):
    out_dtype = jax.eval_shape(ffn.dense, x[:, 0]).dtype

    def chunk(j, out):
        y = ffn.dense(lax.dynamic_index_in_dim(x, j, 1, keepdims=False))
        return lax.dynamic_update_index_in_dim(out, y, j, 1)

    out = lax.fori_loop(0, x.shape[1], chunk, zeros_after(x, x, dtype=out_dtype))
    return out, (ffn, x)


def _chunkwise_backward(residuals, dy):
    ffn, x = residuals

    def chunk(j, carry):
        d_ffn, dx = carry
        _, pullback = jax.vjp(BlockwiseFFN.dense, ffn, lax.dynamic_index_in_dim(x, j, 1, keepdims=False))
        d_ffn_j, dx_j = pullback(lax.dynamic_index_in_dim(dy, j, 1, keepdims=False))
        return jax.tree.map(jnp.add, d_ffn, d_ffn_j), lax.dynamic_update_index_in_dim(dx, dx_j, j, 1)

    zeros = (jax.tree.map(jnp.zeros_like, ffn), zeros_after((x, dy), x, dtype=x.dtype))
    return lax.fori_loop(0, x.shape[1], chunk, zeros)


_chunkwise.defvjp(_chunkwise_forward, _chunkwise_backward)


class RMSNorm(eqx.Module):
    """Root-mean-square normalisation over the last axis, computed in float32, with a learned scale.

    Unlike most Equinox layers it accepts any leading axes: `[*batch, dim]`.
    """

    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {"weight": ("norm",)}

    weight: Float[Array, " dim"]
    dim: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: DTypeLike | None = None):
        """**Arguments:**

        - `dim`: the normalised width (the last axis of the input).
        - `eps`: added to the mean square before the square root (default `1e-6`).
        - `dtype`: the scale's dtype; defaults to float32. The scale starts at ones.

        **Raises:**

        `ValueError` if `dim` is not a positive int or `eps` is not a finite number `>= 0`.
        """
        check_positive_int("dim", dim)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.weight = jnp.ones((dim,), dtype=jnp.float32 if dtype is None else dtype)
        self.dim = dim
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch {self.dim}"]) -> Float[Array, "*batch {self.dim}"]:
        """**Arguments:**

        - `x`: `[*batch, dim]`.

        **Returns:**

        `x / sqrt(mean(x²) + eps) * weight` over the last axis, `[*batch, dim]`, in `x`'s dtype.

        **Raises:**

        `ValueError` if the last axis of `x` is not `dim` wide; `TypeError` if `x` is not floating.
        """
        with jax.named_scope("eqx_ring.RMSNorm"):
            if x.ndim < 1 or x.shape[-1] != self.dim:
                raise ValueError(f"x must have shape [*batch, dim={self.dim}], got shape {x.shape}")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"x must have a floating dtype, got {x.dtype}")
            x32 = x.astype(jnp.float32)
            normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return (normed * self.weight.astype(jnp.float32)).astype(x.dtype)
