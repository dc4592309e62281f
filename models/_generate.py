"""Generation for the zoo's models (ring prefill, KV-cached decoding), and `respec` to move weights between builds."""

import math
import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, ArrayLike, Bool, Int, PRNGKeyArray

from eqx_ring import KernelTuning, layout_slot, to_layout
from eqx_ring.sharding import BATCH_AXES

from ._protocol import _KEEP, Keep, RingModel


def respec(model: RingModel, *, mesh: Mesh | None | Keep = _KEEP, head_axis: str | None | Keep = _KEEP,
           **changes: Any):
    """The same weights in a model rebuilt with another `mesh`, `head_axis` or config `changes`.

    For settings that change no array shape: e.g. a single-device copy for decoding
    (`respec(model, mesh=None)`), another `layout`, or a new `rope_theta` for a context-extension
    stage (as [`train`][models.train] does). This is
    [`RingModel.respec`][models.RingModel.respec]: the new model is built shape-only
    (`eqx.filter_eval_shape`) and takes the old model's arrays as they are: nothing is copied,
    initialised or moved between devices. (To change only the kernel tuning, pass `tuning=` to the
    model's call or `loss` instead: no rebuild.)

    **Arguments:**

    - `model`: a [`RingModel`][models.RingModel] ([`RingLM`][models.RingLM],
      [`VideoTextLM`][models.VideoTextLM]) whose weights to keep.
    - `mesh`: the mesh the rebuilt model runs its ring on, or `None` for one device; defaults to
      the model's own.
    - `head_axis`: the mesh axis to split the heads over, or `None`; defaults to the model's own, or to
      `None` when `mesh=None` is given (one device has no axis to split over).
    - `**changes`: fields of `model.config` or of its `attention` spec to replace (e.g. `layout=`,
      `rope_theta=`, `num_layers=`).

    **Returns:** a model of the same class with the new config and settings and the same arrays.

    **Raises:** `ValueError` if the changes alter the shapes (or dtypes) of the weights; `TypeError`
    if `model` is not a `RingModel` or a change names no field.
    """
    if not isinstance(model, RingModel):
        raise TypeError(f"model must be a models.RingModel (e.g. RingLM, VideoTextLM), got {type(model).__name__}")
    return model.respec(mesh=mesh, head_axis=head_axis, **changes)


