"""Autoregressive decoding for the zoo's models, and `respec` to move weights into a model built differently."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Bool, Int, PRNGKeyArray

from eqx_ring import RingAttention

_KEEP: Any = object()


def respec(model: eqx.Module, *, mesh: Mesh | None = _KEEP, head_axis: str | None = _KEEP, **changes: Any):
    """The same weights in a model rebuilt with another `mesh`, `head_axis` or config `changes`.

    For settings that live in static fields and change no array shape: e.g. a single-device copy
    for decoding (`respec(model, mesh=None)`), another `layout`, or a new `rope_theta` for a
    context-extension stage. `mesh` and `head_axis` default to the model's own. The model must have
    a dataclass `config` and a `(config, *, mesh, head_axis, key)` constructor, as
    [`RingLM`][models.RingLM] and [`VideoTextLM`][models.VideoTextLM] do.

    **Raises:** `ValueError` if the changes alter the shapes of the weights.
    """
    attention = next(x for x in jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, RingAttention))
                     if isinstance(x, RingAttention))
    mesh = attention.mesh if mesh is _KEEP else mesh
    head_axis = attention.head_axis if head_axis is _KEEP else head_axis
    config = dataclasses.replace(model.config, **changes)
    skeleton = eqx.filter_eval_shape(lambda: type(model)(config, mesh=mesh, head_axis=head_axis,
                                                          key=jax.random.key(0)))
    new, old = jax.tree.leaves(skeleton), jax.tree.leaves(model)
    if [(x.shape, x.dtype) for x in new] != [(x.shape, x.dtype) for x in old]:
        raise ValueError(f"config changes {changes} change the shapes of the weights; respec only moves them")
    return jax.tree.unflatten(jax.tree.structure(skeleton), old)


def decode(
    model: eqx.Module, prompts: Sequence[Int[ArrayLike, " _prompt"]], allowed: Bool[np.ndarray, "steps vocab"], *,
    forced: Int[np.ndarray, " steps"], stop_token: int | None = None, temperature: float = 0.0,
    key: PRNGKeyArray | None = None,
) -> Int[Array, "batch steps"]:
    """Generate up to `steps` tokens after each prompt on one device, with a KV cache.

    Prompts may differ in length: each is left-padded in a segment of its own (id 0, which the
    prompt's tokens never attend to), and its positions start at 0 as in training. The prompts
    are prefilled once; each new token then attends to the cache. At step `i` the token is
    `forced[i]` when that is `>= 0`, else one of the tokens `allowed[i]` permits: the most likely
    for `temperature=0`, else sampled at that temperature with `key`. Decoding ends early once
    every row has produced `stop_token`; what follows it in a row is unspecified.
    """
    if temperature < 0 or (temperature > 0 and key is None):
        raise ValueError(f"temperature must be >= 0 (> 0 needs a key), got {temperature} with key={key}")
    width = max(len(p) for p in prompts)
    buffer = np.zeros((len(prompts), width), np.int32)
    segments = np.ones((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, width - len(prompt) :] = np.asarray(prompt)
        segments[row, : width - len(prompt)] = 0
    positions = np.arange(width)[None] - (segments == 0).sum(1, keepdims=True)
    # One chunk covers the whole (short) prompt: the fastest blockwise schedule at this size.
    single = respec(model, mesh=None, head_axis=None, layout="contiguous", query_chunk_size=width,
                    key_chunk_size=width, ffn_chunk_size=width)
    key = jax.random.key(0) if key is None else key
    stop = -1 if stop_token is None else stop_token
    return _decode(single.transformer, jnp.asarray(buffer), jnp.asarray(positions, jnp.int32), jnp.asarray(segments),
                   jnp.asarray(allowed), jnp.asarray(forced, jnp.int32), stop, temperature, key)


@eqx.filter_jit
def _decode(transformer, buffer, positions, segments, allowed, forced, stop: int, temperature: float, key):
    steps = forced.shape[0]
    cache_size = buffer.shape[1] + steps
    hidden, cache = jax.vmap(lambda t, p, s: transformer.prefill(t, cache_size=cache_size, positions=p,
                                                                 segment_ids=s))(buffer, positions, segments)
    step = jax.vmap(transformer.decode_step)

    def body(carry):
        i, last, cache, out, done, key = carry
        logits = jnp.einsum("bd,vd->bv", last, transformer.head_weight, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed[i], logits, -jnp.inf)
        if temperature > 0:
            key, sub = jax.random.split(key)
            token = jax.random.categorical(sub, logits / temperature)
        else:
            token = logits.argmax(-1)
        token = jnp.where(forced[i] >= 0, forced[i], token).astype(jnp.int32)
        last, cache = step(token, cache)
        out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
        return i + 1, last, cache, out, done | (token == stop), key

    def more(carry):
        i, _, _, _, done, _ = carry
        return (i < steps) & ~done.all()

    out = jnp.zeros((buffer.shape[0], steps), jnp.int32)
    init = (jnp.int32(0), hidden[:, -1], cache, out, jnp.zeros(buffer.shape[0], bool), key)
    return jax.lax.while_loop(more, body, init)[3]
