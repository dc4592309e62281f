"""`models.train`'s checkpoints: arrays restored by tree path (never by leaf order), the data state per process."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import models

CONFIG = models.TrainConfig(stages=(models.Stage(seq_len=4, steps=2),), batch_size=4, learning_rate=0.1,
                            warmup_steps=1, checkpoint_every=1)


class Pair(eqx.Module):
    first: eqx.nn.Linear
    second: eqx.nn.Linear

    def __init__(self, *, key, width=3):
        k1, k2 = jax.random.split(key)
        self.first, self.second = eqx.nn.Linear(3, width, key=k1), eqx.nn.Linear(width, 3, key=k2)

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


class Swapped(eqx.Module):
    """`Pair` with its fields declared in the other order: the same shapes, each at the other's leaf positions."""

    second: eqx.nn.Linear
    first: eqx.nn.Linear

    def __init__(self, *, key):
        pair = Pair(key=key)
        self.first, self.second = pair.first, pair.second

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


class Triple(eqx.Module):
    first: eqx.nn.Linear
    second: eqx.nn.Linear
    third: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.first, self.second, self.third = (eqx.nn.Linear(3, 3, key=k) for k in (k1, k2, k3))

    def __call__(self, x):
        return self.third(jnp.tanh(self.second(jnp.tanh(self.first(x)))))


class Batches:
    """Regression batches drawn from the position, which is the iterator's state; remembers the states set."""

    def __init__(self):
        self.position = 0
        self.states_set = []

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.position)
        self.position += 1
        x = rng.normal(size=(4, 3)).astype(np.float32)
        return {"x": x, "y": np.sin(x)}

    def get_state(self):
        return {"position": self.position, "seed": [0, 1]}

    def set_state(self, state):
        self.states_set.append(state)
        self.position = state["position"]


def loss_fn(model, batch):
    return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2), {}


def train(model, workdir, data=None):
    data = Batches() if data is None else data
    return models.train(model, loss_fn, lambda index, stage: data, CONFIG, workdir=workdir, progress=False,
                        tokens_per_batch=lambda b: int(b["x"].shape[0]))


def by_path(tree):
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]}


def assert_same_by_path(got, expected):
    got, expected = by_path(got), by_path(expected)
    assert got.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)


def test_a_resumed_run_restores_model_optimizer_and_data_state_exactly(tmp_path):
    initial = Pair(key=jax.random.key(0))
    trained = train(initial, tmp_path)
    assert not np.array_equal(trained.model.first.weight, initial.first.weight)  # the checkpoint is not the start
    data = Batches()
    # Finished: a second call restores the last checkpoint into the initial model and trains no more.
    restored = train(initial, tmp_path, data)
    assert len(restored.records) == 2 and data.states_set == [{"position": 2, "seed": [0, 1]}]
    assert_same_by_path(restored.model, trained.model)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(trained.opt_state)
    assert_same_by_path(restored.opt_state, trained.opt_state)


def test_fields_declared_in_another_order_receive_their_own_weights(tmp_path):
    trained = train(Pair(key=jax.random.key(0)), tmp_path)
    target = Swapped(key=jax.random.key(1))
    restored = train(target, tmp_path)
    assert isinstance(restored.model, Swapped)
    # Every array of the model and of the optimizer state (Adam's moments) is the one saved under its name ...
    assert_same_by_path(restored.model, trained.model)
    assert_same_by_path(restored.opt_state, trained.opt_state)
    # ... where the leaves in their saved order, put into the new class (as checkpoints once were), swap the layers.
    by_position = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(trained.model))
    np.testing.assert_array_equal(by_position.first.weight, trained.model.second.weight)
    assert not np.array_equal(by_position.first.weight, restored.model.first.weight)