def generate(
    model: RingModel,
    prompts: Sequence[Int[ArrayLike, " _prompt"]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    key: PRNGKeyArray | None = None,
    allowed: Bool[ArrayLike, "*steps vocab"] | None = None,
    forced: Int[ArrayLike, " steps"] | None = None,
) -> Int[Array, "batch steps"]:
    """Continue each prompt by up to `max_new_tokens` tokens: ring prefill, then KV-cached decoding.

    Runs where the model runs: with a mesh, the prompt is prefilled by ring attention in the
    model's layout and the cache stays split over the sequence axis, each device attending to
    its own part of it (see [`RingAttention.decode_step`][eqx_ring.RingAttention.decode_step]);
    the rows are split over the mesh's data axes (`"dp"`, `"fsdp"`), the batch padded to divide
    them. The whole loop is one jitted `while_loop`; the cache holds the longest prompt plus
    `max_new_tokens`, rounded up to what the layout splits evenly. Call it outside `jit`. With
    several processes every process calls it and gets every row.

    **Arguments:**

    - `model`: a [`RingModel`][models.RingModel] ([`RingLM`][models.RingLM],
      [`VideoTextLM`][models.VideoTextLM]); its attention must be causal with `causal_block_size=1`.
    - `prompts`: token ids, each `[_prompt]` in natural order; they may differ in length (each is
      left-padded in a segment of its own that it never attends to, and its positions start at 0
      as in training).
    - `max_new_tokens`: how many tokens to generate.
    - `temperature`: 0 (the default) takes the most likely token; otherwise sample at this
      temperature with `key`, among the `top_k` most likely tokens and the smallest set whose
      probability reaches `top_p`.
    - `top_k`: keep only the `top_k` most likely tokens when sampling; `None`: no limit.
    - `top_p`: keep only the smallest set of most likely tokens whose probability reaches `top_p`
      (nucleus sampling), in `(0, 1]`; `None`: no limit.
    - `stop_tokens`: a row is finished once it produces one; the loop ends when every row is.
      What follows a stop token in a row is unspecified.
    - `key`: a `jax.random.PRNGKey` for sampling; required when `temperature > 0`.
    - `allowed`: which tokens may be produced, bool `[vocab]` for every step or
      `[max_new_tokens, vocab]` per step; `None`: all.
    - `forced`: `[max_new_tokens]`, per step a token to place instead of choosing one (`-1`:
      choose); `None`: choose at every step.

    **Returns:** the new tokens, `[len(prompts), max_new_tokens]` int32 (the `[batch, steps]` of the
    signature).

    **Raises:** `ValueError`, before any work, if `max_new_tokens` is not a positive int,
    `temperature < 0`, `temperature > 0` without a `key`, `top_k` is not a positive int, `top_p`
    is outside `(0, 1]`, `prompts` is empty or holds an empty prompt or an id outside
    `[0, vocab_size)` (the message names the prompt, the id and its position), `stop_tokens` holds
    an id outside the vocabulary, `allowed` is not `[vocab]` or `[max_new_tokens, vocab]` or allows
    no token at a step that chooses one, `forced` is not `[max_new_tokens]` or holds an id outside
    `[-1, vocab_size)`, or the model's attention is not causal with `causal_block_size=1`;
    `TypeError` if prompts, `forced` or `stop_tokens` are not integers or `allowed` is not bool.

    **Example:**

    ```python
    import jax
    import models

    config = models.LMConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, hidden_size=32)
    model = models.RingLM(config, key=jax.random.key(0))
    tokens = models.generate(model, [[1, 2, 3], [4, 5]], 4, temperature=0.8, top_k=10, key=jax.random.key(1))
    assert tokens.shape == (2, 4)  # [len(prompts), max_new_tokens]
    ```
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError(f"temperature={temperature} > 0 samples, which needs a key, got key=None")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not isinstance(model, RingModel):
        raise TypeError(f"model must be a models.RingModel (e.g. RingLM, VideoTextLM), got {type(model).__name__}")
    vocab = model.config.vocab_size
    prompts = [np.asarray(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    for i, prompt in enumerate(prompts):
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty [_prompt] of token ids, got shape {prompt.shape}")
        _token_ids(prompt, f"prompts[{i}]", vocab, "position")
    stops = _token_ids(list(stop_tokens), "stop_tokens", vocab, "index")
    allowed = _allowed(allowed, max_new_tokens, vocab)
    if forced is None:
        forced = np.full(max_new_tokens, -1)
    else:
        forced = np.asarray(forced)
        if forced.shape != (max_new_tokens,):
            raise ValueError(f"forced must be [max_new_tokens={max_new_tokens}] (-1 where the token is chosen), "
                             f"got shape {forced.shape}")
        _token_ids(forced, "forced", vocab, "step", lowest=-1)
    empty = np.flatnonzero(~allowed.any(-1) & (forced < 0))
    if empty.size:
        raise ValueError(f"allowed must allow a token at every step that chooses one (forced -1), "
                         f"got none at step {empty[0]}")
    spec = model.spec
    layout, ring, mesh = spec.layout, spec.ring_size, spec.mesh
    data_axes = () if mesh is None else tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    # Rows are split over the data axes (each shard decodes its own); pad the batch to divide them.
    shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in data_axes)
    rows = len(prompts)
    prompts = list(prompts) + [prompts[-1]] * (-rows % shards)
    width = max(len(p) for p in prompts)
    tuning = spec.tuning
    size, chunk = _cache_size(width + max_new_tokens, layout, ring, min(tuning.query_chunk_size,
                                                                        tuning.key_chunk_size))
    # Natural order: left padding (segment 0), the prompt (1), room for the new tokens (2).
    tokens = np.zeros((len(prompts), size), np.int32)
    segments = np.full((len(prompts), size), 2, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) : width] = np.asarray(prompt)
        segments[row, : width - len(prompt)] = 0
        segments[row, width - len(prompt) : width] = 1
    positions = np.arange(size)[None] - (segments == 0).sum(1, keepdims=True)
    laid = [to_layout(a, layout, ring, axis=1) for a in (tokens, positions.astype(np.int32), segments)]
    tuning = KernelTuning(query_chunk_size=chunk, key_chunk_size=chunk,
                          ffn_chunk_size=math.gcd(size, tuning.ffn_chunk_size), implementation=tuning.implementation)
    stops = stops.astype(np.int32) if stops.size else np.full(1, -1, np.int32)
    key = jax.random.key(0) if key is None else key
    last = int(layout_slot(width - 1, size, layout, ring))  # the slot of the prompts' last token
    out = _generate(model.transformer, *(jnp.asarray(a) for a in laid), width, last, jnp.asarray(allowed),
                    jnp.asarray(forced, jnp.int32), jnp.asarray(stops), temperature, top_k, top_p, key,
                    data_axes if shards > 1 else None, tuning)
    if mesh is not None:
        # Every process gets every row (rows were split over devices that may be other processes').
        out = jax.device_put(out, NamedSharding(mesh, P()))
    return out[:rows]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_ids(ids, name: str, vocab: int, unit: str, *, lowest: int = 0) -> np.ndarray:
    """`ids` as a NumPy array, once they are integers in `[lowest, vocab)`; `unit` names an index in the message."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return ids
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    bad = np.argwhere((ids < lowest) | (ids >= vocab))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        expected = f"-1 or token ids in [0, {vocab})" if lowest == -1 else f"token ids in [0, {vocab})"
        raise ValueError(f"{name} must be {expected} (vocab_size={vocab}), got {ids[at]} at {unit} "
                         f"{at[0] if len(at) == 1 else at}")
    return ids


def _allowed(allowed, steps: int, vocab: int) -> np.ndarray:
    """`allowed` as a bool `[steps, vocab]` array (all true when `None`)."""
    if allowed is None:
        return np.ones((steps, vocab), bool)
    allowed = np.asarray(allowed)
    if allowed.dtype != bool:
        raise TypeError(f"allowed must be bool, got dtype {allowed.dtype}")
    if allowed.shape not in ((vocab,), (steps, vocab)):
        raise ValueError(f"allowed must be [vocab_size={vocab}] or [max_new_tokens={steps}, vocab_size={vocab}], "
                         f"got shape {allowed.shape}")
    return np.broadcast_to(allowed, (steps, vocab))


def _cache_size(need: int, layout: str, ring: int, chunk: int) -> tuple[int, int]:
    """A cache length >= `need` that the layout splits evenly, and a chunk size that divides its pieces."""
    unit = 2 * ring if layout == "zigzag" else ring
    if need <= unit * chunk:
        size = -(-need // unit) * unit
        return size, size // unit
    return -(-need // (unit * chunk)) * unit * chunk, chunk


@eqx.filter_jit
def _generate(transformer, tokens, positions, segments, width: int, last_slot: int, allowed, forced, stops,
              temperature: float, top_k: int | None, top_p: float | None, key, data_axes: tuple[str, ...] | None,
              tuning: KernelTuning):
    steps = forced.shape[0]
    vmap = partial(jax.vmap, spmd_axis_name=data_axes) if data_axes else jax.vmap
    hidden, cache = vmap(lambda t, p, s: transformer.prefill(t, length=width, positions=p, segment_ids=s,
                                                         tuning=tuning))(
        tokens, positions, segments)
    last = hidden[:, last_slot]
    step = vmap(transformer.decode_step)

    def body(carry):
        i, last, cache, out, done, key = carry
        logits = jnp.einsum("bd,vd->bv", last, transformer.head_weight, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed[i], logits, -jnp.inf)
        if temperature > 0:
            key, sub = jax.random.split(key)
            token = jax.random.categorical(sub, _truncate(logits / temperature, top_k, top_p))
        else:
            token = logits.argmax(-1)
        token = jnp.where(forced[i] >= 0, forced[i], token).astype(jnp.int32)
        last, cache = step(token, cache)
        out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
        return i + 1, last, cache, out, done | jnp.isin(token, stops), key

    def more(carry):
        i, _, _, _, done, _ = carry
        return (i < steps) & ~done.all()

    out = jnp.zeros((tokens.shape[0], steps), jnp.int32)
    init = (jnp.int32(0), last, cache, out, jnp.zeros(tokens.shape[0], bool), key)
    return jax.lax.while_loop(more, body, init)[3]


def _truncate(logits, top_k: int | None, top_p: float | None):
    """Logits outside the `top_k` most likely and outside the smallest `top_p` mass set to -inf."""
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        # The smallest prefix whose mass reaches top_p: keep a token if the mass before it is < top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits
