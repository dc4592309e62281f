"""Meshes with the axes (dp, fsdp, tp, sp), parameter sharding rules and the batch sharding."""

import math
import numbers
from collections.abc import Mapping, Sequence
from types import MappingProxyType

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

# Where a logical axis goes: a mesh axis, a tuple of mesh axes (split over their product), or None (kept whole).
_Rule = str | tuple[str, ...] | None

DEFAULT_RULES: Mapping[str, _Rule] = MappingProxyType({
    "layers": None,
    "vocab": None,
    "embed": "fsdp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "norm": None,
    "vq_embed": "fsdp",
    "vq_hidden": "tp",
    "vq_hidden_in": "fsdp",
    "vq_window": None,
    "vq_codes": None,
})
"""The default rules of [`param_shardings`][eqx_ring.sharding.param_shardings]: the mesh axes that split each
logical axis a module names in its `param_axes` (see [`logical_axes`][eqx_ring.sharding.logical_axes]).

| logical axis | what it counts | mesh axis |
|---|---|---|
| `"layers"` | the leading layer axis of stacked (scanned) blocks, named automatically | whole |
| `"vocab"` | the rows of the embedding and of the LM head | whole |
| `"embed"` | `d_model`, the width of the residual stream | `"fsdp"` |
| `"heads"` | query heads × `head_dim`: `query_proj`'s outputs, `output_proj`'s inputs | `"tp"` |
| `"kv_heads"` | key/value heads × `head_dim`: `key_proj`'s and `value_proj`'s outputs | `"tp"` |
| `"mlp"` | the FFN's hidden units | `"tp"` |
| `"norm"` | the width of a normalisation scale | whole |
| `"vq_embed"` | a `VideoVQ` cell's pixels or code vector: its coders' ends and the codebook's width | `"fsdp"` |
| `"vq_hidden"` | the hidden channels of a `VideoVQ` coder (the outputs of `into` and `mix`) | `"tp"` |
| `"vq_hidden_in"` | the input channels of a coder's 3 × 3 convolution `mix` | `"fsdp"` |
| `"vq_window"` | that convolution's kernel height and width (and its bias's broadcast axes) | whole |
| `"vq_codes"` | the codebook's entries | whole |

Weights split over `fsdp` on their `d_model` side and over `tp` on their heads or hidden side (Megatron's
column- and row-parallel layers). The vocabulary stays whole, so that the vocabulary chunks of
[`chunked_cross_entropy`][eqx_ring.chunked_cross_entropy] slice an unsplit axis. The `VideoVQ` names follow the
same scheme (its coders are FFNs with a convolution in the middle, and its codebook an embedding table), with names of
their own so that the tokenizer can be placed apart from the language model; a convolution's two channel axes need
two names, since one mesh axis splits at most one dimension of an array.

It is read-only; derive other rules from it, e.g. `{**DEFAULT_RULES, "embed": None}` for tensor parallelism alone.
"""


def make_mesh(
    dp: int | str = 1, fsdp: int = -1, tp: int = 1, sp: int = 1, *, usp: int | None = None,
    devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes `("dp", "fsdp", "tp", "sp")` of type `AxisType.Auto` (and `"usp"` last, if asked for).

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
    - `usp`: the size of a fifth axis `"usp"`, the all-to-all axis of `strategy="hybrid"` (keyword
      only): the sequence is then split over `("sp", "usp")`, `"sp"` major, so that each all-to-all
      group is `usp` neighbouring devices (on GPUs, within a node) and the ring runs across the
      groups. Default `None`: no such axis.
    - `devices`: the devices to lay out (keyword only); default `None` means `jax.devices()`, every
      process's devices.

    **Returns:**

    A `jax.sharding.Mesh` of shape `(dp, fsdp, tp, sp)` with axis names
    [`AXES`][eqx_ring.sharding.AXES], or `(dp, fsdp, tp, sp, usp)` with `AXES + ("usp",)`.

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
    assert dict(make_mesh(fsdp=1, sp=-1, usp=4).shape) == {"dp": 1, "fsdp": 1, "tp": 1, "sp": 2, "usp": 4}
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
    if usp is not None:
        if isinstance(usp, bool) or not isinstance(usp, numbers.Integral) or usp < 1:
            raise ValueError(f"usp must be a positive int or None, got {usp!r}")
        sizes["usp"] = usp
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
    names = tuple(sizes)
    shape = tuple(int(sizes[a]) for a in names)
    axis_types = (AxisType.Auto,) * len(names)
    if in_given_order:
        return Mesh(np.array(devices, dtype=object).reshape(shape), names, axis_types=axis_types)
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)


