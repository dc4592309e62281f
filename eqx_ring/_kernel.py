"""The ring of key/value blocks, forward and backward, over one small kernel interface.

A `Kernel` computes what one key/value block contributes to this device's queries; two paths
implement it, each in its own module with its own tile sizes and checks:

- `XlaKernel` (`_kernel_xla.py`): a loop over chunk pairs in plain XLA, any backend;
- `PallasKernel` (`_kernel_pallas.py`): fused Pallas kernels, one launch per ring step forward and
  two backward, lowered to Triton on GPU.

This module owns everything the paths share: how key/value blocks reach the queries (strategy "ring":
blocks travel n − 1 times forward, fewer when a sliding window on the contiguous layout cannot see further
back; in the backward pass their gradient accumulators travel with them and come home; with `kv_pieces` a
block goes round in pieces, one ring per piece. Strategy "allgather": every device gathers the whole k/v,
`kv_pieces` kv heads' worth at a time, and scatters their gradients back), the true positions of every
block, `delta = rowsum(do · o) - dlse`, the `jax.custom_vjp` and its batching rule.
`blockwise_attention` is a ring of one device. Ulysses' all-to-all happens outside (in `_ring.py`): the
kernel then sees `gathered` consecutive shards of the sequence as its local block. Shapes (B = flattened
batch, K = kv heads, G = q heads per kv head, D = head dim):

    q, o, do, dq      [B, Lq, K, G, D]    q's dtype in, float32 out of a path
    k, v, dk, dv      [B, Lk, K, D]       k's dtype in (they travel around the ring), float32 out
    lse, delta        [B, K, G, Lq]       float32
    segment ids [B, L] int32;  bias, dbias [B, Lk] float32;  positions [L] int32 (recomputed, never sent)
    dropout seeds [B, K, G] uint32, one per (batch, q head);  dropout rows [B, K, G, Lq] uint32
"""

import abc
from collections.abc import Callable, Hashable
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jaxtyping import Array

from ._buffers import zeros_after
from ._layout import layout_positions, shard_positions
from ._masks import MaskSpec, dropout_rows


class Queries(NamedTuple):
    """This device's queries, which stay while the key/value blocks go round."""

    q: Array  # [B, Lq, K, G, D]
    positions: Array  # [Lq] int32, true positions
    segment_ids: Array | None  # [B, Lq] int32
    dropout: Array | None = None  # [B, K, G, Lq] uint32, each row's dropout hash (`dropout_rows`); None: no dropout


def _queries(q, positions, segment_ids, seeds) -> Queries:
    return Queries(q, positions, segment_ids, None if seeds is None else dropout_rows(seeds, positions))


class KeyValueBlock(NamedTuple):
    """What travels around the ring together: a key/value block and its per-key data."""

    k: Array  # [B, Lk, K, D]
    v: Array  # [B, Lk, K, D]
    segment_ids: Array | None  # [B, Lk] int32
    bias: Array | None  # [B, Lk] float32


class Upstream(NamedTuple):
    """What the backward pass knows about every query row."""

    do: Array  # [B, Lq, K, G, D], the output's cotangent
    lse: Array  # [B, K, G, Lq], the forward pass's log-sum-exp over every key of the ring
    delta: Array  # [B, K, G, Lq], rowsum(do · o)


class Gradients(NamedTuple):
    """The one gradient layout every path hands back: float32, in the inputs' layouts, scale applied."""

    dq: Array  # [B, Lq, K, G, D]
    dk: Array  # [B, Lk, K, D]
    dv: Array  # [B, Lk, K, D]
    dbias: Array | None  # [B, Lk]


