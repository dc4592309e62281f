"""Decoding at long context on 8 CPU devices: KV-cached steps against recomputing the sequence per token.

    python benchmarks/decode.py                    # contexts 4096 and 16384
    python benchmarks/decode.py --seq 4096 --steps 16

A 2-layer RingTransformer (d_model 256, 4 query / 2 kv heads, SwiGLU hidden 1024, vocab 256, zigzag,
float32) on an `sp=8` mesh. For each context T:

- cached: the prompt (T - steps tokens) is prefilled by ring attention once; then each token is one
  jitted `decode_step` against the cache, which stays split over the 8 devices. Median over `steps` tokens.
- recompute: one forward pass of the whole T-token sequence per new token (what decoding without a
  cache costs). Median of 3.
- bytes moved per token per device: the collectives in the compiled `decode_step` (summed result
  sizes of its all-reduce / collective-permute / all-gather ops, read from the HLO; the layers are
  unrolled, `scan_layers=False`, so each op in the text runs once per token), against rotating
  each layer's k and v shards once around the ring (n - 1 hops of T/n slots), as the seed's decoder does.
"""

import argparse
import re

import jax

jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from _common import median_seconds

import eqx_ring
from eqx_ring.sharding import make_mesh

_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|collective-permute|all-gather|all-to-all|reduce-scatter)"
                         r"(?:-start)?\(")
_SHAPE = re.compile(r"(f64|f32|bf16|f16|s32|u32|s8|u8|pred)\[([\d,]*)\]")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def collective_bytes(hlo: str) -> tuple[int, int]:
    """(number of collective ops, bytes of their results) in a compiled module's text."""
    count = total = 0
    for shapes, _ in _COLLECTIVE.findall(hlo):
        count += 1
        for dtype, dims in _SHAPE.findall(shapes):
            total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return count, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens timed per context")
    args = parser.parse_args()
    n = 8
    mesh = make_mesh(dp=1, fsdp=1, tp=1, sp=n)
    tuning = eqx_ring.KernelTuning(query_chunk_size=256, key_chunk_size=256, ffn_chunk_size=2048)
    spec = eqx_ring.AttentionSpec(layout="zigzag", mesh=mesh, tuning=tuning)
    model = eqx_ring.RingTransformer(256, 256, 2, 4, spec=spec, num_kv_heads=2, hidden_size=1024, scan_layers=False,
                                     key=jax.random.key(0))
    layers, kv_heads, head_dim = 2, 2, 64
    print(f"RingTransformer decoding, {n} CPU devices (sp={n}), 2 layers, d_model 256, GQA 4/2, zigzag, float32")
    print(f"{'T':>6}{'cached tok/s':>14}{'recompute tok/s':>17}{'speed-up':>10}"
          f"{'bytes/token (ours)':>20}{'rotating cache':>16}{'ratio':>9}")
    for seq in args.seq:
        cached, recompute, ops, ours = measure(model, n, seq, args.steps)
        rotating = layers * 2 * (n - 1) * (seq // n) * kv_heads * head_dim * 4
        print(f"{seq:>6}{1 / cached:>14,.1f}{1 / recompute:>17,.2f}{recompute / cached:>9,.0f}x"
              f"{ours:>14,} B ({ops}){rotating:>14,} B{rotating / max(ours, 1):>8,.0f}x", flush=True)


def measure(model, n: int, seq: int, steps: int) -> tuple[float, float, int, int]:
    """(seconds per cached token, seconds per recomputed token, collective ops, their bytes) at context `seq`."""
    prompt = seq - steps
    tokens = jax.random.randint(jax.random.key(1), (seq,), 0, 256)
    segments = jnp.where(jnp.arange(seq) < prompt, 1, 2)
    laid = [eqx_ring.to_layout(a, "zigzag", n, axis=0) for a in (tokens, jnp.arange(seq), segments)]
    prefill = eqx.filter_jit(lambda m, t, p, s: m.prefill(t, length=prompt, positions=p, segment_ids=s))
    _, cache = prefill(model, *laid)
    params, static = eqx.partition(model, eqx.is_array)
    step = jax.jit(lambda params, token, cache: eqx.combine(params, static).decode_step(token, cache))
    compiled = step.lower(params, tokens[0], cache).compile()
    ops, ours = collective_bytes(compiled.as_text())
    state = {"cache": compiled(params, tokens[0], cache)[1]}

    def one_token():
        hidden, state["cache"] = compiled(params, tokens[0], state["cache"])
        return hidden

    cached = median_seconds(one_token, steps - 2)
    forward = eqx.filter_jit(lambda m, t: m.logits(m(t)[-1]))
    jax.block_until_ready(forward(model, laid[0]))
    recompute = median_seconds(lambda: forward(model, laid[0]), 3)
    return cached, recompute, ops, ours

if __name__ == "__main__":
    main()
