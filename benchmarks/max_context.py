"""Memory of a RingTransformer train step versus T, and the longest T that fits a per-device budget.

The Ring Attention paper's Table 3 (max context per number of devices), reproduced by ahead-of-time
compilation on simulated CPU devices: nothing runs, each configuration is compiled and XLA's
`memory_analysis()` gives its per-device footprint, `argument + output - aliased + temp` bytes (parameters,
gradients, AdamW moments and activations: the peak a device must hold).

One train step = loss, gradients and an AdamW update of a causal RingTransformer (default: 2 layers,
d_model 512, 8 heads, SwiGLU hidden 2048, vocab 1024, float32, remat "nothing_saveable" per layer, as the
paper uses full rematerialisation for every method). The model is small so that parameters, gradients and
moments (150 MB, replicated on the ring's devices) leave the budgets to the activations. Four ways to hold the sequence:

- vanilla: `jax.nn.dot_product_attention` (XLA; the T x T scores of every head exist at once, and autodiff keeps
  what the backward pass needs) and the FFN over the whole sequence;
- memory-efficient attention: blockwise attention (chunks of 512), FFN over the whole sequence;
- blockwise attention + FFN (BPT): blockwise attention and the FFN 2048 tokens at a time;
- ring attention: BPT with the sequence split over n devices (mesh sp=n, zigzag layout).

With n devices the first three shard parameters and optimizer state over n (FSDP) and give each device one
whole sequence (batch n); ring attention gives the n devices one sequence (batch 1). Max context: the largest
T (a multiple of 1024 per device; searched by doubling, then bisection to 1/8) whose step fits the budget; with
`--exact`, bisection goes on over the lengths the model accepts (also multiples of the FFN chunk where it is chunked)
until the next one up does not fit.

    python benchmarks/max_context.py --budgets 1 4 16 --devices 1 2 4 8 --plot max_context.png
    python benchmarks/max_context.py --variants "ring attention" --budgets 4 --exact
    python benchmarks/max_context.py --scaling --seq 8192 16384 32768 65536 --plot memory_scaling.png
"""

import argparse
import dataclasses
import functools
import json
import math

import jax

jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_ring
from eqx_ring.sharding import BATCH_AXES, batch_sharding, make_mesh, shard_params

VARIANTS = ("vanilla", "memory-efficient attn", "blockwise attn + FFN", "ring attention")
GIB = 2**30


class _DenseAttention(eqx_ring.RingAttention):
    """`RingAttention` whose attention is plain `jax.nn.dot_product_attention`: the vanilla transformer."""

    def _attend(self, q, k, v, segment_ids, spec: eqx_ring.AttentionSpec, inside: bool, dropout_rate, key):
        # Under `vmap(spmd_axis_name=BATCH_AXES)` these constraints keep each example on its own data shard.
        q, k, v = (jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, P())) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=spec.causal, implementation="xla")
        return jax.lax.with_sharding_constraint(out, NamedSharding(spec.mesh, P()))


def _vanilla(model: eqx_ring.RingTransformer) -> eqx_ring.RingTransformer:
    attention = model.blocks.attention
    dense = object.__new__(_DenseAttention)
    for field in dataclasses.fields(attention):
        object.__setattr__(dense, field.name, getattr(attention, field.name))
    return eqx.tree_at(lambda m: m.blocks.attention, model, dense)


def step_bytes(variant: str, n: int, seq: int, args) -> int:
    """Per-device bytes of one compiled train step (no execution)."""
    ring = variant == "ring attention"
    mesh = make_mesh(dp=1, fsdp=1 if ring else n, tp=1, sp=n if ring else 1, devices=jax.devices()[:n])
    whole = variant == "vanilla"
    chunk = seq if whole else args.chunk
    ffn_chunk = seq if variant in ("vanilla", "memory-efficient attn") else args.ffn_chunk
    tuning = eqx_ring.KernelTuning(query_chunk_size=chunk, key_chunk_size=chunk, ffn_chunk_size=ffn_chunk,
                                   kv_pieces=args.kv_pieces if ring else 1)
    spec = eqx_ring.AttentionSpec(layout="zigzag", mesh=mesh, tuning=tuning)
    model = eqx_ring.RingTransformer(
        args.vocab, args.d_model, args.layers, args.heads, spec=spec, hidden_size=4 * args.d_model,
        key=jax.random.key(0))
    if whole:
        model = _vanilla(model)
    optimizer = optax.adamw(1e-4)
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    shardings = eqx_ring.sharding.param_shardings((params, opt_state), mesh)
    params, opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     (params, opt_state), shardings)
    tokens = jax.ShapeDtypeStruct((1 if ring else n, seq), jnp.int32, sharding=batch_sharding(mesh))

    compute = jnp.dtype(args.compute_dtype)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        def loss(params):
            # As models.make_train_step does: the model runs in the compute dtype from float32 master weights.
            model = eqx.combine(jax.tree.map(lambda x: x.astype(compute), params), static)
            hidden = jax.vmap(model, spmd_axis_name=BATCH_AXES)(tokens)
            return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, tokens,
                                                  vocab_chunk_size=args.vocab_chunk)

        grads = jax.grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return shard_params(optax.apply_updates(params, updates), mesh), opt_state

    stats = step.lower(params, opt_state, tokens).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