class Kernel(abc.ABC):
    """One way to compute a ring step; a path is a frozen dataclass of its tile sizes.

    The ring drives a path through three calls per pass, and carries the path's own state between
    them without looking inside (each path keeps its accumulators in the layout its matmuls like):

        forward:   state = start_forward(q);  state = forward_step(..., block, state) per block
                   o, lse = finish_forward(state)   # o [B, Lq, K, G, D] and lse [B, K, G, Lq], float32
        backward:  upstream, dq, dkv = start_backward(queries, upstream, block)
                   dq, dkv = backward_step(..., block, dq, dkv) per block; dkv travels with its block
                   finish_backward(scale, dq, dkv) -> Gradients

    A path must be hashable (it is part of the `jax.custom_vjp`'s static arguments). A query row
    that sees no key gets o = 0, lse = -inf and zero gradients.
    """

    @abc.abstractmethod
    def start_forward(self, q: Array) -> Any:
        """The state before any block: nothing seen yet."""

    @abc.abstractmethod
    def forward_step(self, masks: MaskSpec, scale: float, queries: Queries, block: KeyValueBlock,
                     key_positions: Array, state: Any) -> Any:
        """`state` with one more key/value block (at true positions `key_positions`) folded in."""

    @abc.abstractmethod
    def finish_forward(self, state: Any) -> tuple[Array, Array]:
        """(o, lse) from the state after every block."""

    @abc.abstractmethod
    def start_backward(self, queries: Queries, upstream: Upstream, block: KeyValueBlock) -> tuple[Upstream, Any, Any]:
        """(upstream as the steps want it, zero dq accumulator, zero accumulators of `block`'s gradients)."""

    @abc.abstractmethod
    def backward_step(self, masks: MaskSpec, scale: float, queries: Queries, upstream: Upstream,
                      block: KeyValueBlock, key_positions: Array, dq: Any, dkv: Any) -> tuple[Any, Any]:
        """(dq, dkv) with `block`'s contribution added; `dkv` is `block`'s own."""

    @abc.abstractmethod
    def finish_backward(self, scale: float, dq: Any, dkv: Any) -> Gradients:
        """The gradients from the accumulators after every block (`dkv` back home)."""


class Settings(NamedTuple):
    """Everything static about one attention call (hashable: it is the custom_vjp's nondiff argument)."""

    kernel: Kernel
    masks: MaskSpec
    scale: float
    axis_name: Hashable | None
    layout: str
    # "ring": each device's key/value block goes round the ring in `kv_pieces` pieces, one after another;
    # "allgather": every device gathers all keys/values, `kv_pieces` slices of the kv heads one after another.
    kv_pieces: int = 1
    strategy: str = "ring"
    # The local sequence is `gathered` consecutive shards of a layout over (axis size × gathered) shards:
    # 1 on a plain ring, the all-to-all group's size under Ulysses (alone, or within a hybrid's ring).
    gathered: int = 1


