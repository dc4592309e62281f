"""Speed of this checkout against another one (e.g. before a change), in one interleaved run.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py /tmp/before            # this tree vs /tmp/before
    python benchmarks/compare_trees.py /tmp/before --rounds 5 --reps 3 --json compare.json

Times, on 8 simulated CPU devices: (1) causal ring attention fwd+bwd (zigzag, B=1, T=8192, 8 heads of 64,
f32, chunks of 512; the attention table's setting) and (2) one jitted train step of `models.RingLM` through
`models.make_train_step` (the "small" preset: 4 layers, d_model 256, 8/4 heads; 4 packed rows of 1024
tokens with three documents each, zigzag, on a (dp=2, sp=4) mesh), each in a fresh process per tree,
alternating trees round by round so that drift and load hit both alike. Prints the median seconds per
call of each tree and their ratio (before / this: above 1 means this tree is faster). Run it on a quiet
machine: the simulated devices share the cores. A third run of this tree with `EQX_ON_ERROR=off` shows what
Equinox's runtime checks (`eqx.error_if`) cost, and a column says whether the compiled program is the same as
before.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs inside the tree being measured (its packages first on sys.path): only APIs both trees have, or, where the
# API changed, the same model built through whichever API the tree has (detected, e.g. `eqx_ring.AttentionSpec`).
CHILD = r"""
import json, sys, time
import hashlib, re
import equinox as eqx, jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, PartitionSpec as P
import eqx_ring, models
from eqx_ring.sharding import BATCH_AXES, make_mesh
reps, which = int(sys.argv[1]), sys.argv[2]

def timed(fn, *args):
    for _ in range(2):  # the train step compiles again once its outputs (not the first inputs) come back
        jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out

result, programs = {}, {}

def program(compiled):
    # The compiled HLO without its source tables and metadata (paths and lines differ between checkouts).
    head, _, body = compiled.as_text().partition("\nFileNames\n")
    text = re.sub(r"metadata=\{[^}]*\}", "", head + (body[body.index("\n%"):] if body else ""))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
if which in ("all", "attention"):
    t, n = 8192, 8
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,))
    q, k, v, ct = (jax.random.normal(jax.random.key(i), (1, t, 8, 64)) for i in range(4))
    ring = jax.shard_map(lambda q, k, v: eqx_ring.ring_attention(q, k, v, axis_name="sp", layout="zigzag",
                                                                   causal=True), mesh=mesh,
                         in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    grads = jax.jit(jax.grad(lambda q, k, v, ct: jnp.vdot(ring(q, k, v), ct), argnums=(0, 1, 2)))
    result["ring attention fwd+bwd"] = timed(grads, q, k, v, ct)
    programs["ring attention fwd+bwd"] = program(grads.lower(q, k, v, ct).compile())
if which in ("all", "train"):
    rows, seq = 4, 1024
    mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
    if hasattr(eqx_ring, "AttentionSpec"):  # the spec API (issue 18): the ring's settings in `attention`
        config = models.LMConfig.preset("small", attention=eqx_ring.AttentionSpec(layout="zigzag"))
    else:  # before it: flat fields
        config = models.LMConfig.preset("small", layout="zigzag")
    model = models.RingLM(config, mesh=mesh, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (rows, seq), dtype=np.int32)
    bounds = [0, 350, 750]
    seg = np.searchsorted(bounds, np.arange(seq), side="right").astype(np.int32)[None].repeat(rows, 0)
    pos = (np.arange(seq) - np.asarray(bounds)[seg[0] - 1]).astype(np.int32)[None].repeat(rows, 0)
    natural = dict(tokens=tokens, positions=pos, segment_ids=seg, targets=np.roll(tokens, -1, 1),
                   target_mask=np.ones((rows, seq), bool))
    batch = {k: eqx_ring.to_layout(x, "zigzag", 4, axis=1) for k, x in natural.items()}
    train_config = models.TrainConfig(stages=(models.Stage(seq, 10),), batch_size=rows)

    def loss_fn(m, b):
        out = m.loss(b, spmd_axis_name=BATCH_AXES)
        return out if isinstance(out, tuple) else (out, {})

    optimizer = models.make_optimizer(train_config)
    step = models.make_train_step(loss_fn, optimizer, train_config, mesh)
    state = [model, optimizer.init(eqx.filter(model, eqx.is_array))]

    def run():
        # The step donates opt_state and batch: give it fresh copies of the batch each call.
        device_batch = {k: jnp.asarray(x) for k, x in batch.items()}
        state[0], state[1], metrics = step(state[0], state[1], device_batch)
        return metrics["loss"]

    result["RingLM train step"] = timed(run)
    device_batch = {k: jnp.asarray(x) for k, x in batch.items()}
    # make_train_step returns the filter_jit function itself in older trees, a plain function around it in newer.
    lowerable = step if hasattr(step, "lower") else eqx.filter_jit(step)
    programs["RingLM train step"] = program(lowerable.lower(state[0], state[1], device_batch).compile().compiled)
print("RESULT" + json.dumps(dict(times=result, programs=programs)))
"""


def measure(tree: Path, reps: int, which: str, env: dict[str, str]) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(reps), which], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"measuring {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT"):])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="the other checkout (e.g. a git worktree of the base commit)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per tree, alternating")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per process, after two warm-ups")
    parser.add_argument("--only", choices=("all", "attention", "train"), default="all")
    parser.add_argument("--json", help="write every time here")
    args = parser.parse_args()
    # (tree, extra environment): this tree once more with Equinox's runtime checks compiled out, which isolates
    # what the `eqx.error_if` checks cost from what else changed.
    runs = {"before": (args.before.resolve(), {}), "this": (HERE, {}),
            "this, checks off": (HERE, {"EQX_ON_ERROR": "off"})}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    programs: dict[str, dict[str, str]] = {}
    for r in range(args.rounds):
        for name, (tree, env) in (runs.items() if r % 2 == 0 else reversed(runs.items())):
            out = measure(tree, args.reps, args.only, env)
            for bench, values in out["times"].items():
                times[name].setdefault(bench, []).extend(values)
            programs[name] = out["programs"]
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
    print(f"\nbefore: {runs['before'][0]}\nthis:   {runs['this'][0]}\n"
          f"{args.rounds} rounds x {args.reps} calls per run; median seconds per call; "
          "'same HLO': this tree compiles to the same program as before (metadata aside)")
    print(f"{'benchmark':<24} {'before':>8} {'this':>8} {'checks off':>11} {'before/this':>12} {'off/this':>9} "
          f"{'same HLO':>9}")
    for bench in times["this"]:
        b, t, off = (statistics.median(times[name][bench]) for name in runs)
        same = programs["before"][bench] == programs["this"][bench]
        print(f"{bench:<24} {b:>8.3f} {t:>8.3f} {off:>11.3f} {b / t:>12.3f} {off / t:>9.3f} "
              f"{'yes' if same else 'no':>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": {k: str(v[0]) for k, v in runs.items()}, "times": times,
                                               "programs": programs}))


if __name__ == "__main__":
    main()