def _dotted(keys: tuple) -> str:
    """A key path as a `param_axes` key: attribute names and sequence indices joined by dots."""
    parts = []
    for k in keys:
        if isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(getattr(k, "key", k)))
    return ".".join(parts)


def _is_param(leaf: object) -> bool:
    """An array, or the shape of one (`eqx.filter_eval_shape` gives a model of those before any weight exists)."""
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def _declared_axes(path: tuple, leaf: object, scopes: tuple) -> tuple[str | None, ...] | None:
    """The logical axes of the array at `path`; `scopes` are its enclosing modules, nearest first."""
    if not _is_param(leaf) or not scopes:
        return None
    for module, depth in scopes:
        names = getattr(type(module), "param_axes", {}).get(_dotted(path[depth:]))
        if names is not None:
            break
    else:
        inner, depth = scopes[0]
        searched = ", ".join(type(m).__qualname__ for m, _ in scopes)
        raise ValueError(
            f"the array at {jax.tree_util.keystr(path)} (shape {leaf.shape}) in a {type(inner).__qualname__} has "
            f"no declared logical axes: no enclosing module ({searched}) has its path in its param_axes, e.g. "
            f"{_dotted(path[depth:])!r} in {type(inner).__qualname__}.param_axes")
    if len(names) > leaf.ndim:
        raise ValueError(f"param_axes declares {len(names)} axes {names} for the array at "
                         f"{jax.tree_util.keystr(path)}, which has {leaf.ndim} (shape {leaf.shape})")
    return ("layers",) * (leaf.ndim - len(names)) + tuple(names)


def _walk(tree: PyTree) -> tuple[list[tuple[tuple, object, tuple[str | None, ...] | None]], jax.tree_util.PyTreeDef]:
    """`(path, leaf, logical axes)` for every leaf of `tree` in flattening order, and its treedef."""
    entries = []

    def visit(node, path, scopes):
        if isinstance(node, eqx.Module):
            scopes = ((node, len(path)), *scopes)
        # One level of modules at a time, so that every array knows the modules around it.
        children = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module))[0]
        for keys, child in children:
            if isinstance(child, eqx.Module):
                visit(child, path + keys, scopes)
            else:
                entries.append((path + keys, child, _declared_axes(path + keys, child, scopes)))

    visit(tree, (), ())
    return entries, jax.tree_util.tree_structure(tree)


def logical_axes(tree: PyTree) -> PyTree:
    """The logical axis names of every array in `tree`, as its modules declare them in `param_axes`.

    A module class that holds arrays, directly or inside layers of other libraries (`eqx.nn.Linear`, ...),
    declares a class variable `param_axes: ClassVar[dict[str, tuple[str | None, ...]]]`: for each array,
    its path relative to the module (attribute names and sequence indices joined by dots:
    `"query_proj.weight"`, `"codebook"`, `"layers.0.weight"`) and one logical name per dimension (see
    [`DEFAULT_RULES`][eqx_ring.sharding.DEFAULT_RULES] for the names the library uses), or `None` for a
    dimension that no rule splits. An array's names come from the nearest enclosing module that declares
    its path. Dimensions in front of the declared ones (the layer axis of stacked, scanned blocks) are
    named `"layers"`. A subclass that adds arrays extends its parent's table:
    `param_axes = {**Parent.param_axes, "extra": ("embed",)}`.

    An optimizer state that mirrors the model (optax's `adamw` moments hold the model's modules) gets
    the model's names; arrays outside every module (optax's step `count`) are not parameters and get
    `None`.

    **Arguments:**

    - `tree`: a PyTree, e.g. a [`RingTransformer`][eqx_ring.RingTransformer] or its optimizer state.

    **Returns:**

    A PyTree like `tree`: a tuple of logical names (one per dimension) in place of every array inside a
    module, `None` in place of every other leaf. The tuples are subtrees, so map over it with `tree` as
    the first tree (`jax.tree.map(f, tree, logical_axes(tree))`).

    **Raises:**

    `ValueError`, naming the array's path and module class, if an array inside a module has no
    declaration, or if a declaration names more dimensions than its array has.

    **Example:**

    ```python
    import jax
    import eqx_ring
    from eqx_ring.sharding import logical_axes

    model = eqx_ring.RingTransformer(64, 32, 2, 4, hidden_size=64, key=jax.random.key(0))
    axes = logical_axes(model)
    assert axes.blocks.attention.query_proj.weight == ("layers", "heads", "embed")  # [layers, out, in]
    assert axes.embedding.weight == ("vocab", "embed")
    assert axes.norm.weight == ("norm",)
    ```
    """
    entries, treedef = _walk(tree)
    return jax.tree_util.tree_unflatten(treedef, [names for _, _, names in entries])


