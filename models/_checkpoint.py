"""The items of [`train`][models.train]'s orbax checkpoints: arrays keyed by tree path, and every process's data state.

A step's directory holds three items:

- `model` and `opt_state`: the arrays of the model and of the optimizer state, saved by orbax's standard pytree
  handler under their tree paths (`transformer.blocks.attention.query_proj.weight`, and `1.0.mu.` before it for
  Adam's first moment). They are restored by those names into the target's tree, each array with the target's
  dtype and sharding, after `restore_checkpoint` has checked that the paths and shapes agree: an array is never
  matched by its position among the leaves, so fields reordered in a class still receive their own weights, and
  a field added, removed or renamed is refused, naming it.
- `data`: `DataStateHandler`'s files, one JSON file per process with that process's data-iterator state.
"""

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from etils import epath

_LISTED = 8  # paths named in a mismatch error before "and N more"


class DataStateHandler(ocp.CheckpointHandler):
    """Saves each process's data-iterator state as `process_{i}-of-{n}.json` in the item's directory, and restores
    the state a process of the current run resumes from.

    Every process writes its own file into the step's directory (a shared one, as
    [`train`][models.train] requires with several processes), so gathering the states needs no collective; orbax
    finalises the step only after every process has written. On restore the states are read back in process
    order: states made of per-row states (`{"rows": {row: state}}`, as those of
    [`global_packed_batches`][data_pipelines.global_packed_batches]) merge into one that any process count can
    resume from; any other state is handed to the process of the same index, which needs the process count that
    saved it.
    """

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
        del args
        states = _read_states(directory)
        if all(isinstance(s, dict) and "rows" in s for s in states):
            return {"rows": {row: s for state in states for row, s in state["rows"].items()}}
        if len(states) != jax.process_count():
            raise ValueError(
                f"the checkpoint's data state was saved by {len(states)} processes and this run has "
                f"{jax.process_count()}; per-process pipelines cannot be regrouped: use "
                "data_pipelines.global_packed_batches, whose position does not depend on the process count")
        return states[jax.process_index()]


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    """Save this process's data-iterator state (`iterator.get_state()`, JSON-serialisable) with `DataStateHandler`."""

    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    """Restore, with `DataStateHandler`, the data-iterator state this process resumes from."""


def _read_states(directory: epath.Path) -> list[Any]:
    found = {}
    for path in directory.glob("process_*-of-*.json"):
        match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
        if match:
            found[int(match[1]), int(match[2])] = json.loads(path.read_text())
    counts = {count for _, count in found}
    if len(counts) != 1 or sorted(index for index, _ in found) != list(range(next(iter(counts)))):
        raise ValueError(f"the data state in {directory} must hold one file process_<i>-of-<n>.json for each "
                         f"i < n of one n, got {sorted(p.name for p in directory.glob('process_*'))}")
    return [found[key] for key in sorted(found)]


def open_checkpoints(directory: Path, *, max_to_keep: int) -> ocp.CheckpointManager:
    """A synchronous orbax `CheckpointManager` in `directory` (created if absent) for [`train`][models.train]'s items,
    keeping the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
    handlers = {"model": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "data": DataStateHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, model: Any, opt_state: Any, data_state: Any) -> None:
    """Save step `step`: the arrays of `model` and `opt_state` under their tree paths and this process's
    `data_state`. Every process calls it. Non-array leaves are not saved: training does not change them, and
    the restore takes them from its target."""
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(eqx.filter(model, eqx.is_array)),
        opt_state=ocp.args.StandardSave(eqx.filter(opt_state, eqx.is_array)),
        data=DataStateSave(data_state),
    ))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, model: Any, opt_state: Any) -> tuple[Any, Any, Any]:
    """Step `step`'s model, optimizer state and data state, each array restored by its tree path into `model` and
    `opt_state` (which give the structure, the non-array leaves, and the dtype and sharding of every array).

    **Raises:** `ValueError` naming the paths when the saved arrays' paths differ from the target's (missing in
    the checkpoint, or in the target), when an array's shape differs, or when the checkpoint was written by
    an eqx-ring that saved the leaves as a flat list, by position; the data state's errors of
    `DataStateHandler`.
    """
    saved = manager.item_metadata(step)
    if saved.get("model") is None:
        raise ValueError(
            f"the checkpoint of step {step} in {manager.directory} has no 'model' item (it holds "
            f"{sorted(saved.keys())}): it was written by an older eqx-ring that "
            "saved the arrays as a flat list matched by position, which cannot be restored by name; start in "
            "another workdir")
    targets = {"model": eqx.filter(model, eqx.is_array), "opt_state": eqx.filter(opt_state, eqx.is_array)}
    for (name, target), what in zip(targets.items(), ("the model", "the optimizer state"), strict=True):
        _check_paths(f"the checkpoint's {name!r} item of step {step}", saved[name].tree, what, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
           for name, target in targets.items()},
        data=DataStateRestore(),
    ))
    return eqx.combine(restored["model"], model), eqx.combine(restored["opt_state"], opt_state), restored["data"]


def _check_paths(item: str, saved: Any, what: str, target: Any) -> None:
    """Refuse to restore `target` from the `saved` metadata tree unless both hold arrays of the same shapes under the
    same paths, naming the differences."""
    saved_shapes = {".".join(path): tuple(meta.shape) for path, meta in ocp.tree.to_flat_dict(saved).items()}
    target_shapes = {".".join(path): tuple(x.shape) for path, x in ocp.tree.to_flat_dict(target).items()}
    problems = []
    if missing := sorted(target_shapes.keys() - saved_shapes):
        problems.append(f"{what} has {_listed(missing)}, which the checkpoint lacks")
    if unexpected := sorted(saved_shapes.keys() - target_shapes):
        problems.append(f"the checkpoint has {_listed(unexpected)}, which {what} lacks")
    if shapes := [f"{p} is {saved_shapes[p]} in the checkpoint and {target_shapes[p]} in {what}"
                  for p in sorted(saved_shapes.keys() & target_shapes) if saved_shapes[p] != target_shapes[p]]:
        problems.append(_listed(shapes))
    if problems:
        raise ValueError(f"{item} does not fit {what}: {'; '.join(problems)}. Arrays are restored by their tree "
                         "paths: resume with the model the checkpoint was written for, or start in another workdir")


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"
