"""Functions that `multiprocess.launch` runs in every process of a multi-process JAX run."""

from pathlib import Path

import numpy as np


def ring_attention_across_processes(out_dir: str) -> None:
    """Causal zigzag ring attention over an `sp` axis of every process's devices; each process saves its shards."""
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from multiprocess_inputs import attention_inputs

    import eqx_ring

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "sp"))
    q, k, v = (eqx_ring.to_layout(x, "zigzag", n, axis=1) for x in attention_inputs())
    arrays = [jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]) for x in (q, k, v)]
    ring = jax.jit(jax.shard_map(
        lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name="sp", layout="zigzag", causal=True,
                                                query_chunk_size=8, key_chunk_size=8),
        mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"),
    ))
    out = ring(*arrays)
    for shard in out.addressable_shards:
        start = shard.index[1].start
        np.save(f"{out_dir}/slots_{start}.npy", np.asarray(shard.data))


def hang_in_process_1(out_dir: str) -> None:
    """Process 1 never returns (a stuck peer); the others finish."""
    import time

    import jax

    while jax.process_index() == 1:
        time.sleep(1)


class _Preempted(Exception):
    pass


def train_video_text_runs(out_dir: str) -> None:
    """The tiny video-text LM's training runs that `out_dir/plan.json` lists, one after another.

    Each run is `{"workdir": ..., "stop_after": k or null}`: train 5 steps on a (dp=2, sp=4) mesh
    in `workdir` (resuming from its checkpoints), or stop as if preempted once step k's checkpoint
    is written.
    """
    import json
    import logging

    import jax
    from multiprocess_inputs import tiny_video_text

    from eqx_ring.sharding import make_mesh
    from models import _demo

    log = logging.getLogger("models")  # what the CLI shows: "resuming ..." lines
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    config, records = tiny_video_text()
    mesh = make_mesh(config.mesh)
    print(f"process {jax.process_index()} of {jax.process_count()}: mesh {dict(mesh.shape)}", flush=True)
    with open(f"{out_dir}/plan.json") as f:
        plan = json.load(f)
    for run in plan["runs"]:
        stop_after = run["stop_after"]

        def after_step(model, batch, metrics, step, stop_after=stop_after):
            if stop_after is not None and step > stop_after:
                raise _Preempted
            return model

        try:
            _demo.train_video_text(config, records, Path(run["workdir"]), mesh, progress=False, after_step=after_step)
        except _Preempted:
            print(f"stopped {run['workdir']} after step {stop_after}", flush=True)


def train_without_a_mesh(out_dir: str) -> None:
    """`models.train` in a multi-process run without a mesh: a clear error, before any checkpointing."""
    from models import Stage, TrainConfig, train

    try:
        train(None, None, None, TrainConfig(stages=(Stage(8, 1),)), workdir=out_dir)
    except ValueError as error:
        print(f"refused: {error}")
