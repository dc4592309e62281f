"""`VideoVQ`: a VQ-VAE that turns each video frame into a grid of discrete codes and back."""

from dataclasses import dataclass
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from ._lm import require_float, require_int


@dataclass(frozen=True)
class VQConfig:
    """Hyperparameters of a [`VideoVQ`][models.VideoVQ]; JSON-serialisable (`dataclasses.asdict`).

    **Arguments:**

    - `frame_size`: the side of the square RGB frames, in pixels; `patch` must divide it.
    - `patch`: the side of the square pixel cells that each become one code.
    - `hidden`: the width of the encoder's and decoder's hidden layer.
    - `codebook_size`: how many codes there are.
    - `code_dim`: the width of each codebook vector.
    - `commitment`: β, the weight of the commitment loss in [`vq_loss`][models.vq_loss].

    **Raises:** `ValueError`, naming the field and its value, for a size or count that is not a
    positive int, a `patch` that does not divide `frame_size`, or a `commitment` that is not a
    finite float >= 0.
    """

    frame_size: int = 32
    patch: int = 4
    hidden: int = 128
    codebook_size: int = 64
    code_dim: int = 16
    commitment: float = 0.25

    def __post_init__(self):
        for name in ("frame_size", "patch", "hidden", "codebook_size", "code_dim"):
            require_int(self, name)
        if self.frame_size % self.patch:
            raise ValueError(f"VQConfig.frame_size={self.frame_size} must be divisible by patch={self.patch}")
        require_float(self, "commitment", low=0.0)

    @property
    def grid(self) -> int:
        """Codes per frame side: a frame becomes `grid × grid` codes.

        **Returns:** `frame_size // patch`, an `int`.
        """
        return self.frame_size // self.patch


class VQOutput(eqx.Module):
    """What [`VideoVQ.__call__`][models.VideoVQ.__call__] returns for one video.

    **Arguments:**

    - `reconstruction`: the decoded frames, `[frames, 3, size, size]` in `[-1, 1]` units (not clipped);
      the gradient reaches the encoder through the straight-through estimator.
    - `codes`: each cell's code, int `[frames, grid, grid]`.
    - `codebook_loss`: the mean squared distance from the (fixed) encoder outputs to their codebook
      vectors: it trains the codebook. A scalar.
    - `commitment_loss`: the same distance with the codebook vectors fixed: it trains the encoder.
      A scalar.
    """

    reconstruction: Float[Array, "frames 3 size size"]
    codes: Int[Array, "frames grid grid"]
    codebook_loss: Float[Array, ""]
    commitment_loss: Float[Array, ""]


class _Coder(eqx.Module):
    """Per-cell linear in, a residual 3 x 3 convolution over the code grid, ReLU, per-cell linear out."""

    # Logical axes for eqx_ring.sharding (see its DEFAULT_RULES): an FFN with a convolution in the
    # middle, placed like BlockwiseFFN (hidden channels over tp, the other side over fsdp). Weights
    # are [out, in] (the convolution's [out, in, height, width]); `out`'s bias, added where the
    # features are whole, stays whole like the row-parallel biases of the transformer.
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "into.weight": ("vq_hidden", "vq_embed"), "into.bias": ("vq_hidden",),
        "mix.weight": ("vq_hidden", "vq_hidden_in", "vq_window", "vq_window"),
        "mix.bias": ("vq_hidden", "vq_window", "vq_window"),
        "out.weight": ("vq_embed", "vq_hidden"), "out.bias": (None,),
    }

    into: eqx.nn.Linear
    mix: eqx.nn.Conv2d
    out: eqx.nn.Linear

    def __init__(self, d_in: int, hidden: int, d_out: int, key: PRNGKeyArray):
        ik, mk, ok = jax.random.split(key, 3)
        self.into = eqx.nn.Linear(d_in, hidden, key=ik)
        self.mix = eqx.nn.Conv2d(hidden, hidden, 3, padding=1, key=mk)
        self.out = eqx.nn.Linear(hidden, d_out, key=ok)

    def __call__(self, x: Float[Array, "grid grid d_in"]) -> Float[Array, "grid grid d_out"]:
        per_cell = jax.vmap(jax.vmap(self.into))
        h = jax.nn.relu(per_cell(x))
        h = h + jnp.moveaxis(self.mix(jnp.moveaxis(h, -1, 0)), 0, -1)
        return jax.vmap(jax.vmap(self.out))(jax.nn.relu(h))


