"""BlockwiseFFN against the plain FFN: compiled temp memory and time of fwd+bwd, one CPU device.

    python benchmarks/ffn_memory.py                    # 32K tokens, d_model 512, hidden 2048, chunk 2048
    python benchmarks/ffn_memory.py --tokens 8192 --reps 2

Every variant computes the same SwiGLU FFN with the same weights: the plain one is `BlockwiseFFN.dense`
applied to the whole sequence at once (also under `jax.checkpoint`, which recomputes its forward pass in the
backward pass as a blockwise FFN and a rematerialised layer do), and the `lax.map` form is how `BlockwiseFFN`
chunked before it read its chunks in place. Memory is XLA's compiled temp size (activations saved for
the backward pass and temporaries; parameters, inputs and outputs excluded).
"""

import argparse
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from _common import fmt_bytes, median_seconds, temp_bytes

import eqx_ring


def _lax_map_chunks(module: eqx_ring.BlockwiseFFN, x, chunk: int):
    """The form BlockwiseFFN had before its chunks were read in place: the same strided chunks, copied into
    chunk order, mapped under `jax.checkpoint`, and copied back."""
    seq, d = x.shape
    chunks = x.reshape(chunk, seq // chunk, d).swapaxes(0, 1)
    dense = jax.checkpoint(type(module).dense)
    return jax.lax.map(lambda piece: dense(module, piece), chunks).swapaxes(0, 1).reshape(seq, d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--map-chunks", type=int, nargs="*", default=[2048],
                        help="chunk sizes of the lax.map form BlockwiseFFN used before its in-place chunks")
    parser.add_argument("--activation", default="swiglu", choices=["swiglu", "gelu"])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d_model))
    rows = []

    # One module: every variant has the same weights; the blockwise ones differ only in the chunk size of the call.
    module = eqx_ring.BlockwiseFFN(args.d_model, args.hidden, activation=args.activation, key=jax.random.key(0))
    variants = [("plain FFN", lambda m, x: m.dense(x)),
                ("plain FFN, remat", lambda m, x: jax.checkpoint(type(m).dense)(m, x))]
    variants += [(f"BlockwiseFFN chunk {c}", lambda m, x, c=c: m(x, chunk_size=c)) for c in args.chunks]
    variants += [(f"lax.map chunk {c}", lambda m, x, c=c: _lax_map_chunks(m, x, c)) for c in args.map_chunks]
    for name, call in variants:
        params, static = eqx.partition(module, eqx.is_array)

        def loss(params, x, call=call, static=static):
            return jnp.sum(call(eqx.combine(params, static), x) ** 2)

        step = jax.value_and_grad(loss, argnums=(0, 1))
        mem = temp_bytes(step, params, x)
        compiled = jax.jit(step)
        jax.block_until_ready(compiled(params, x))
        rows.append((name, mem, median_seconds(lambda compiled=compiled, params=params: compiled(params, x),
                                               args.reps)))

    base_mem, base_time = rows[0][1], rows[0][2]
    print(f"{args.activation} FFN fwd+bwd, {args.tokens} tokens, d_model {args.d_model}, hidden {args.hidden}, "
          f"float32, {jax.devices()[0].platform}")
    print(f"{'variant':<26}{'temp memory':>14}{'vs plain':>10}{'time':>10}{'vs plain':>10}")
    for name, mem, sec in rows:
        print(f"{name:<26}{fmt_bytes(mem):>14}{mem / base_mem:>10.3f}{sec * 1e3:>8.0f}ms{sec / base_time:>10.2f}")


if __name__ == "__main__":
    main()