def max_context(variant: str, n: int, budgets: list[float], args, log, exact: bool = False) -> dict[float, int]:
    """For each budget (GiB), the largest T whose step fits, searched on multiples of `unit` to 1/8; with `exact`,
    then to the next valid length (the largest fitting T is below it)."""
    # Zigzag halves of each device's block, and each of its kv_pieces, hold whole chunks of 512.
    unit = n * math.lcm(1024, 512 * args.kv_pieces) if variant == "ring attention" else 1024
    seen: dict[int, int] = {}

    def fits(units: int, budget: float) -> bool:
        if units not in seen:
            seen[units] = step_bytes(variant, n, units * unit, args)
            log(variant, n, units * unit, seen[units])
        return seen[units] <= budget * GIB

    found = {}
    for budget in sorted(budgets):
        lo = max([u for u in seen if seen[u] <= budget * GIB], default=0)
        hi = min([u for u in seen if seen[u] > budget * GIB], default=None)
        if hi is None:
            hi = max(lo, 1)
            while fits(hi, budget):
                lo, hi = hi, hi * 2
        while hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, budget) else (lo, mid)
        if exact:
            lo, hi = _refine(lo, hi, _granule(variant, unit, args) // unit, functools.partial(fits, budget=budget))
        found[budget] = lo * unit
    return found


def _granule(variant: str, unit: int, args) -> int:
    """The step of an exact search: T must also be a multiple of the FFN's chunk where the FFN is chunked."""
    return math.lcm(unit, args.ffn_chunk) if variant in ("blockwise attn + FFN", "ring attention") else unit


def _refine(lo: int, hi: int, step: int, fits) -> tuple[int, int]:
    """Bisect on the multiples of `step` strictly between `lo` (fits) and `hi` (does not)."""
    while (first := (lo // step + 1) * step) <= (last := (hi - 1) // step * step):
        mid = first + (last - first) // step // 2 * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 4, 16], help="GiB per device")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--scaling", action="store_true", help="memory at --seq for each n instead of max context")
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--ffn-chunk", type=int, default=2048)
    parser.add_argument("--vocab-chunk", type=int, default=8192,
                        help="the loss's vocab_chunk_size (default: the library's, the whole vocab here)")
    parser.add_argument("--kv-pieces", type=int, default=1, help="ring attention's kv_pieces (KernelTuning)")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the dtype the model runs in (master weights and AdamW stay float32)")
    parser.add_argument("--exact", action="store_true",
                        help="search max context to the next valid T, not to 1/8 (more compiles)")
    parser.add_argument("--million", action="store_true", help="also: does T = 2^20 fit 8 devices (ring)?")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG here")
    parser.add_argument("--verbose", action="store_true", help="print every compiled configuration")
    args = parser.parse_args()

    def log(variant, n, seq, size):
        if args.verbose:
            print(f"  compiled {variant}, n={n}, T={seq}: {size / GIB:.3f} GiB", flush=True)

    model = (f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, hidden {4 * args.d_model}, "
             f"vocab {args.vocab}, float32, AdamW")
    results: dict = {"model": model, "args": vars(args)}
    if args.scaling:
        print(f"Per-device bytes of one train step ({model})")
        print(f"{'method':<24}{'n':>3}" + "".join(f"{f'T={t}':>13}" for t in args.seq))
        table = {}
        for variant in args.variants:
            for n in args.devices:
                sizes = [step_bytes(variant, n, t, args) for t in args.seq]
                table[f"{variant}|{n}"] = sizes
                print(f"{variant:<24}{n:>3}" + "".join(f"{s / GIB:>9.3f} GiB" for s in sizes), flush=True)
        results["scaling"] = table
    else:
        print(f"Max context (tokens) per device budget ({model})")
        print(f"{'method':<24}{'n':>3}" + "".join(f"{f'{b:g} GiB':>12}" for b in args.budgets))
        table = {}
        for variant in args.variants:
            for n in args.devices:
                found = max_context(variant, n, args.budgets, args, log, exact=args.exact)
                table[f"{variant}|{n}"] = found
                print(f"{variant:<24}{n:>3}" + "".join(f"{found[b]:>12,}" for b in args.budgets), flush=True)
        results["max_context"] = {k: {str(b): t for b, t in v.items()} for k, v in table.items()}
    if args.million:
        size = step_bytes("ring attention", 8, 2**20, args)
        results["million"] = size
        print(f"ring attention, 8 devices, T = 1,048,576: {size / GIB:.2f} GiB per device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results, args)


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = dict(zip(VARIANTS, ("s-", "^-", "d-", "o-"), strict=True))
    if "scaling" in results:
        for key, sizes in results["scaling"].items():
            variant, n = key.split("|")
            ax.plot(args.seq, [s / GIB for s in sizes], styles[variant], label=f"{variant}, n={n}",
                    alpha=0.4 + 0.6 * math.log2(int(n) + 1) / 4, linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="GiB per device",
               title="Train-step memory per device")
    else:
        colours = dict(zip(VARIANTS, ("tab:gray", "tab:orange", "tab:green", "tab:blue"), strict=True))
        dashes = ("-", "--", ":")
        for variant in args.variants:
            for i, b in enumerate(args.budgets):
                ts = [results["max_context"][f"{variant}|{n}"][str(b)] for n in args.devices]
                ax.plot(args.devices, ts, styles[variant][0], linestyle=dashes[i % 3], color=colours[variant],
                        label=f"{variant}, {b:g} GiB", linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="devices n", ylabel="max context (tokens)",
               title="Longest sequence whose train step fits the budget")
        ax.set_xticks(args.devices, [str(n) for n in args.devices])
        ax.minorticks_off()
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(args.plot)


if __name__ == "__main__":
    main()
