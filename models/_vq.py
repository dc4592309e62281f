"""`VideoVQ`: a VQ-VAE that turns each video frame into a grid of discrete codes and back."""

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8


@dataclass(frozen=True)
class VQConfig:
    """Hyperparameters of a [`VideoVQ`][models.VideoVQ]; JSON-serialisable."""

    frame_size: int = 32
    hidden: int = 64
    downsample: int = 2
    codebook_size: int = 64
    code_dim: int = 16
    commitment: float = 0.25

    @property
    def grid(self) -> int:
        """Codes per frame side: `frame_size / 2**downsample`."""
        return self.frame_size // 2**self.downsample


class VQOutput(eqx.Module):
    """What [`VideoVQ.__call__`][models.VideoVQ.__call__] returns for one video."""

    reconstruction: Float[Array, "frames 3 size size"]
    codes: Int[Array, "frames grid grid"]
    codebook_loss: Float[Array, ""]
    commitment_loss: Float[Array, ""]


def _conv_stack(channels: list[int], key: PRNGKeyArray, transpose: bool) -> list[eqx.Module]:
    layers = []
    keys = jax.random.split(key, len(channels) - 1)
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        last = i == len(channels) - 2
        if transpose and not last:
            layers.append(eqx.nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, key=keys[i]))
        elif not transpose and not last:
            layers.append(eqx.nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, key=keys[i]))
        else:
            layers.append(eqx.nn.Conv2d(c_in, c_out, 3, padding=1, key=keys[i]))
    return layers


def _apply(layers: tuple[eqx.Module, ...], x: Array) -> Array:
    """The layers in turn, with a ReLU between consecutive ones."""
    for i, layer in enumerate(layers):
        x = layer(x) if i == 0 else layer(jax.nn.relu(x))
    return x


class VideoVQ(eqx.Module):
    """A frame-wise VQ-VAE: conv encoder → nearest codebook vector per grid cell → conv decoder.

    Each `frame_size²` RGB frame becomes a `grid × grid` array of codes in `[0, codebook_size)`
    (`grid = frame_size / 2**downsample`). Training uses the straight-through estimator with the
    VQ-VAE codebook and commitment losses (`vq_loss`); codes that fall out of use can be restarted
    at encoder outputs (`restart_dead_codes`). `encode` / `decode` work on uint8 video.
    """

    encoder: tuple[eqx.Module, ...]
    decoder: tuple[eqx.Module, ...]
    codebook: Float[Array, "codebook_size code_dim"]
    config: VQConfig = eqx.field(static=True)

    def __init__(self, config: VQConfig, *, key: PRNGKeyArray):
        """**Arguments:** the `config` and a PRNG `key`."""
        if config.frame_size % 2**config.downsample:
            raise ValueError(
                f"frame_size={config.frame_size} must be divisible by 2**downsample={2**config.downsample}"
            )
        ek, dk, ck = jax.random.split(key, 3)
        widths = [3] + [config.hidden] * config.downsample + [config.code_dim]
        self.encoder = tuple(_conv_stack(widths, ek, transpose=False))
        self.decoder = tuple(_conv_stack(widths[::-1], dk, transpose=True))
        self.codebook = jax.random.uniform(ck, (config.codebook_size, config.code_dim), minval=-1.0, maxval=1.0)
        self.config = config

    def _encode_latents(self, x: Float[Array, "3 size size"]) -> Float[Array, "code_dim grid grid"]:
        return _apply(self.encoder, x)

    def _decode_latents(self, z: Float[Array, "code_dim grid grid"]) -> Float[Array, "3 size size"]:
        return _apply(self.decoder, z)

    def _nearest(self, z: Float[Array, "code_dim grid grid"]) -> Int[Array, "grid grid"]:
        flat = z.reshape(z.shape[0], -1).T
        distance = (flat**2).sum(-1, keepdims=True) - 2 * flat @ self.codebook.T + (self.codebook**2).sum(-1)
        return distance.argmin(-1).reshape(z.shape[1:])

    def __call__(self, frames: Float[Array, "frames 3 size size"]) -> VQOutput:
        """Quantise and reconstruct frames scaled to `[-1, 1]`; returns a [`VQOutput`][models.VQOutput]."""
        with jax.named_scope("models.VideoVQ"):
            z = jax.vmap(self._encode_latents)(frames)
            codes = jax.vmap(self._nearest)(z)
            quantised = jnp.moveaxis(self.codebook[codes], -1, 1)
            codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - quantised) ** 2)
            commitment_loss = jnp.mean((z - jax.lax.stop_gradient(quantised)) ** 2)
            straight_through = z + jax.lax.stop_gradient(quantised - z)
            reconstruction = jax.vmap(self._decode_latents)(straight_through)
            return VQOutput(reconstruction, codes, codebook_loss, commitment_loss)

    def encode(self, video: UInt8[Array, "frames size size 3"]) -> Int[Array, "frames codes"]:
        """uint8 video → int32 codes, `grid²` per frame, row-major."""
        z = jax.vmap(self._encode_latents)(to_unit(video))
        return jax.vmap(self._nearest)(z).reshape(video.shape[0], -1).astype(jnp.int32)

    def decode(self, codes: Int[Array, "frames codes"]) -> UInt8[Array, "frames size size 3"]:
        """Codes → uint8 video."""
        g = self.config.grid
        quantised = jnp.moveaxis(self.codebook[codes.reshape(-1, g, g)], -1, 1)
        return from_unit(jax.vmap(self._decode_latents)(quantised))

    def restart_dead_codes(
        self, usage: Float[Array, " codebook_size"], frames: Float[Array, "frames 3 size size"], key: PRNGKeyArray,
        threshold: float = 1e-3,
    ) -> "VideoVQ":
        """A copy whose codes with `usage` below `threshold` (fraction of recent assignments) are moved onto
        encoder outputs of `frames` drawn at random, so every code can be used again."""
        z = jax.vmap(self._encode_latents)(frames)
        flat = jnp.moveaxis(z, 1, -1).reshape(-1, self.config.code_dim)
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

    **Returns:** `(loss, metrics)` with `"reconstruction"` (MSE in `[-1, 1]` units), `"usage"` (the
    fraction of assignments each code got, `[codebook_size]`) and `"perplexity"` of the code histogram.
    """
    frames = to_unit(video.reshape(-1, *video.shape[2:]))
    out = model(frames)
    reconstruction = jnp.mean((out.reconstruction - frames) ** 2)
    loss = reconstruction + out.codebook_loss + model.config.commitment * out.commitment_loss
    usage = jnp.bincount(out.codes.reshape(-1), length=model.config.codebook_size) / out.codes.size
    perplexity = jnp.exp(-jnp.sum(jnp.where(usage > 0, usage * jnp.log(usage), 0.0)))
    return loss, {"reconstruction": reconstruction, "usage": usage, "perplexity": perplexity}