@pytest.mark.parametrize("model, message", [
    (Triple(key=jax.random.key(1)),
     r"the checkpoint's 'model' item of step 2 does not fit the model: the model has third\.bias, third\.weight, "
     r"which the checkpoint lacks\. Arrays are restored by their tree paths"),
    (eqx.nn.Linear(3, 3, key=jax.random.key(1)),
     r"the model has bias, weight, which the checkpoint lacks; the checkpoint has first\.bias, first\.weight, "
     r"second\.bias, second\.weight, which the model lacks"),
    (Pair(key=jax.random.key(1), width=5),
     r"does not fit the model: first\.bias is \(3,\) in the checkpoint and \(5,\) in the model, first\.weight is "
     r"\(3, 3\) in the checkpoint and \(5, 3\) in the model, second\.weight is \(3, 3\) in the checkpoint and "
     r"\(3, 5\) in the model\."),
], ids=["a path missing", "other paths", "other shapes"])
def test_a_checkpoint_of_other_paths_or_shapes_is_refused_naming_them(tmp_path, model, message):
    train(Pair(key=jax.random.key(0)), tmp_path)
    with pytest.raises(ValueError, match=message):
        train(model, tmp_path)


def test_a_checkpoint_of_leaves_by_position_is_refused(tmp_path):
    model = Pair(key=jax.random.key(0))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute(), options=options) as manager:
        manager.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(jax.tree.leaves(model)),
                                                data=ocp.args.JsonSave({"states": [{"position": 2}]})))
    with pytest.raises(ValueError, match=r"the checkpoint of step 2 in .* has no 'model' item \(it holds \['data', "
                                         r"'params'\]\): it was written by an older eqx-ring that saved the arrays "
                                         r"as a flat list matched by position"):
        train(model, tmp_path)


def as_if_saved_by_two_processes(workdir, states):
    """Replace the data state of `workdir`'s step-2 checkpoint by `states`, one per process of two."""
    data = workdir / "checkpoints" / "2" / "data"
    (saved,) = data.glob("process_*")
    assert saved.name == "process_0-of-1.json" and json.loads(saved.read_text())["position"] == 2
    saved.unlink()
    for index, state in enumerate(states):
        (data / f"process_{index}-of-2.json").write_text(json.dumps(state))


def test_per_row_data_states_of_every_process_merge_on_restore(tmp_path):
    model = Pair(key=jax.random.key(0))
    train(model, tmp_path)
    as_if_saved_by_two_processes(tmp_path, [{"rows": {"0": {"position": 2}, "1": {"position": 3}}},
                                            {"rows": {"2": {"position": 4}}}])
    data = Batches()
    data.set_state = data.states_set.append  # these states are not Batches', only recorded
    train(model, tmp_path, data)
    assert data.states_set == [{"rows": {"0": {"position": 2}, "1": {"position": 3}, "2": {"position": 4}}}]


def test_per_process_data_states_of_another_process_count_are_refused(tmp_path):
    model = Pair(key=jax.random.key(0))
    train(model, tmp_path)
    as_if_saved_by_two_processes(tmp_path, [{"position": 2}, {"position": 2}])
    with pytest.raises(ValueError, match="the checkpoint's data state was saved by 2 processes and this run has 1; "
                                         "per-process pipelines cannot be regrouped"):
        train(model, tmp_path)
    (tmp_path / "checkpoints" / "2" / "data" / "process_1-of-2.json").unlink()
    with pytest.raises(ValueError, match=r"the data state in .* must hold one file process_<i>-of-<n>\.json for "
                                         r"each i < n of one n, got \['process_0-of-2\.json'\]"):
        train(model, tmp_path)


def test_after_step_sees_the_steps_batch_though_the_step_donated_its_buffers(tmp_path):
    """With a weight shaped like the batch's `x` ([4, 3] f32), XLA may reuse the donated batch's buffer for the new
    weight; `after_step` must still get the step's batch, equal to the one the iterator gave."""
    seen = []

    def after_step(model, batch, metrics, step):
        seen.append(np.asarray(batch["x"]))
        return model

    models.train(Pair(key=jax.random.key(0), width=4), loss_fn, lambda index, stage: Batches(), CONFIG,
                 workdir=tmp_path, progress=False, tokens_per_batch=lambda b: int(b["x"].shape[0]),
                 after_step=after_step)
    expected = Batches()
    for x in seen:
        np.testing.assert_array_equal(x, next(expected)["x"])
    assert len(seen) == 2
