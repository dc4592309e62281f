"""Per-device compiled temp memory of a RingTransformer train step's fwd+bwd, sequence split over n devices.

    python benchmarks/transformer_memory.py                  # T = 32768, n = 1, 2, 4, 8
    python benchmarks/transformer_memory.py --seq 8192

The model of the sharding tests, widened: 2 layers, d_model 256, 4 query / 2 kv heads, SwiGLU hidden
1024, vocab 256, causal, zigzag layout, one example, float32, remat "nothing_saveable". Each row
compiles the same jitted loss-and-gradient function (chunked cross-entropy) on an `sp=n` mesh and
reads XLA's temp size for one device (activations and temporaries; parameters and inputs excluded).
Linear scaling means n × memory(n) stays near memory(1). Nothing is run, only compiled.
"""

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx
import jax.numpy as jnp

import eqx_ring
from eqx_ring.sharding import BATCH_AXES, batch_sharding, make_mesh, shard_params


def temp_per_device(n: int, args) -> tuple[int, int]:
    mesh = make_mesh(sp=n, fsdp=1, devices=jax.devices()[:n])
    tuning = eqx_ring.KernelTuning(query_chunk_size=512, key_chunk_size=512, ffn_chunk_size=2048)
    spec = eqx_ring.AttentionSpec(layout="zigzag", mesh=mesh, tuning=tuning)
    model = eqx_ring.RingTransformer(
        args.vocab, args.d_model, args.layers, 4, spec=spec, num_kv_heads=2, hidden_size=4 * args.d_model,
        key=jax.random.key(0),
    )
    params, static = eqx.partition(shard_params(model, mesh), eqx.is_array)
    tokens = jax.ShapeDtypeStruct((1, args.seq), jnp.int32, sharding=batch_sharding(mesh))

    def loss(params, tokens):
        model = eqx.combine(params, static)
        hidden = jax.vmap(model, spmd_axis_name=BATCH_AXES)(tokens)
        return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, tokens, vocab_chunk_size=args.vocab)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    stats = compiled.memory_analysis()
    return stats.temp_size_in_bytes, stats.argument_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    print(f"RingTransformer fwd+bwd, T={args.seq}, {args.layers} layers, d_model {args.d_model}, zigzag, float32")
    print(f"{'n (sp)':>7}{'temp / device':>16}{'n x temp vs row 1':>21}{'args / device':>16}")
    base = None
    for n in args.devices:
        temp, arg = temp_per_device(n, args)
        base = temp * n if base is None else base
        print(f"{n:>7}{temp / 2**20:>12,.1f} MiB{n * temp / base:>21.2f}{arg / 2**20:>12,.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