class VideoVQ(eqx.Module):
    """A frame-wise VQ-VAE: patch encoder → nearest codebook vector per grid cell → patch decoder.

    Each `frame_size²` RGB frame is cut into `patch × patch` cells (a convolution with kernel and
    stride `patch`, computed as one matmul), mixed by a residual 3 × 3 convolution over the
    `grid × grid` cells, and each cell quantised to one of `codebook_size` codes; the decoder
    mirrors it. Training uses the straight-through estimator with the VQ-VAE codebook and
    commitment losses ([`vq_loss`][models.vq_loss]); codes that fall out of use can be restarted at
    encoder outputs ([`restart_dead_codes`][models.VideoVQ.restart_dead_codes]). `encode` / `decode`
    work on uint8 video.

    Patches rather than overlapping strided convolutions: XLA:CPU runs the backward pass of strided
    and transposed convolutions slowly, and the demo trains this model on two CPU cores.

    Every method works on one video (`[frames, ...]`); `jax.vmap` for a batch. Frames in float are
    `[frames, 3, size, size]` (channels first) in `[-1, 1]`; uint8 video is `[frames, size, size, 3]`
    (channels last), where `size` is `frame_size`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import models

    config = models.VQConfig(frame_size=16, patch=4, hidden=16, codebook_size=8, code_dim=4)
    vq = models.VideoVQ(config, key=jax.random.key(0))
    video = jnp.zeros((2, 16, 16, 3), jnp.uint8)  # [frames, size, size, 3]
    codes = vq.encode(video)
    assert codes.shape == (2, config.grid**2) and codes.dtype == jnp.int32  # [frames, codes]
    decoded = vq.decode(codes)
    assert decoded.shape == video.shape and decoded.dtype == jnp.uint8  # [frames, size, size, 3]
    ```
    """

    # The codebook is an embedding table of codes (for eqx_ring.sharding); the coders declare their own.
    param_axes: ClassVar[dict[str, tuple[str | None, ...]]] = {"codebook": ("vq_codes", "vq_embed")}

    encoder: _Coder
    decoder: _Coder
    codebook: Float[Array, "codebook_size code_dim"]
    config: VQConfig = eqx.field(static=True)

    def __init__(self, config: VQConfig, *, key: PRNGKeyArray):
        """Build the model with freshly initialised weights (codebook vectors uniform in `[-1, 1]`).

        **Arguments:**

        - `config`: the [`VQConfig`][models.VQConfig].
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only argument.)
        """
        ek, dk, ck = jax.random.split(key, 3)
        cell = 3 * config.patch**2
        self.encoder = _Coder(cell, config.hidden, config.code_dim, ek)
        self.decoder = _Coder(config.code_dim, config.hidden, cell, dk)
        self.codebook = jax.random.uniform(ck, (config.codebook_size, config.code_dim), minval=-1.0, maxval=1.0)
        self.config = config

    def _cells(self, frames: Float[Array, "frames 3 size size"]) -> Float[Array, "frames grid grid cell"]:
        f, g, p = frames.shape[0], self.config.grid, self.config.patch
        return frames.reshape(f, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(f, g, g, 3 * p * p)

    def _frames(self, cells: Float[Array, "frames grid grid cell"]) -> Float[Array, "frames 3 size size"]:
        f, g, p = cells.shape[0], self.config.grid, self.config.patch
        return cells.reshape(f, g, g, 3, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(f, 3, g * p, g * p)

    def encode_latents(self, frames: Float[Array, "frames 3 size size"]) -> Float[Array, "frames grid grid dim"]:
        """The encoder's continuous output for frames in `[-1, 1]`, before quantisation.

        **Arguments:**

        - `frames`: float frames `[frames, 3, size, size]` in `[-1, 1]`.

        **Returns:** one `code_dim` vector per cell, `[frames, grid, grid, dim]` (`dim` = `code_dim`).
        """
        return jax.vmap(self.encoder)(self._cells(frames))

    def _nearest(self, z: Float[Array, "*cells dim"]) -> Int[Array, "*cells"]:
        distance = (z**2).sum(-1, keepdims=True) - 2 * z @ self.codebook.T + (self.codebook**2).sum(-1)
        return distance.argmin(-1)

    def __call__(self, frames: Float[Array, "frames 3 size size"]) -> VQOutput:
        """Quantise and reconstruct frames scaled to `[-1, 1]`, with the straight-through estimator.

        **Arguments:**

        - `frames`: float frames `[frames, 3, size, size]` in `[-1, 1]`.

        **Returns:** a [`VQOutput`][models.VQOutput]: the reconstruction `[frames, 3, size, size]`,
        the codes `[frames, grid, grid]` and the codebook and commitment losses (scalars).
        """
        with jax.named_scope("models.VideoVQ"):
            z = self.encode_latents(frames)
            codes = self._nearest(z)
            quantised = self.codebook[codes]
            codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - quantised) ** 2)
            commitment_loss = jnp.mean((z - jax.lax.stop_gradient(quantised)) ** 2)
            straight_through = z + jax.lax.stop_gradient(quantised - z)
            reconstruction = self._frames(jax.vmap(self.decoder)(straight_through))
            return VQOutput(reconstruction, codes, codebook_loss, commitment_loss)

    def encode(self, video: UInt8[Array, "frames size size 3"]) -> Int[Array, "frames codes"]:
        """uint8 video → int32 codes, `grid²` per frame, row-major.

        **Arguments:**

        - `video`: one video, uint8 `[frames, size, size, 3]`.

        **Returns:** the codes, int32 `[frames, codes]` (`codes` = `grid²`), values in `[0, codebook_size)`.
        """
        codes = self._nearest(self.encode_latents(to_unit(video)))
        return codes.reshape(video.shape[0], -1).astype(jnp.int32)

    def decode(self, codes: Int[Array, "frames codes"]) -> UInt8[Array, "frames size size 3"]:
        """Codes → uint8 video: the inverse of [`encode`][models.VideoVQ.encode] up to the quantisation.

        **Arguments:**

        - `codes`: int `[frames, codes]` (`codes` = `grid²`, row-major), values in `[0, codebook_size)`.

        **Returns:** the video, uint8 `[frames, size, size, 3]` (values clipped to `[0, 255]`).
        """
        g = self.config.grid
        return from_unit(self._frames(jax.vmap(self.decoder)(self.codebook[codes.reshape(-1, g, g)])))

    def restart_dead_codes(
        self, usage: Float[Array, " codebook_size"], frames: Float[Array, "frames 3 size size"], key: PRNGKeyArray,
        threshold: float = 1e-3,
    ) -> "VideoVQ":
        """A copy whose codes with `usage` below `threshold` (fraction of recent assignments) are moved onto
        encoder outputs of `frames` drawn at random, so every code can be used again.

        **Arguments:**

        - `usage`: the fraction of assignments each code got, `[codebook_size]` (e.g. `vq_loss`'s
          `"usage"` metric, possibly averaged over steps).
        - `frames`: float frames `[frames, 3, size, size]` in `[-1, 1]` to draw encoder outputs from.
        - `key`: a `jax.random.PRNGKey` for the draws.
        - `threshold`: codes with `usage < threshold` are restarted; default `1e-3`.

        **Returns:** a new `VideoVQ` with the same encoder and decoder and the restarted codebook.
        """
        flat = self.encode_latents(frames).reshape(-1, self.config.code_dim)
        picks = flat[jax.random.randint(key, (self.config.codebook_size,), 0, flat.shape[0])]
        codebook = jnp.where((usage < threshold)[:, None], picks, self.codebook)
        return eqx.tree_at(lambda m: m.codebook, self, codebook)


