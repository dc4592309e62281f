"""`VideoTextLM`: a `RingTransformer` over the Large World Model's video-text token layout."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from eqx_ring import RingTransformer, chunked_cross_entropy

from ._generate import generate
from ._lm import batch_hidden


@runtime_checkable
class SpecialIds(Protocol):
    """The token ids `caption` and `generate_video` need: any `data_pipelines.Tokenizer` has them."""

    vocab_size: int
    bos_id: int
    eos_id: int
    vision_start_id: int
    vision_end_id: int
    eof_id: int
    eov_id: int


@dataclass(frozen=True)
class VideoTextConfig:
    """Hyperparameters of a [`VideoTextLM`][models.VideoTextLM]; JSON-serialisable.

    The vocabulary is the text tokenizer's `text_vocab_size` ids followed by `codebook_size` vision
    codes (code `c` is token `text_vocab_size + c`), as `data_pipelines.lwm_sequence` lays them out.
    A video is `num_frames` frames of `codes_per_frame` codes.
    """

    text_vocab_size: int = 263
    codebook_size: int = 64
    num_frames: int = 8
    codes_per_frame: int = 16
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = 2
    hidden_size: int | None = 384
    rope_theta: float = 10_000.0
    causal_block_size: int = 1
    layout: str = "contiguous"
    query_chunk_size: int = 512
    key_chunk_size: int = 512
    ffn_chunk_size: int = 2048
    remat_policy: str | None = "nothing_saveable"
    text_loss_weight: float = 0.5

    @property
    def vocab_size(self) -> int:
        """Text ids plus vision codes."""
        return self.text_vocab_size + self.codebook_size

    @property
    def vision_length(self) -> int:
        """Tokens of one video in the LWM layout: `<vision>`, each frame's codes and `<eof>`/`<eov>`, `</vision>`."""
        return self.num_frames * (self.codes_per_frame + 1) + 2