def _mesh_axes(name: str | None, path: tuple, mesh: Mesh, rules: Mapping[str, _Rule]) -> tuple[str, ...]:
    """The mesh axes that `rules` split the logical axis `name` over (none for a `None` name)."""
    if name is None:
        return ()
    if name not in rules:
        raise ValueError(f"rules have no entry for the logical axis {name!r} of the array at "
                         f"{jax.tree_util.keystr(path)}; they cover {sorted(rules)}")
    rule = rules[name]
    axes = () if rule is None else (rule,) if isinstance(rule, str) else rule
    if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"rules[{name!r}] must be a mesh axis name, a tuple of them or None, got {rule!r}")
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"rules[{name!r}]={rule!r} names mesh axes {missing} that the mesh lacks; it has "
                         f"{tuple(mesh.axis_names)}")
    return axes


def _spec(path: tuple, leaf: jax.Array | jax.ShapeDtypeStruct, names: tuple[str | None, ...] | None, mesh: Mesh,
          rules: Mapping[str, _Rule]) -> P:
    if names is None:
        return P(*(None,) * leaf.ndim)
    spec, used = [], set()
    for name, dim in zip(names, leaf.shape, strict=True):
        axes = _mesh_axes(name, path, mesh, rules)
        # A mesh axis splits one dimension at most (the first that asks, as in MaxText), and an axis
        # that does not divide its dimension leaves it whole rather than padding the parameter.
        if not axes or used.intersection(axes) or dim % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
        else:
            used.update(axes)
            spec.append(rules[name])
    return P(*spec)


def param_shardings(params: PyTree, mesh: Mesh, *, rules: Mapping[str, _Rule] = DEFAULT_RULES) -> PyTree:
    """A `NamedSharding` for every array in `params` (a model, or its optimizer state): `None` elsewhere.

    Every array inside a module is placed by its logical axes ([`logical_axes`][eqx_ring.sharding.logical_axes])
    and `rules`, which map each logical axis to the mesh axes that split it. With the default
    [`DEFAULT_RULES`][eqx_ring.sharding.DEFAULT_RULES], linear layers split their heads or hidden
    side over `tp` and their `d_model` side over `fsdp`, embedding and LM head matrices split `d_model`
    over `fsdp`, and norm scales and the layer axis of stacked (scanned) blocks stay whole. An array
    inside a module that declares no axes for it is an error, not silently replicated.

    An optimizer state that mirrors the model gets the model's shardings. Arrays outside every module
    (optax's step `count`) are not parameters: they are replicated. A mesh axis splits at most one
    dimension of an array (the first whose rule names it), and an axis whose size does not divide a
    dimension leaves that dimension whole.

    **Arguments:**

    - `params`: a PyTree of arrays, e.g. a [`RingTransformer`][eqx_ring.RingTransformer] or its
      optimizer state, or of their shapes (`jax.ShapeDtypeStruct`s, as `eqx.filter_eval_shape`
      gives): the shardings to build the arrays with.
    - `mesh`: a mesh with the axes the rules name, e.g. from [`make_mesh`][eqx_ring.sharding.make_mesh].
    - `rules`: logical axis name → a mesh axis, a tuple of mesh axes, or `None` (keyword only);
      default [`DEFAULT_RULES`][eqx_ring.sharding.DEFAULT_RULES].

    **Returns:**

    A PyTree with the structure of `params`: a `jax.sharding.NamedSharding` on `mesh` for every
    array (or array shape) leaf, `None` for every other leaf.

    **Raises:**

    `ValueError`, naming the array's path, if an array inside a module has no declared logical axes
    (see [`logical_axes`][eqx_ring.sharding.logical_axes]), if `rules` lack one of its logical axes,
    or if a rule names an axis the mesh lacks; `TypeError` if a rule is not a mesh axis name, a tuple
    of them or `None`.

    **Example:**

    ```python
    import jax
    from jax.sharding import PartitionSpec as P
    import eqx_ring
    from eqx_ring.sharding import DEFAULT_RULES, make_mesh, param_shardings

    mesh = make_mesh(fsdp=2, tp=2, sp=2)
    ffn = eqx_ring.BlockwiseFFN(32, 64, key=jax.random.key(0))
    assert param_shardings(ffn, mesh).up_proj.weight.spec == P("tp", "fsdp")  # [hidden, d_model]
    tp_only = param_shardings(ffn, mesh, rules={**DEFAULT_RULES, "embed": None})
    assert tp_only.up_proj.weight.spec == P("tp", None)
    ```
    """
    entries, treedef = _walk(params)
    return jax.tree_util.tree_unflatten(treedef, [
        NamedSharding(mesh, _spec(path, leaf, names, mesh, rules)) if _is_param(leaf) else None
        for path, leaf, names in entries
    ])


