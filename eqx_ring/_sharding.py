"""Meshes with the axes (dp, fsdp, tp, sp), parameter sharding rules and the batch sharding."""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

AXES: tuple[str, ...] = ("dp", "fsdp", "tp", "sp")
"""Mesh axis names: data, fully-sharded data (parameters split), tensor (heads / hidden), sequence (ring)."""

BATCH_AXES: tuple[str, ...] = ("dp", "fsdp")
"""The axes the batch is split over: pass as `jax.vmap(..., spmd_axis_name=BATCH_AXES)`."""

# Linear layers by the attribute they are stored under. A column-parallel layer's outputs are
# heads/hidden units (split over tp); a row-parallel layer's inputs are.
_COLUMN = frozenset({"query_proj", "key_proj", "value_proj", "gate_proj", "up_proj"})
_ROW = frozenset({"output_proj", "down_proj"})
_VOCAB = frozenset({"embedding", "lm_head"})


def make_mesh(
    dp: int | str = 1, fsdp: int = -1, tp: int = 1, sp: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes `("dp", "fsdp", "tp", "sp")` of type `AxisType.Auto`.

    One size may be `-1`: it takes all the devices the others leave. `dp` may instead be an LWM-style
    string of the four sizes, e.g. `make_mesh("1,-1,4,1")`.

    **Arguments:** the four axis sizes, and `devices` (default: `jax.devices()`, every process's).

    **Raises:** `ValueError` if the sizes do not multiply to the number of devices.
    """
    if isinstance(dp, str):
        try:
            dp, fsdp, tp, sp = (int(s) for s in dp.split(","))
        except ValueError:
            raise ValueError(f"a mesh string must be four comma-separated ints like '1,-1,4,1', got {dp!r}") from None
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"dp": dp, "fsdp": fsdp, "tp": tp, "sp": sp}
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
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


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
    the reverse; `embedding` / `lm_head` matrices split `d_model` over `fsdp`. Everything else (norm
    scales, unknown layers) is replicated. Stacked (scanned) layers keep their layer axis whole, and
    an axis whose size does not divide a dimension leaves that dimension whole.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: None if not eqx.is_array(leaf) else NamedSharding(mesh, _spec(path, leaf, mesh)),
        params,
    )


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """Place `params` by [`param_shardings`][eqx_ring.sharding.param_shardings]: `jax.device_put`
    outside `jit`, a sharding constraint inside it (`eqx.filter_shard`)."""
    return eqx.filter_shard(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """`P(("dp", "fsdp"), "sp")`: examples over the data axes, the sequence over the ring."""
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

    - `coordinator`: `"HOST:PORT"` of process 0, reachable from every process.
    - `num_processes`, `process_id`: the number of processes and this one's index in `[0, num_processes)`.
    - `cpu_devices`: CPU devices to simulate in this process (CPU runs; collectives between
      processes then go over TCP with gloo, JAX's default).
    - `timeout`: seconds to wait for every process to join.
    """
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout)
