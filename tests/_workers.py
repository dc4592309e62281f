"""Functions that `multiprocess.launch` runs in every process of a multi-process JAX run."""

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