def shard_params(params: PyTree, mesh: Mesh, *, rules: Mapping[str, _Rule] = DEFAULT_RULES) -> PyTree:
    """Place `params` by [`param_shardings`][eqx_ring.sharding.param_shardings].

    This is `eqx.filter_shard`: a `jax.device_put` outside `jit`, a sharding constraint inside it
    (e.g. on the updated model at the end of a train step). Non-array leaves are left as they are.

    **Arguments:**

    - `params`: a PyTree of arrays, e.g. a [`RingTransformer`][eqx_ring.RingTransformer] or its
      optimizer state, or of their shapes (`jax.ShapeDtypeStruct`s, as `eqx.filter_eval_shape`
      gives): the shardings to build the arrays with.
    - `mesh`: a mesh with the axes the rules name, e.g. from [`make_mesh`][eqx_ring.sharding.make_mesh].
    - `rules`: logical axis name → mesh axes (keyword only); default
      [`DEFAULT_RULES`][eqx_ring.sharding.DEFAULT_RULES].

    **Returns:**

    `params` with every array placed (or constrained) by its sharding.

    **Raises:**

    What [`param_shardings`][eqx_ring.sharding.param_shardings] raises.

    **Example:**

    ```python
    import jax
    from jax.sharding import PartitionSpec as P
    import eqx_ring
    from eqx_ring.sharding import make_mesh, shard_params

    mesh = make_mesh(tp=2, sp=2)  # dp=1, fsdp=2, tp=2, sp=2 on 8 devices
    attn = shard_params(eqx_ring.RingAttention(32, 4, key=jax.random.key(0)), mesh)
    # Weights are [out, in]: heads split over tp and d_model over fsdp, in both projections.
    assert attn.query_proj.weight.sharding.spec == P("tp", "fsdp")
    assert attn.output_proj.weight.sharding.spec == P("fsdp", "tp")
    ```
    """
    return eqx.filter_shard(params, param_shardings(params, mesh, rules=rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of `[batch, seq]` batches: examples over the data axes, the sequence over the ring.

    Its spec is `P(("dp", "fsdp"), "sp")`: the batch is split over
    [`BATCH_AXES`][eqx_ring.sharding.BATCH_AXES] and the sequence, which must already be in the
    model's layout ([`to_layout`][eqx_ring.to_layout]), over `"sp"`; over `("sp", "usp")` when the
    mesh has the hybrid's `"usp"` axis (see [`make_mesh`][eqx_ring.sharding.make_mesh]).

    **Arguments:**

    - `mesh`: a mesh with the axes `"dp"`, `"fsdp"` and `"sp"`, e.g. from
      [`make_mesh`][eqx_ring.sharding.make_mesh].

    **Returns:**

    A `jax.sharding.NamedSharding` on `mesh`, for `jax.device_put` or `eqx.filter_shard`.
    """
    return NamedSharding(mesh, P(BATCH_AXES, ("sp", "usp") if "usp" in mesh.axis_names else "sp"))


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