def to_unit(video: UInt8[Array, "*frames size size 3"]) -> Float[Array, "*frames 3 size size"]:
    """uint8 `[..., H, W, 3]` → float32 `[..., 3, H, W]` in `[-1, 1]`."""
    return jnp.moveaxis(video.astype(jnp.float32) / 127.5 - 1.0, -1, -3)


def from_unit(x: Float[Array, "*frames 3 size size"]) -> UInt8[Array, "*frames size size 3"]:
    """Inverse of `to_unit`, clipped and rounded."""
    return jnp.clip(jnp.round((jnp.moveaxis(x, -3, -1) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def vq_loss(model: VideoVQ, video: UInt8[Array, "batch frames size size 3"]) -> tuple[Float[Array, ""], dict]:
    """VQ-VAE training loss of a uint8 video batch: reconstruction MSE + codebook + β · commitment.

    The frames of every video are encoded together, in the codebook's dtype. `"usage"` is not a
    scalar: [`train`][models.train] logs every metric with `float`, so drop it in the `loss_fn`
    given to `train`.

    **Arguments:**

    - `model`: the [`VideoVQ`][models.VideoVQ] (β is its `config.commitment`).
    - `video`: uint8 videos `[batch, frames, size, size, 3]`.

    **Returns:** `(loss, metrics)`: the scalar loss, and `"reconstruction"` (MSE in `[-1, 1]` units),
    `"usage"` (the fraction of assignments each code got, `[codebook_size]`) and `"perplexity"`
    (the exponential of the entropy of that histogram; a scalar).
    """
    frames = to_unit(video.reshape(-1, *video.shape[2:])).astype(model.codebook.dtype)
    out = model(frames)
    reconstruction = jnp.mean((out.reconstruction - frames) ** 2)
    loss = reconstruction + out.codebook_loss + model.config.commitment * out.commitment_loss
    usage = jnp.bincount(out.codes.reshape(-1), length=model.config.codebook_size) / out.codes.size
    perplexity = jnp.exp(-jnp.sum(jnp.where(usage > 0, usage * jnp.log(usage), 0.0)))
    return loss, {"reconstruction": reconstruction, "usage": usage, "perplexity": perplexity}
