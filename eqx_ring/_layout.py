"""Sequence layouts that balance causal work around the ring.

A layout is a permutation of a global sequence axis. Shard ``r`` of ``n`` holds the slots
``[r * L, (r + 1) * L)`` of the permuted axis, where ``L = seq_len // n``. Kernels never see the
permutation itself: they recompute each local slot's true position from ``(layout, shard, n)``.
"""

import numbers
from typing import TypeVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from ._checks import is_positive_int, known_value

LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "striped")

_A = TypeVar("_A", np.ndarray, Array)


def check_layout(layout: str, seq_len: int, num_shards: int, *, what: str = "seq_len") -> None:
    """Raise a `ValueError` unless `layout` is known and splits `seq_len` evenly into `num_shards`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not is_positive_int(num_shards):
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 0:
        raise ValueError(f"{what} must be a non-negative int, got {seq_len!r}")
    parts = 2 * num_shards if layout == "zigzag" else num_shards
    if seq_len % parts:
        detail = f"2 × {num_shards} shards" if layout == "zigzag" else f"{num_shards} shards"
        raise ValueError(
            f"{what}={seq_len} must be divisible by {parts} ({detail}) for layout={layout!r}"
        )


def shard_positions(shard, local_len: int, layout: str, num_shards: int, xp=jnp):
    """True positions of the `local_len` slots held by `shard` (which may be a traced index)."""
    i = xp.arange(local_len, dtype=xp.int32)
    if layout == "contiguous" or num_shards == 1:
        return shard * local_len + i
    if layout == "striped":
        return i * num_shards + shard
    half = local_len // 2  # zigzag: shard r holds chunks r and 2n-1-r of size half
    return xp.where(i < half, shard * half + i, (2 * num_shards - 1 - shard) * half + (i - half))


def layout_positions(seq_len: int, layout: str, num_shards: int) -> Int[np.ndarray, " seq"]:
    """True position of the token stored in each slot after [`to_layout`][eqx_ring.to_layout].

    **Arguments:**

    - `seq_len`: global sequence length.
    - `layout`: `"contiguous"`, `"zigzag"` or `"striped"`.
    - `num_shards`: number of devices on the ring.

    **Returns:**

    An int32 NumPy array `pos` of shape `[seq_len]`: slot `t` of the laid-out sequence holds the
    token whose original index is `pos[t]`.

    **Raises:**

    `ValueError` if `layout` is unknown, `num_shards` is not a positive int, `seq_len` is not a
    non-negative int, or `seq_len` is not divisible by `num_shards` (by `2 * num_shards` for `"zigzag"`).

    **Example:**

    ```python
    import eqx_ring

    assert eqx_ring.layout_positions(8, "contiguous", 2).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert eqx_ring.layout_positions(8, "zigzag", 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert eqx_ring.layout_positions(8, "striped", 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    ```
    """
    check_layout(layout, seq_len, num_shards)
    local = seq_len // num_shards
    return np.concatenate(
        [shard_positions(r, local, layout, num_shards, xp=np) for r in range(num_shards)]
    ).astype(np.int32)


def _check_axis(x: np.ndarray | Array, axis: int) -> None:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be an int in [{-x.ndim}, {x.ndim}) (an axis of x, whose shape is {x.shape}), "
                         f"got {axis!r}")


def _take(x: _A, index: np.ndarray, axis: int) -> _A:
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=axis)
    return jnp.take(x, index, axis=axis)


def to_layout(x: ArrayLike, layout: str, num_shards: int, *, axis: int) -> Array | np.ndarray:
    """Permute the sequence axis `axis` of `x` from natural order into `layout`.

    NumPy input gives NumPy output (for data pipelines); anything else gives a JAX array.
    Splitting the result evenly over `num_shards` devices along `axis` gives each device the
    tokens the layout assigns to it: the order that [`ring_attention`][eqx_ring.ring_attention],
    [`RingAttention`][eqx_ring.RingAttention] and [`RingTransformer`][eqx_ring.RingTransformer]
    expect. [`from_layout`][eqx_ring.from_layout] undoes it.

    - `"contiguous"`: the identity; shard `r` holds the `r`-th run of `seq_len / num_shards` tokens.
    - `"zigzag"`: the sequence is cut into `2 * num_shards` runs and shard `r` holds runs `r` and
      `2 * num_shards - 1 - r`, so every shard has the same causal work.
    - `"striped"`: shard `r` holds tokens `r, r + num_shards, r + 2 * num_shards, ...`.

    **Arguments:**

    - `x`: an array (NumPy, JAX, or anything `jnp.asarray` takes) whose axis `axis` is the
      sequence, in natural order.
    - `layout`: `"contiguous"`, `"zigzag"` or `"striped"`.
    - `num_shards`: number of devices the sequence will be split over.
    - `axis`: the sequence axis of `x` (keyword only), e.g. `1` for `[batch, seq]`.

    **Returns:**

    `x` with axis `axis` permuted (same shape and dtype): a NumPy array for NumPy input, a JAX
    array otherwise. Slot `t` holds the token at `layout_positions(seq, layout, num_shards)[t]`.

    **Raises:**

    `ValueError` if `axis` is not an axis of `x`, and as
    [`layout_positions`][eqx_ring.layout_positions] for the sequence along it.

    **Example:**

    ```python
    import numpy as np
    import eqx_ring

    x = np.arange(8)  # [seq]
    y = eqx_ring.to_layout(x, "zigzag", 2, axis=0)  # NumPy in, NumPy out
    assert y.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]  # device 0 gets [0, 1, 6, 7], device 1 [2, 3, 4, 5]
    assert (eqx_ring.from_layout(y, "zigzag", 2, axis=0) == x).all()
    ```
    """
    x = x if isinstance(x, np.ndarray) else jnp.asarray(x)
    _check_axis(x, axis)
    return _take(x, layout_positions(x.shape[axis], layout, num_shards), axis)


def from_layout(x: ArrayLike, layout: str, num_shards: int, *, axis: int) -> Array | np.ndarray:
    """Inverse of [`to_layout`][eqx_ring.to_layout]: back to natural token order along `axis`.

    Use it on outputs computed in a layout, e.g. the hidden states of a
    [`RingTransformer`][eqx_ring.RingTransformer] run on a zigzag sequence.

    **Arguments:**

    - `x`: an array whose axis `axis` is a sequence in `layout` order.
    - `layout`: `"contiguous"`, `"zigzag"` or `"striped"`: the layout `x` is in.
    - `num_shards`: the number of shards that layout was made for.
    - `axis`: the sequence axis of `x` (keyword only).

    **Returns:**

    `x` with axis `axis` in natural order (same shape and dtype): a NumPy array for NumPy input,
    a JAX array otherwise.

    **Raises:**

    `ValueError` as [`to_layout`][eqx_ring.to_layout].

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_ring

    x = jax.random.normal(jax.random.key(0), (2, 12, 3))  # [batch, seq, features]
    for layout in ("contiguous", "zigzag", "striped"):
        y = eqx_ring.to_layout(x, layout, 3, axis=1)
        assert jnp.array_equal(eqx_ring.from_layout(y, layout, 3, axis=1), x)
    ```
    """
    x = x if isinstance(x, np.ndarray) else jnp.asarray(x)
    _check_axis(x, axis)
    perm = layout_positions(x.shape[axis], layout, num_shards)
    return _take(x, np.argsort(perm).astype(np.int32), axis)


def layout_slot(position: int | Int[Array, "*shape"], seq_len: int, layout: str, num_shards: int):
    """The slot of the laid-out sequence that holds the token at true `position`.

    The inverse of [`layout_positions`][eqx_ring.layout_positions]:
    `layout_positions(seq_len, layout, n)[layout_slot(p, seq_len, layout, n)] == p`. `position`
    may be a traced array (e.g. a decoding step's index). A known `position` (an int, a NumPy
    array, a JAX array outside `jit`) is checked to lie in `[0, seq_len)`; a traced one is not, and
    for a traced position outside that range the result is no slot of it: it may be negative, at
    least `seq_len`, or the slot of another token.

    **Arguments:**

    - `position`: true (natural-order) token index, an int or an int array of any shape `[*shape]`,
      in `[0, seq_len)`.
    - `seq_len`: global sequence length.
    - `layout`: `"contiguous"`, `"zigzag"` or `"striped"`.
    - `num_shards`: number of devices on the ring.

    **Returns:**

    The slot index (or indices), shaped like `position`: `position` itself for `"contiguous"` (or
    one shard), a value of `position`'s type for `"striped"`, a JAX int array for `"zigzag"`.

    **Raises:**

    `ValueError` for an unknown layout, or a `seq_len` the layout cannot split over `num_shards`
    (as [`layout_positions`][eqx_ring.layout_positions]), or if a known `position` lies outside
    `[0, seq_len)`; `TypeError` if `position` is not an int or an integer array.

    **Example:**

    ```python
    import jax.numpy as jnp
    import eqx_ring

    slots = eqx_ring.layout_slot(jnp.arange(8), 8, "zigzag", 2)
    assert slots.tolist() == [0, 1, 4, 5, 6, 7, 2, 3]
    assert (eqx_ring.layout_positions(8, "zigzag", 2)[slots] == jnp.arange(8)).all()
    ```
    """
    check_layout(layout, seq_len, num_shards)
    if not jnp.issubdtype(jnp.result_type(position), jnp.integer):
        raise TypeError(f"position must be an int or an integer array, got {jnp.result_type(position)}")
    known = known_value(position)
    if known is not None and known.size and (known.min() < 0 or known.max() >= seq_len):
        bad = known[(known < 0) | (known >= seq_len)].flat[0]
        raise ValueError(f"position must be in [0, seq_len={seq_len}), got {bad}")
    local = seq_len // num_shards
    if layout == "contiguous" or num_shards == 1:
        return position
    if layout == "striped":
        return (position % num_shards) * local + position // num_shards
    half = local // 2
    chunk, within = position // half, position % half
    first = chunk < num_shards  # chunk r of shard r, or chunk 2n-1-r in the shard's second half
    return jnp.where(first, chunk * local + within, (2 * num_shards - 1 - chunk) * local + half + within)
