"""`VideoTextLM`: a `RingTransformer` over the Large World Model's video-text token layout."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from eqx_ring import AttentionSpec, KernelTuning, RingTransformer, chunked_cross_entropy

from ._generate import generate
from ._lm import batch_hidden, build_transformer, check_transformer_fields, require_float, require_int, token_count
from ._protocol import RingModel


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
    """Hyperparameters of a [`VideoTextLM`][models.VideoTextLM]; JSON-serialisable (`dataclasses.asdict`).

    The vocabulary is the text tokenizer's `text_vocab_size` ids followed by `codebook_size` vision
    codes (code `c` is token `text_vocab_size + c`), as
    [`lwm_sequence`][data_pipelines.lwm_sequence] lays them out. A video is `num_frames` frames of
    `codes_per_frame` codes.

    **Arguments:**

    - `text_vocab_size`: the text tokenizer's `vocab_size`, special tokens included (263: the
      [`ByteTokenizer`][data_pipelines.ByteTokenizer]'s).
    - `codebook_size`: vision codes, the video tokenizer's codebook size (e.g. a
      [`VideoVQ`][models.VideoVQ]'s).
    - `num_frames`: frames per video.
    - `codes_per_frame`: codes per frame (a `VideoVQ`'s `grid ** 2`).
    - `d_model`, `num_layers`, `num_heads`, `num_kv_heads`, `hidden_size`, `remat_policy`,
      `attention`: the [`RingTransformer`][eqx_ring.RingTransformer], as in
      [`LMConfig`][models.LMConfig] (`num_kv_heads=None`: `num_heads`; `hidden_size=None`:
      `4 * d_model`; `attention`: an [`AttentionSpec`][eqx_ring.AttentionSpec] without placement).
      [`caption`][models.VideoTextLM.caption] and
      [`generate_video`][models.VideoTextLM.generate_video] need `attention.causal_block_size=1`.
    - `text_loss_weight`: the weight of the text loss in [`loss`][models.VideoTextLM.loss], in
      `[0, 1]`; the vision loss gets `1 - text_loss_weight`.
    - `use_sinks`: a learnable attention sink per query head in every block (gpt-oss's, as
      [`LMConfig`][models.LMConfig]'s); default `False`.

    **Raises:** `ValueError`, naming the field and its value, for a vocabulary, codebook, frame or
    code count, size or head count that is not a positive int, `num_heads` not dividing `d_model`,
    `num_kv_heads` not dividing `num_heads`, an unknown `remat_policy`, an `attention` that is not a
    valid spec or holds a placement, a `text_loss_weight` outside `[0, 1]`, or a `use_sinks` that is not a bool.
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
    remat_policy: str | None = "nothing_saveable"
    attention: AttentionSpec = AttentionSpec()
    text_loss_weight: float = 0.5
    use_sinks: bool = False

    def __post_init__(self):
        for name in ("text_vocab_size", "codebook_size", "num_frames", "codes_per_frame"):
            require_int(self, name)
        check_transformer_fields(self)
        require_float(self, "text_loss_weight", low=0.0, high=1.0)
        if not isinstance(self.use_sinks, bool):
            raise ValueError(f"VideoTextConfig.use_sinks must be a bool, got {self.use_sinks!r}")

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: text ids plus vision codes.

        **Returns:** `text_vocab_size + codebook_size`, an `int`.
        """
        return self.text_vocab_size + self.codebook_size

    @property
    def vision_length(self) -> int:
        """Tokens of one video in the LWM layout: `<vision>`, each frame's codes and `<eof>`/`<eov>`, `</vision>`.

        **Returns:** `num_frames * (codes_per_frame + 1) + 2`, an `int`.
        """
        return self.num_frames * (self.codes_per_frame + 1) + 2


class VideoTextLM(RingModel):
    """A video-language model in the Large World Model recipe, on [`RingTransformer`][eqx_ring.RingTransformer].

    Text and vision share one token sequence (the LWM layout of `data_pipelines.lwm_sequence`):
    `<bos> <vision> frame codes... </vision> caption <eos>` to caption a video, and the caption
    first to generate one. The loss is LWM's: `text_loss_weight · text loss + (1 − text_loss_weight)
    · vision loss`, each the mean over its own trained targets, weighted over the modalities the
    batch holds (see [`loss`][models.VideoTextLM.loss]). Attention is token-causal
    (`causal_block_size=1`, the default), which KV-cached generation
    ([`caption`][models.VideoTextLM.caption], [`generate_video`][models.VideoTextLM.generate_video])
    requires. A `causal_block_size` `b > 1` makes every token see its whole block of `b` tokens,
    counted from the start of the row: in packed LWM rows a video starts anywhere, so such blocks
    do not follow its frames, and the model cannot caption or generate.

    Single-example like every Equinox module: `__call__` maps `[seq]` tokens to `[seq, d_model]`
    hidden states. Batches come from [`global_packed_batches`][data_pipelines.global_packed_batches]
    or [`packed_batches`][data_pipelines.packed_batches] over
    [`video_text_examples`][data_pipelines.video_text_examples].
    """

    transformer: RingTransformer
    config: VideoTextConfig = eqx.field(static=True)

    def __init__(self, config: VideoTextConfig, *, mesh: Mesh | None = None, head_axis: str | None = None,
                 key: PRNGKeyArray):
        """Build the model with freshly initialised weights (the LM head is never tied to the embedding).

        **Arguments:**

        - `config`: the [`VideoTextConfig`][models.VideoTextConfig].
        - `mesh`: a mesh with an `"sp"` axis to run the ring attention over, or `None` (the default)
          for one device. The weights are not placed on it: use
          [`shard_params`][eqx_ring.sharding.shard_params].
        - `head_axis`: a mesh axis to split the attention heads over (tensor parallelism), or `None`.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only argument.)
        """
        self.transformer = build_transformer(config, mesh=mesh, head_axis=head_axis, tie_embeddings=False, key=key,
                                             use_sinks=config.use_sinks)
        self.config = config

    def loss(
        self, batch: Mapping[str, Any], *, spmd_axis_name: tuple[str, ...] | None = None,
        tuning: KernelTuning | None = None, key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """LWM's per-modality loss of a batch of packed rows, never building the `[seq, vocab]` logits.

        The targets were taken in natural order before any ring layout (as
        [`packed_batches`][data_pipelines.packed_batches] and
        [`global_packed_batches`][data_pipelines.global_packed_batches] make them), so nothing is
        shifted here. Its `(loss, metrics)` is what [`train`][models.train]'s `loss_fn` returns.

        The weights are taken over the modalities the batch has trained targets of: a batch without
        vision targets has `loss = text_loss` (not `text_loss_weight · text_loss`), one without text
        targets `loss = vision_loss`, and one with neither 0. Under gradient accumulation
        [`make_train_step`][models.make_train_step] adds the whole batch to each microbatch (key
        `"whole_batch"`): the modalities present and both means are then the whole batch's (each
        microbatch's sums are divided by the whole batch's counts over the number of microbatches),
        so the mean of the microbatches' values equals the loss of the whole batch.

        **Arguments:**

        - `batch`: `[batch, seq]` arrays `"tokens"`, `"positions"`, `"segment_ids"`, `"targets"`
          (int), `"target_mask"` (bool: which targets count) and `"target_vision_mask"` (bool: which
          targets are vision tokens), all in the spec's `layout` order; other keys are ignored.
        - `spmd_axis_name`: the mesh's data axes (`("dp", "fsdp")`, i.e.
          [`BATCH_AXES`][eqx_ring.sharding.BATCH_AXES]) when the model is on a mesh, so that each
          data shard keeps its own rows; `None` (the default) without a mesh.
        - `tuning`: a [`KernelTuning`][eqx_ring.KernelTuning] for this call instead of the spec's
          (default `None`: the spec's); no rebuild.
        - `key`: a `jax.random` key for the spec's attention dropout (split over the rows); needed
          when `config.attention.dropout` is not 0, ignored otherwise. Default `None`.

        **Returns:** `(loss, {"text_loss": ..., "vision_loss": ...})`, float32 scalars: the mean
        cross-entropy over the trained text targets and over the trained vision targets (NaN for a
        modality without any, so that logs and plots skip it), and
        `loss = (w_text · text_loss + w_vision · vision_loss) / (w_text + w_vision)` over the
        modalities present, with `w_text = text_loss_weight` and `w_vision = 1 − text_loss_weight`
        (0 when their weights sum to 0).
        """

        hidden = batch_hidden(self.transformer, batch, spmd_axis_name, tuning, key)
        per_token = chunked_cross_entropy(hidden, self.transformer.head_weight, batch["targets"], reduction="none")

        def text(b):
            return b["target_mask"] & ~b["target_vision_mask"]

        def vision(b):
            return b["target_mask"] & b["target_vision_mask"]

        w = self.config.text_loss_weight
        total, weights, means = 0.0, 0.0, []
        for select, weight in ((text, w), (vision, 1.0 - w)):
            count = token_count(batch, lambda b, select=select: select(b).sum(dtype=jnp.float32))
            present = count > 0
            mean = jnp.where(select(batch), per_token, 0.0).sum() / jnp.where(present, count, 1.0)
            total, weights = total + jnp.where(present, weight * mean, 0.0), weights + jnp.where(present, weight, 0.0)
            means.append(jnp.where(present, mean, jnp.nan))
        loss = total / jnp.where(weights > 0, weights, 1.0)
        return loss, {"text_loss": means[0], "vision_loss": means[1]}

    def caption(
        self, codes: Int[ArrayLike, "batch frames codes"], tokenizer: SpecialIds, *, max_length: int = 48,
        temperature: float = 0.0, key: PRNGKeyArray | None = None,
    ) -> list[np.ndarray]:
        """Captions for videos given as codes (e.g. [`VideoVQ.encode`][models.VideoVQ.encode]): the text ids of
        each, without `<eos>`.

        The prompt is `<bos>` and the video in the LWM layout; at most `max_length` text tokens are
        generated by [`generate`][models.generate] (on the model's mesh, if it has one), only text
        ids and `<eos>` are allowed, and decoding stops at `<eos>`. Call it outside `jit`.

        **Arguments:**

        - `codes`: the videos' codes, `[batch, frames, codes]` = `[batch, num_frames,
          codes_per_frame]`, values in `[0, codebook_size)`.
        - `tokenizer`: the text tokenizer the model was trained with (a
          [`Tokenizer`][data_pipelines.Tokenizer], e.g. [`ByteTokenizer`][data_pipelines.ByteTokenizer]),
          for its special ids and `vocab_size`.
        - `max_length`: the most text tokens to generate per video.
        - `temperature`: 0 (the default) is greedy; otherwise sample at this temperature with `key`.
        - `key`: a `jax.random.PRNGKey`; required when `temperature > 0`.

        **Returns:** one int32 NumPy array `[length]` per video, `length <= max_length`: the caption's
        ids, cut before the first `<eos>`. Decode with `tokenizer.decode`.

        **Raises:** `ValueError` if `codes` does not have that shape, and as [`generate`][models.generate]
        (e.g. `causal_block_size != 1`).
        """
        c = self.config
        codes = np.asarray(codes, np.int32)
        if codes.shape[1:] != (c.num_frames, c.codes_per_frame):
            raise ValueError(f"codes must be [batch, {c.num_frames}, {c.codes_per_frame}], got {codes.shape}")
        from data_pipelines import vision_tokens

        prompt = np.concatenate([np.full((codes.shape[0], 1), tokenizer.bos_id), vision_tokens(codes, tokenizer)], 1)
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
        """Videos, as codes (decode them with [`VideoVQ.decode`][models.VideoVQ.decode]), generated from
        tokenized captions.

        The prompt is `<bos> caption <vision>` (captions may differ in length); code positions allow
        only vision codes, and the `<eof>` / `<eov>` markers are placed, not sampled. Runs
        [`generate`][models.generate] (on the model's mesh, if it has one); call it outside `jit`.

        **Arguments:**

        - `caption_ids`: each caption's text ids `[_text]`, without `<bos>`/`<eos>` (e.g.
          `tokenizer.encode(text)`).
        - `tokenizer`: the text tokenizer the model was trained with (a
          [`Tokenizer`][data_pipelines.Tokenizer]), for its special ids.
        - `temperature`: 0 (the default) is greedy; otherwise sample at this temperature with `key`.
        - `key`: a `jax.random.PRNGKey`; required when `temperature > 0`.

        **Returns:** the codes, int32 `[batch, frames, codes]` = `[len(caption_ids), num_frames,
        codes_per_frame]`, values in `[0, codebook_size)`.

        **Raises:** `ValueError` as [`generate`][models.generate] (e.g. `causal_block_size != 1`).
        """
        from data_pipelines import vision_tokens

        c = self.config
        batch = len(caption_ids)
        prompt = [np.concatenate([[tokenizer.bos_id], np.asarray(ids, np.int32), [tokenizer.vision_start_id]])
                  for ids in caption_ids]
        # After <vision>, up to </vision>: the markers are forced, the codes (ids >= the text vocabulary) sampled.
        layout = vision_tokens(np.zeros((c.num_frames, c.codes_per_frame), np.int32), tokenizer)[1:-1]
        forced = np.where(layout >= tokenizer.vocab_size, -1, layout)
        steps = len(forced)
        allowed = np.zeros((steps, c.vocab_size), bool)
        allowed[:, c.text_vocab_size:] = True
        out = generate(self, prompt, steps, allowed=allowed, forced=forced, temperature=temperature, key=key)
        codes = out.reshape(batch, c.num_frames, c.codes_per_frame + 1)[..., :-1]
        return codes - c.text_vocab_size