def block_positions(settings: "Settings", shard, n: int, length: int):
    """True positions of the `length` slots that member `shard` (maybe traced) of an `n`-device ring holds."""
    g = settings.gathered
    if g == 1:
        return shard_positions(shard, length, settings.layout, n)
    return jnp.concatenate([shard_positions(shard * g + d, length // g, settings.layout, n * g) for d in range(g)])


def _ring_size_and_index(settings: Settings):
    """(devices on the ring, this device's index); (1, 0) without an axis."""
    if settings.axis_name is None:
        return 1, 0
    return lax.axis_size(settings.axis_name), lax.axis_index(settings.axis_name)


def _send(tree, settings: Settings, n: int, hops: int = 1):
    """Send a pytree `hops` steps along the ring: device i -> i + hops."""
    perm = [(i, (i + hops) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, settings.axis_name, perm), tree)


def _steps(settings: Settings, n: int, block_len: int) -> int:
    """How many blocks after its own each device must see: n - 1, or fewer when a sliding window (or causal
    chunked attention) on the contiguous layout hides the blocks of devices further back (the window-aware ring).

    On the contiguous layout device r holds positions [r·L, (r + 1)·L); the block of device r - s ends at
    (r - s + 1)·L - 1, which a query at r·L or later sees only if it lies within the window, i.e. if
    (s - 1)·L + 1 < w: the blocks with s <= ceil((w - 1) / L). A causal query sees at most the c - 1 keys
    before it in its chunk of c, so chunks bound the steps as a window of c does. (The other layouts spread
    each shard over the whole sequence, so every block holds keys some window sees.)
    """
    window = settings.masks.lookback
    if window is None or settings.layout != "contiguous":
        return n - 1
    return min(n - 1, -(-(window - 1) // block_len))


def _ring_forward(settings: Settings, block: KeyValueBlock, state, step, block_len: int):
    """Fold every visible key/value block of the ring into `state` with `step(s, block, state)`."""
    n, _ = _ring_size_and_index(settings)
    steps = _steps(settings, n, block_len)
    if steps > 0:

        def body(carry, s):
            block, state = carry
            arriving = _send(block, settings, n)  # issued before this step's compute, which it overlaps
            return (arriving, step(s, block, state)), None

        (block, state), _ = lax.scan(body, (block, state), jnp.arange(steps))
    return step(steps, block, state)


def _ring_backward(settings: Settings, block: KeyValueBlock, dq, dkv, step, block_len: int):
    """Run `step(s, block, dq, dkv)` on every visible block; each block's `dkv` travels with it and comes home."""
    n, _ = _ring_size_and_index(settings)
    steps = _steps(settings, n, block_len)
    if steps > 0:

        def body(carry, s):
            block, dq, dkv = carry
            arriving = _send(block, settings, n)
            dq, dkv = step(s, block, dq, dkv)
            # The gradient accumulators travel with their block, one step behind its k/v.
            return (arriving, dq, _send(dkv, settings, n)), None

        (block, dq, dkv), _ = lax.scan(body, (block, dq, dkv), jnp.arange(steps))
    dq, dkv = step(steps, block, dq, dkv)
    if n > 1:
        # One hop brings each block's gradients home after a full ring; after fewer steps, n - steps hops at once.
        dkv = _send(dkv, settings, n, hops=n - steps)
    return dq, dkv


def _piece(block: KeyValueBlock, j, size: int) -> KeyValueBlock:
    """Keys `j * size .. (j + 1) * size` of `block`, with their segment ids and bias."""
    return KeyValueBlock(*(None if x is None else lax.dynamic_slice_in_dim(x, j * size, size, 1) for x in block))


def _forward(settings: Settings, q, block: KeyValueBlock, q_segment_ids, seeds):
    if settings.strategy == "allgather":
        return _allgather_forward(settings, q, block, q_segment_ids, seeds)
    n, r = _ring_size_and_index(settings)
    queries = _queries(q, block_positions(settings, r, n, q.shape[1]), q_segment_ids, seeds)
    local_len, pieces = block.k.shape[1], settings.kv_pieces
    size = local_len // pieces

    def ring(j, state):
        """Fold piece `j` of every device's block into `state`: one ring of pieces."""

        def step(s, piece, state):  # the piece in hand at step s started on device r - s
            positions = lax.dynamic_slice_in_dim(block_positions(settings, (r - s) % n, n, local_len),
                                                 j * size, size)
            return settings.kernel.forward_step(settings.masks, settings.scale, queries, piece, positions, state)

        return _ring_forward(settings, _piece(block, j, size), state, step, local_len)

    state = settings.kernel.start_forward(q)
    # One piece at a time, so that only pieces travel: the blocks in flight are 1/pieces of a block.
    state = ring(0, state) if pieces == 1 else lax.fori_loop(0, pieces, ring, state)
    return settings.kernel.finish_forward(state)


def _backward(settings: Settings, q, block: KeyValueBlock, q_segment_ids, seeds, o, lse, do, dlse) -> Gradients:
    # A score s's gradient is p · (dp - delta) + p · dlse: the cotangent of the returned lse (e.g. from sinks)
    # folds into delta, so every path's backward step stays as it is.
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    if settings.strategy == "allgather":
        return _allgather_backward(settings, q, block, q_segment_ids, seeds, Upstream(do, lse, delta))
    n, r = _ring_size_and_index(settings)
    queries = _queries(q, block_positions(settings, r, n, q.shape[1]), q_segment_ids, seeds)
    local_len, pieces = block.k.shape[1], settings.kv_pieces
    size = local_len // pieces
    upstream, dq, dkv_zero = settings.kernel.start_backward(queries, Upstream(do, lse, delta), _piece(block, 0, size))

    def ring(j, dq):
        """dq with piece `j` of every block folded in, and the gradients of this device's piece `j`."""

        def step(s, piece, dq, dkv):
            positions = lax.dynamic_slice_in_dim(block_positions(settings, (r - s) % n, n, local_len),
                                                 j * size, size)
            return settings.kernel.backward_step(settings.masks, settings.scale, queries, upstream, piece, positions,
                                                 dq, dkv)

        return _ring_backward(settings, _piece(block, j, size), dq, dkv_zero, step, local_len)

    if pieces == 1:
        return settings.kernel.finish_backward(settings.scale, *ring(0, dq))

    def ring_and_keep(j, carry):
        dq, dk, dv, dbias = carry
        dq, dkv = ring(j, dq)
        # Only this piece's dk, dv, dbias are used: XLA drops the finishing of dq here.
        finished = settings.kernel.finish_backward(settings.scale, dq, dkv)
        dk, dv, dbias = (None if x is None else lax.dynamic_update_slice_in_dim(x, y, j * size, 1)
                         for x, y in zip((dk, dv, dbias), finished[1:], strict=True))
        return dq, dk, dv, dbias

    zeros = tuple(None if x is None else zeros_after(do, x) for x in (block.k, block.v, block.bias))
    dq, dk, dv, dbias = lax.fori_loop(0, pieces, ring_and_keep, (dq, *zeros))
    return Gradients(settings.kernel.finish_backward(settings.scale, dq, dkv_zero).dq, dk, dv, dbias)


def _one_piece_after_another(count: int, fetch: Callable, use: Callable, carry):
    """`carry = use(j, fetch(j), carry)` for j < count, fetching piece j + 1 before piece j is used.

    Issued first, the next piece's collective overlaps this piece's compute (as the ring's sends do),
    and only two pieces are ever fetched at once.
    """
    fetched = fetch(0)
    if count > 1:

        def body(c, j):
            fetched, carry = c
            return (fetch(j + 1), use(j, fetched, carry)), None

        (fetched, carry), _ = lax.scan(body, (fetched, carry), jnp.arange(count - 1))
    return use(count - 1, fetched, carry)


def _gather(x, settings: Settings):
    """`x` ([B, L, ...]) of every device on the axis, concatenated along the sequence in device (layout) order."""
    return None if x is None else lax.all_gather(x, settings.axis_name, axis=1, tiled=True)


def _allgather_setup(settings: Settings, q, block: KeyValueBlock):
    """(query positions, every key's position, heads per piece, fetch of piece j, the gathered bias)."""
    n, r = _ring_size_and_index(settings)
    key_positions = jnp.asarray(layout_positions(n * block.k.shape[1], settings.layout, n))
    segments, bias = _gather(block.segment_ids, settings), _gather(block.bias, settings)
    heads = block.k.shape[2] // settings.kv_pieces

    def fetch(j):
        k, v = (_gather(lax.dynamic_slice_in_dim(x, j * heads, heads, 2), settings) for x in (block.k, block.v))
        return KeyValueBlock(k, v, segments, bias)

    return shard_positions(r, q.shape[1], settings.layout, n), key_positions, heads, fetch, bias


def _heads_of_piece(j, heads: int, q, seeds):
    """(q, dropout seeds) of the `heads` kv heads of piece `j`."""
    return (lax.dynamic_slice_in_dim(q, j * heads, heads, 2),
            None if seeds is None else lax.dynamic_slice_in_dim(seeds, j * heads, heads, 1))


def _allgather_forward(settings: Settings, q, block: KeyValueBlock, q_segment_ids, seeds):
    """Every key/value gathered, a slice of kv heads at a time, and attended to in one step per slice."""
    q_positions, key_positions, heads, fetch, _ = _allgather_setup(settings, q, block)
    kernel = settings.kernel

    def use(j, gathered: KeyValueBlock, carry):
        o, lse = carry
        q_j, seeds_j = _heads_of_piece(j, heads, q, seeds)
        state = kernel.forward_step(settings.masks, settings.scale, _queries(q_j, q_positions, q_segment_ids, seeds_j),
                                    gathered, key_positions, kernel.start_forward(q_j))
        o_j, lse_j = kernel.finish_forward(state)
        return lax.dynamic_update_slice_in_dim(o, o_j, j * heads, 2), lax.dynamic_update_slice_in_dim(lse, lse_j,
                                                                                                       j * heads, 1)

    # zeros_like keeps the inputs' varying mesh axes, which a scan's carry must match.
    carry = (jnp.zeros_like(q, jnp.float32), jnp.zeros_like(jnp.moveaxis(q[..., 0], 1, -1), jnp.float32))
    return _one_piece_after_another(settings.kv_pieces, fetch, use, carry)


def _allgather_backward(settings: Settings, q, block: KeyValueBlock, q_segment_ids, seeds,
                        upstream: Upstream) -> Gradients:
    """The gradients of `_allgather_forward`: k/v gathered again slice by slice, their gradients scattered home."""
    q_positions, key_positions, heads, fetch, bias = _allgather_setup(settings, q, block)
    kernel = settings.kernel

    def scatter(x):  # the sum over devices of each device's gradient of the gathered keys, back to their owner
        return lax.psum_scatter(x, settings.axis_name, scatter_dimension=1, tiled=True)

    def use(j, gathered: KeyValueBlock, carry):
        dq, dk, dv, dbias = carry
        q_j, seeds_j = _heads_of_piece(j, heads, q, seeds)
        queries = _queries(q_j, q_positions, q_segment_ids, seeds_j)
        up = Upstream(lax.dynamic_slice_in_dim(upstream.do, j * heads, heads, 2),
                      *(lax.dynamic_slice_in_dim(x, j * heads, heads, 1) for x in (upstream.lse, upstream.delta)))
        up, dq_j, dkv = kernel.start_backward(queries, up, gathered)
        dq_j, dkv = kernel.backward_step(settings.masks, settings.scale, queries, up, gathered, key_positions,
                                         dq_j, dkv)
        grads = kernel.finish_backward(settings.scale, dq_j, dkv)
        dq, dk, dv = (lax.dynamic_update_slice_in_dim(x, y, j * heads, 2)
                      for x, y in ((dq, grads.dq), (dk, scatter(grads.dk)), (dv, scatter(grads.dv))))
        return dq, dk, dv, None if dbias is None else dbias + grads.dbias

    zeros = tuple(None if x is None else zeros_after(upstream.do, x) for x in (q, block.k, block.v, bias))
    dq, dk, dv, dbias = _one_piece_after_another(settings.kv_pieces, fetch, use, zeros)
    return Gradients(dq, dk, dv, None if dbias is None else scatter(dbias))


def _fold_vmap_into_batch(fn: Callable) -> Callable:
    """`fn` (arrays with a leading batch axis B) under `jax.vmap` folds the mapped axis into B.

    Without this, vmapping the kernel would batch the block classification (its segment ranges
    differ per example), turning every `lax.switch` into a select that computes all branches.
    Folded, one classification covers the whole batch and masked blocks are still skipped.
    """
    f = custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        def fold(x, batched):
            if not batched:
                x = jnp.broadcast_to(x, (axis_size, *x.shape))
            return x.reshape(-1, *x.shape[2:])

        out = f(*jax.tree.map(fold, list(args), list(in_batched)))
        out = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return f


@cache
def _forward_and_backward(settings: Settings) -> tuple[Callable, Callable]:
    def forward(q, k, v, bias, q_seg, k_seg, seeds):
        return _forward(settings, q, KeyValueBlock(k, v, k_seg, bias), q_seg, seeds)

    def backward(q, k, v, bias, q_seg, k_seg, seeds, o, lse, do, dlse):
        return tuple(_backward(settings, q, KeyValueBlock(k, v, k_seg, bias), q_seg, seeds, o, lse, do, dlse))

    return _fold_vmap_into_batch(forward), _fold_vmap_into_batch(backward)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(settings: Settings, q, k, v, bias, q_segment_ids, k_segment_ids, dropout_seeds=None):
    """Exact attention of local queries against the ring's keys: (o in q's dtype, lse float32), shapes as in
    the module docstring; lse is -inf for a query that sees no key. `dropout_seeds` are needed when
    `settings.masks.dropout_rate` is not 0; lse is the log-sum-exp before dropout."""
    o, lse = _forward_and_backward(settings)[0](q, k, v, bias, q_segment_ids, k_segment_ids, dropout_seeds)
    return o.astype(q.dtype), lse


def _attention_fwd(settings: Settings, q, k, v, bias, q_segment_ids, k_segment_ids, dropout_seeds=None):
    inputs = (q, k, v, bias, q_segment_ids, k_segment_ids, dropout_seeds)
    o, lse = _forward_and_backward(settings)[0](*inputs)
    o = o.astype(q.dtype)
    return (o, lse), (*inputs, o, lse)


def _attention_bwd(settings: Settings, residuals, cotangents):
    q, k, v, bias = residuals[:4]
    dq, dk, dv, dbias = _forward_and_backward(settings)[1](*residuals, *cotangents)
    dbias = None if dbias is None else dbias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
