"""Meshes with the axes (dp, fsdp, tp, sp), parameter sharding rules and the batch sharding."""

import math
import numbers
from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

AXES: tuple[str, ...] = ("dp", "fsdp", "tp", "sp")
"""The mesh axis names of [`make_mesh`][eqx_ring.sharding.make_mesh], in mesh order.

`"dp"`: data parallel (parameters replicated); `"fsdp"`: fully-sharded data parallel (the batch and
the parameters split); `"tp"`: tensor parallel (heads / hidden units); `"sp"`: sequence parallel (the ring).
"""

BATCH_AXES: tuple[str, ...] = ("dp", "fsdp")
"""The mesh axes the batch is split over (see [`batch_sharding`][eqx_ring.sharding.batch_sharding]).

Pass it as `jax.vmap(model, spmd_axis_name=BATCH_AXES)` so that each data shard's examples stay on
their devices.
"""

# Linear layers by the attribute they are stored under. A column-parallel layer's outputs are
# heads/hidden units (split over tp); a row-parallel layer's inputs are.
_COLUMN = frozenset({"query_proj", "key_proj", "value_proj", "gate_proj", "up_proj"})
_ROW = frozenset({"output_proj", "down_proj"})
_VOCAB = frozenset({"embedding", "lm_head"})


def make_mesh(
    dp: int | str = 1, fsdp: int = -1, tp: int = 1, sp: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes `("dp", "fsdp", "tp", "sp")` of type `AxisType.Auto`.

    One size may be `-1`: it takes all the devices the others leave (by default `fsdp` does). `dp`
    may instead be an LWM-style string of the four sizes, e.g. `make_mesh("1,-1,4,1")`. The axes are
    `Auto`, so the mesh works with `jax.jit` sharding propagation and with `jax.shard_map`.

    The devices are arranged by `jax.make_mesh`, which on TPU orders them by the chips' physical
    topology. As in LWM, a string that starts with `!` (`"!1,-1,4,1"`) lays them out in the order
    given instead (`devices`, or `jax.devices()`), row-major over `(dp, fsdp, tp, sp)`: what LWM's
    `!` means (it allows a mesh axis to split a physical axis of the chips).

    **Arguments:**

    - `dp`: size of the data-parallel axis (default 1), or a string `"dp,fsdp,tp,sp"` of all four
      sizes, optionally after a `!` (above); the other three arguments must then be left at their
      defaults.
    - `fsdp`: size of the fully-sharded data-parallel axis; default `-1` (the devices left over).
    - `tp`: size of the tensor-parallel (heads / hidden) axis; default 1.
    - `sp`: size of the sequence-parallel axis, the ring of [`ring_attention`][eqx_ring.ring_attention];
      default 1.
    - `devices`: the devices to lay out (keyword only); default `None` means `jax.devices()`, every
      process's devices.

    **Returns:**

    A `jax.sharding.Mesh` of shape `(dp, fsdp, tp, sp)` with axis names
    [`AXES`][eqx_ring.sharding.AXES].

    **Raises:**

    `ValueError` if a size is 0 or below `-1`, if more than one size is `-1`, if a string is not four
    comma-separated ints (after an optional `!`) or comes with `fsdp`, `tp` or `sp`, if `devices` is
    empty or repeats a device, or if the sizes do not multiply to the number of devices; `TypeError`
    if a size is not an int or `devices` holds something other than `jax.Device`s.

    **Example:**

    ```python
    import jax
    from eqx_ring.sharding import make_mesh

    mesh = make_mesh(tp=2, sp=2)  # 8 devices: fsdp=-1 takes the 8 / (1 * 2 * 2) = 2 left over
    assert dict(mesh.shape) == {"dp": 1, "fsdp": 2, "tp": 2, "sp": 2}
    assert dict(make_mesh("2,1,1,-1").shape) == {"dp": 2, "fsdp": 1, "tp": 1, "sp": 4}
    plain = make_mesh("!1,-1,4,1")  # LWM's "!": the devices in their own order
    assert plain.devices.flatten().tolist() == jax.devices()
    ```
    """
    in_given_order = False
    if isinstance(dp, str):
        if (fsdp, tp, sp) != (-1, 1, 1):
            raise ValueError(f"a mesh string gives all four sizes, so leave fsdp, tp and sp at their defaults; got "
                             f"dp={dp!r} with fsdp={fsdp!r}, tp={tp!r}, sp={sp!r}")
        # LWM's (EasyLM's) "!": lay the devices out in their own order instead of asking
        # mesh_utils.create_device_mesh for a topology-aware one (which may refuse to split a physical axis).
        in_given_order, text = dp.startswith("!"), dp.removeprefix("!")
        try:
            dp, fsdp, tp, sp = (int(s) for s in text.split(","))
        except ValueError:
            raise ValueError(f"a mesh string must be four comma-separated ints like '1,-1,4,1', optionally after a "
                             f"'!' ('!1,-1,4,1'), got {dp!r}") from None
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must hold at least one jax.Device, got an empty sequence")
    if not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be jax.Device objects, got {[type(d).__name__ for d in devices]}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {len(devices)} entries for {len(set(devices))} devices")
    sizes = {"dp": dp, "fsdp": fsdp, "tp": tp, "sp": sp}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name} must be an int (a size, or -1), got {size!r}")
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh sizes must be positive ints with at most one -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into {sizes}: {known} does not divide them")
        sizes[inferred[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {len(devices)} are given")
    shape = tuple(int(sizes[a]) for a in AXES)
    axis_types = (AxisType.Auto,) * len(AXES)
    if in_given_order:
        return Mesh(np.array(devices, dtype=object).reshape(shape), AXES, axis_types=axis_types)
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def _spec(path, leaf, mesh: Mesh) -> P | None:
    if not eqx.is_array(leaf):
        return None
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    owner, kind = (names[-2], names[-1]) if len(names) >= 2 else ("", "")
    rule: tuple[str | None, ...] = ()
    if kind == "weight" and owner in _COLUMN:
        rule = ("tp", "fsdp")  # [out, in]
    elif kind == "weight" and owner in _ROW:
        rule = ("fsdp", "tp")
    elif kind == "bias" and owner in _COLUMN:
        rule = ("tp",)
    elif kind == "weight" and owner in _VOCAB:
        rule = (None, "fsdp")  # [vocab, d_model]: split d_model, so vocab chunks slice an unsplit axis
    # Trailing dims follow the rule; leading ones (stacked layers) stay whole. An axis that does not
    # divide its dim is dropped rather than padding the parameter.
    rule = (None,) * (leaf.ndim - len(rule)) + rule[-leaf.ndim :] if rule else (None,) * leaf.ndim
    axes = zip(rule, leaf.shape, strict=True)
    return P(*(a if a is not None and dim % mesh.shape[a] == 0 else None for a, dim in axes))


def param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
    """A `NamedSharding` for every array in `params` (a model, or its optimizer state): `None` elsewhere.

    Linear layers stored as `query_proj`, `key_proj`, `value_proj`, `gate_proj`, `up_proj` split
    their output features over `tp` and input features over `fsdp`; `output_proj` and `down_proj`
    the reverse; `embedding` / `lm_head` matrices split `d_model` over `fsdp`. Column-parallel biases
    split over `tp`. Everything else (norm scales, unknown layers) is replicated. Layers are
    recognised by the attribute names in the path to each array, so an optimizer state that mirrors
    the model gets the same shardings. Stacked (scanned) layers keep their layer axis whole, and
    an axis whose size does not divide a dimension leaves that dimension whole.

    **Arguments:**

    - `params`: a PyTree of arrays, e.g. a [`RingTransformer`][eqx_ring.RingTransformer] or its
      optimizer state.
    - `mesh`: a mesh with the axes `"fsdp"` and `"tp"`, e.g. from
      [`make_mesh`][eqx_ring.sharding.make_mesh].

    **Returns:**

    A PyTree with the structure of `params`: a `jax.sharding.NamedSharding` on `mesh` for every
    array leaf, `None` for every other leaf.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: None if not eqx.is_array(leaf) else NamedSharding(mesh, _spec(path, leaf, mesh)),
        params,
    )


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """Place `params` by [`param_shardings`][eqx_ring.sharding.param_shardings].

    This is `eqx.filter_shard`: a `jax.device_put` outside `jit`, a sharding constraint inside it
    (e.g. on the updated model at the end of a train step). Non-array leaves are left as they are.

    **Arguments:**

    - `params`: a PyTree of arrays, e.g. a [`RingTransformer`][eqx_ring.RingTransformer] or its
      optimizer state.
    - `mesh`: a mesh with the axes `"fsdp"` and `"tp"`, e.g. from
      [`make_mesh`][eqx_ring.sharding.make_mesh].

    **Returns:**

    `params` with every array placed (or constrained) by its sharding.

    **Example:**

    ```python
    import jax
    from jax.sharding import PartitionSpec as P
    import eqx_ring
    from eqx_ring.sharding import make_mesh, shard_params

    mesh = make_mesh(tp=2, sp=2)  # dp=1, fsdp=2, tp=2, sp=2 on 8 devices
    attn = shard_params(eqx_ring.RingAttention(32, 4, mesh=mesh, key=jax.random.key(0)), mesh)
    # Weights are [out, in]: heads split over tp and d_model over fsdp, in both projections.
    assert attn.query_proj.weight.sharding.spec == P("tp", "fsdp")
    assert attn.output_proj.weight.sharding.spec == P("fsdp", "tp")
    ```
    """
    return eqx.filter_shard(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of `[batch, seq]` batches: examples over the data axes, the sequence over the ring.

    Its spec is `P(("dp", "fsdp"), "sp")`: the batch is split over
    [`BATCH_AXES`][eqx_ring.sharding.BATCH_AXES] and the sequence, which must already be in the
    model's layout ([`to_layout`][eqx_ring.to_layout]), over `"sp"`.

    **Arguments:**

    - `mesh`: a mesh with the axes `"dp"`, `"fsdp"` and `"sp"`, e.g. from
      [`make_mesh`][eqx_ring.sharding.make_mesh].

    **Returns:**

    A `jax.sharding.NamedSharding` on `mesh`, for `jax.device_put` or `eqx.filter_shard`.
    """
    return NamedSharding(mesh, P(BATCH_AXES, "sp"))


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    timeout: int = 300,
) -> None:
    """Join a multi-process JAX run: call it once in every process, before anything uses a device.

    A thin wrapper of `jax.distributed.initialize`. Arguments left `None` are found by JAX: the
    coordinator from `JAX_COORDINATOR_ADDRESS`, and all three on Slurm, Open MPI, Cloud TPU pods and
    Kubernetes JobSets. Afterwards `jax.devices()` lists every process's devices in the same order
    on every process, so [`make_mesh`][eqx_ring.sharding.make_mesh] builds the same global mesh
    everywhere, and `jax.process_index()` tells the processes apart.

    **Arguments:**

    - `coordinator`: `"HOST:PORT"` of process 0, reachable from every process; default `None`: found
      by JAX.
    - `num_processes`: the number of processes; default `None`: found by JAX.
    - `process_id`: this process's index in `[0, num_processes)`; default `None`: found by JAX.
    - `cpu_devices`: CPU devices to simulate in this process (keyword only; CPU runs: collectives
      between processes then go over TCP with gloo, JAX's default); default `None`: leave JAX's
      setting alone.
    - `timeout`: seconds to wait for every process to join (keyword only; default 300).

    Several processes cannot be shown in a single runnable snippet: launch the same script once per
    process, e.g. with `JAX_COORDINATOR_ADDRESS=host0:1234` set and `initialize_distributed(None, 2, i)`
    in process `i`.
    """
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout)