class VideoTextLM(eqx.Module):
    """A video-language model in the Large World Model recipe, on [`RingTransformer`][eqx_ring.RingTransformer].

    Text and vision share one token sequence (the LWM layout of `data_pipelines.lwm_sequence`):
    `<bos> <vision> frame codes... </vision> caption <eos>` to caption a video, and the caption
    first to generate one. The loss is LWM's: `text_loss_weight · text loss + (1 − text_loss_weight)
    · vision loss`, each the mean over its own trained targets. With `causal_block_size` =
    `codes_per_frame + 1` the attention is block-causal in blocks of that many tokens, counted from
    the start of the row (so frames line up with blocks only where the rows are laid out to match).
    """

    transformer: RingTransformer
    config: VideoTextConfig = eqx.field(static=True)

    def __init__(self, config: VideoTextConfig, *, mesh: Mesh | None = None, head_axis: str | None = None,
                 key: PRNGKeyArray):
        """**Arguments:** the `config`, an optional `mesh` (and `head_axis`) to run the ring on, and a PRNG `key`."""
        if not 0.0 <= config.text_loss_weight <= 1.0:
            raise ValueError(f"text_loss_weight must lie in [0, 1], got {config.text_loss_weight}")
        c = config
        self.transformer = RingTransformer(
            c.vocab_size, c.d_model, c.num_layers, c.num_heads, num_kv_heads=c.num_kv_heads,
            hidden_size=c.hidden_size, rope_theta=c.rope_theta, causal_block_size=c.causal_block_size,
            layout=c.layout, query_chunk_size=c.query_chunk_size, key_chunk_size=c.key_chunk_size,
            ffn_chunk_size=c.ffn_chunk_size, remat_policy=c.remat_policy, mesh=mesh, head_axis=head_axis, key=key,
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

    def loss(
        self, batch: dict[str, Array], *, spmd_axis_name: tuple[str, ...] | None = None
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """LWM's per-modality loss of a batch of packed rows (`[batch, seq]` arrays from `data_pipelines`).

        Uses `tokens`, `positions`, `segment_ids`, `targets`, `target_mask` and `target_vision_mask`
        (all in the model's layout; targets were taken in natural order, so nothing is shifted here).
        Pass `spmd_axis_name=("dp", "fsdp")` on a mesh.

        **Returns:** `(loss, {"text_loss": ..., "vision_loss": ...})`.
        """

        hidden = batch_hidden(self.transformer, batch, spmd_axis_name)
        per_token = chunked_cross_entropy(hidden, self.transformer.head_weight, batch["targets"], reduction="none")
        trained, vision = batch["target_mask"], batch["target_vision_mask"]

        def mean_over(mask):
            mask = mask.astype(jnp.float32)
            return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)

        text_loss, vision_loss = mean_over(trained & ~vision), mean_over(trained & vision)
        w = self.config.text_loss_weight
        return w * text_loss + (1.0 - w) * vision_loss, {"text_loss": text_loss, "vision_loss": vision_loss}

    def caption(
        self, codes: Int[ArrayLike, "batch frames codes"], tokenizer: SpecialIds, *, max_length: int = 48,
        temperature: float = 0.0, key: PRNGKeyArray | None = None,
    ) -> list[np.ndarray]:
        """Captions for videos given as codes (e.g. `VideoVQ.encode`): the text ids of each, without `<eos>`.

        The prompt is `<bos>` and the video in the LWM layout; at most `max_length` text tokens are
        generated by [`generate`][models.generate] (on the model's mesh, if it has one), only text
        ids and `<eos>` are allowed, and decoding stops at `<eos>`. `temperature=0` is greedy.
        Decode with `tokenizer.decode`.
        """
        c = self.config
        codes = np.asarray(codes, np.int32)
        if codes.shape[1:] != (c.num_frames, c.codes_per_frame):
            raise ValueError(f"codes must be [batch, {c.num_frames}, {c.codes_per_frame}], got {codes.shape}")
        prompt = np.concatenate([np.full((codes.shape[0], 1), tokenizer.bos_id), self._vision(codes, tokenizer)], 1)
        allowed = np.zeros(c.vocab_size, bool)
        allowed[: tokenizer.vocab_size] = True
        for special in ("bos_id", "vision_start_id", "vision_end_id", "eof_id", "eov_id"):
            allowed[getattr(tokenizer, special)] = False
        out = generate(self, list(prompt), max_length, allowed=allowed, stop_tokens=(tokenizer.eos_id,),
                       temperature=temperature, key=key)
        result = []
        for row in np.asarray(out):
            end = np.flatnonzero(row == tokenizer.eos_id)
            result.append(row[: end[0]] if end.size else row)
        return result

    def generate_video(
        self, caption_ids: Sequence[Int[ArrayLike, " _text"]], tokenizer: SpecialIds, *, temperature: float = 0.0,
        key: PRNGKeyArray | None = None,
    ) -> Int[Array, "batch frames codes"]:
        """Videos, as codes (decode them with `VideoVQ.decode`), generated from tokenized captions.

        The prompt is `<bos> caption <vision>` (captions may differ in length); code positions allow
        only vision codes, and the `<eof>` / `<eov>` markers are placed, not sampled.
        """
        c = self.config
        batch = len(caption_ids)
        prompt = [np.concatenate([[tokenizer.bos_id], np.asarray(ids, np.int32), [tokenizer.vision_start_id]])
                  for ids in caption_ids]
        steps = c.num_frames * (c.codes_per_frame + 1)
        per_frame = np.arange(steps) % (c.codes_per_frame + 1)
        forced = np.where(per_frame == c.codes_per_frame, tokenizer.eof_id, -1)
        forced[-1] = tokenizer.eov_id
        allowed = np.zeros((steps, c.vocab_size), bool)
        allowed[:, c.text_vocab_size:] = True
        out = generate(self, prompt, steps, allowed=allowed, forced=forced, temperature=temperature, key=key)
        codes = out.reshape(batch, c.num_frames, c.codes_per_frame + 1)[..., :-1]
        return codes - c.text_vocab_size

    def _vision(self, codes: np.ndarray, tokenizer: SpecialIds) -> np.ndarray:
        c = self.config
        batch = codes.shape[0]
        markers = np.full((batch, c.num_frames, 1), tokenizer.eof_id)
        markers[:, -1] = tokenizer.eov_id
        frames = np.concatenate([codes + c.text_vocab_size, markers], -1).reshape(batch, -1)
        return np.concatenate([
            np.full((batch, 1), tokenizer.vision_start_id), frames, np.full((batch, 1), tokenizer.vision_end_id)
        ], 1).astype(np.int32)

