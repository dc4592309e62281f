"""Host memory and time of `models.from_pretrained` on a 1.1B-parameter bfloat16 checkpoint, against a naive loader.

    python benchmarks/hf_load.py                                   # writes /tmp/hf_load_1b once, then measures
    python benchmarks/hf_load.py --reps 3 --out /tmp/hf_load.json   # medians of 3 fresh processes per loader

The checkpoint is a randomly initialised `LMConfig.preset("1b")` (vocab 32,000, d_model 2048, 22 layers, 32 / 4
heads, SwiGLU 5632) written as a Hugging Face LLaMA folder: `config.json` (`models.hf_config`), bfloat16 tensors
under their Hugging Face names in state-dict order (layer by layer), sharded into `model-0000k-of-0000n.safetensors`
of at most --shard-mib MiB with a `model.safetensors.index.json`. It is written one tensor at a time (N(0, 0.02),
norms 1, seed 0) and reused by later runs with the same config and sharding. Its size on disk is the sum of the shards'.

Each loader runs in a fresh process (one CPU device, whose memory is host memory: the loaded model is one more
copy of the weights in RAM), after the shards have been read once so that both find them in the page cache:

- ours: `models.from_pretrained(folder)` (stored dtype; the RMSNorm scales float32).
- naive: `safetensors.numpy.load_file` of every shard into one dict, then each of the model's leaves stacked
  over the layers with numpy (norms cast to float32) and `jax.device_put` on the device.

The load's time is wall seconds from its call to `jax.block_until_ready` on every leaf. The baseline is the
process's resident memory (VmRSS) just before it, after importing jax, models and safetensors and initialising
the device; the peak is `getrusage(RUSAGE_SELF).ru_maxrss`, the process's highest resident set ever, after it.
Resident memory counts anonymous pages (numpy arrays, the device's buffers) and the pages of memory-mapped files
the process has touched while they stay mapped (safetensors maps the files it reads), not the page cache of files
it only read. The final resident memory, the model held, is read after the load and a `gc.collect()` (jaxlib
releases the host arrays it copied to the device at a garbage collection: until then they stay resident). Both
loaders must build the same arrays (a digest of a strided sample of every leaf). The issue's target: ours peaks at
most 1.3x the checkpoint's size on disk.
"""

import argparse
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

import models
from models._hf import _TENSORS

MIB = 2**20
TARGET = 1.3  # the bound on ours: peak RSS / size on disk
INDEX = "model.safetensors.index.json"


def hf_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """`(name, shape)` of every tensor of a LLaMA checkpoint of `config`, in Hugging Face state-dict order."""
    d, heads, kv = config.d_model, config.num_heads, config.num_kv_heads or config.num_heads
    head_dim = config.head_dim or d // heads
    layer = [("self_attn.q_proj.weight", (heads * head_dim, d)), ("self_attn.k_proj.weight", (kv * head_dim, d)),
             ("self_attn.v_proj.weight", (kv * head_dim, d)), ("self_attn.o_proj.weight", (d, heads * head_dim)),
             ("mlp.gate_proj.weight", (config.hidden_size, d)), ("mlp.up_proj.weight", (config.hidden_size, d)),
             ("mlp.down_proj.weight", (d, config.hidden_size)), ("input_layernorm.weight", (d,)),
             ("post_attention_layernorm.weight", (d,))]
    return ([("model.embed_tokens.weight", (config.vocab_size, d))]
            + [(f"model.layers.{i}.{name}", shape) for i in range(config.num_layers) for name, shape in layer]
            + [("model.norm.weight", (d,)), ("lm_head.weight", (config.vocab_size, d))])


def write_checkpoint(folder: Path, shard_bytes: int) -> None:
    """Write (or keep, if already there with the same config and shards) the "1b" checkpoint in `folder`."""
    config = models.LMConfig.preset("1b", param_dtype="bfloat16")
    hf = models.hf_config(config)
    tensors = hf_tensors(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    sizes = [0]
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append((name, shape))
        sizes[-1] += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {name: file for file, shard in zip(files, shards, strict=True) for name, _ in shard}}
    # The index is written last: its presence means the shards are complete.
    if ((folder / INDEX).exists() and json.loads((folder / INDEX).read_text()) == index
            and json.loads((folder / "config.json").read_text()) == hf and all((folder / f).exists() for f in files)):
        print(f"reusing {folder}")
        return
    print(f"writing {folder}: {len(tensors)} tensors, {sum(sizes) / 2**30:.2f} GiB in {len(files)} shards")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    rng = np.random.default_rng(0)
    for file, shard in zip(files, shards, strict=True):
        host = {name: (np.ones(shape, ml_dtypes.bfloat16) if name.endswith("norm.weight") else
                       (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
                for name, shape in shard}
        save_file(host, folder / file, metadata={"format": "pt"})
        del host
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def load_naive(folder: Path):
    """The model as the obvious code builds it: every shard read whole, then each leaf stacked and put."""
    config = models.config_from_hf(json.loads((folder / "config.json").read_text()))
    tensors = {}
    for file in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values())):
        tensors.update(load_file(folder / file))
    skeleton = eqx.filter_eval_shape(lambda: models.RingLM(config, key=jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    arrays = []
    for keys, _ in leaves:
        path = jax.tree_util.keystr(keys, simple=True, separator=".")
        template = _TENSORS[path]
        host = (np.stack([tensors[template.format(i)] for i in range(config.num_layers)]) if "{}" in template
                else tensors[template])
        if path.endswith("norm.weight"):
            host = host.astype(np.float32)
        arrays.append(jax.device_put(host, jax.devices()[0]))
    return jax.tree_util.tree_unflatten(treedef, arrays)


def rss_now() -> int:
    """The process's resident memory now, in bytes (Linux: VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(which: str, folder: Path) -> None:
    """Load `folder` with one loader in this (fresh) process and print its measurements as one JSON line."""
    jax.devices()
    baseline = rss_now()
    start = time.perf_counter()
    model = models.from_pretrained(folder) if which == "ours" else load_naive(folder)
    leaves = jax.block_until_ready(jax.tree.leaves(model))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc.collect()
    final = rss_now()
    digest = hashlib.sha256()
    for leaf in leaves:
        digest.update(f"{leaf.shape}{leaf.dtype}".encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf).reshape(-1)[::9973]).tobytes())
    print(json.dumps({"seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
                      "final_rss_bytes": final, "digest": digest.hexdigest()}))


def measure(which: str, folder: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--workdir", str(folder)],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"the {which} loader failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hf_load_1b"), help="the checkpoint folder")
    parser.add_argument("--shard-mib", type=int, default=1024, help="largest shard, MiB")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per loader (median seconds and peak)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hf_load.json"), help="write the results here")
    parser.add_argument("--child", choices=("ours", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return

    write_checkpoint(args.workdir, args.shard_mib * MIB)
    index = json.loads((args.workdir / INDEX).read_text())
    shards = [args.workdir / file for file in sorted(set(index["weight_map"].values()))]
    disk = sum(f.stat().st_size for f in shards)
    for file in shards:  # into the page cache, so that neither loader pays for the disk
        with open(file, "rb") as f:
            while f.read(64 * MIB):
                pass
    runs: dict[str, list[dict]] = {"ours": [], "naive": []}
    for _ in range(args.reps):
        for which in runs:
            runs[which].append(measure(which, args.workdir))
    if len({run["digest"] for rows in runs.values() for run in rows}) != 1:
        raise RuntimeError(f"the loaders built different arrays: {runs}")
    results = {}
    for which, rows in runs.items():
        row = {key: statistics.median(r[key] for r in rows)
               for key in ("seconds", "peak_rss_bytes", "baseline_rss_bytes", "final_rss_bytes")}
        row["peak_minus_baseline_bytes"] = row["peak_rss_bytes"] - row["baseline_rss_bytes"]
        row["peak_over_disk"] = row["peak_rss_bytes"] / disk
        row["peak_minus_baseline_over_disk"] = row["peak_minus_baseline_bytes"] / disk
        results[which] = row
    ratios = {key: results["naive"][key] / results["ours"][key]
              for key in ("seconds", "peak_rss_bytes", "peak_minus_baseline_bytes")}

    print(f"{len(shards)} shards, {disk / 2**30:.3f} GiB ({disk:,} bytes) on disk; median of {args.reps} run(s)")
    print(f"{'loader':<8}{'seconds':>9}{'baseline':>13}{'peak RSS':>13}{'final RSS':>13}"
          f"{'peak/disk':>11}{'(peak-base)/disk':>18}")
    for which, row in results.items():
        print(f"{which:<8}{row['seconds']:>9.2f}{row['baseline_rss_bytes'] / MIB:>9,.0f} MiB"
              f"{row['peak_rss_bytes'] / MIB:>9,.0f} MiB{row['final_rss_bytes'] / MIB:>9,.0f} MiB"
              f"{row['peak_over_disk']:>11.2f}{row['peak_minus_baseline_over_disk']:>18.2f}")
    print(f"{'naive/ours':<10}{ratios['seconds']:>7.2f}{'':>13}{ratios['peak_rss_bytes']:>13.2f}{'':>24}"
          f"{ratios['peak_minus_baseline_bytes']:>18.2f}")
    verdict = "meets" if results["ours"]["peak_over_disk"] <= TARGET else "misses"
    print(f"ours {verdict} the target peak RSS <= {TARGET}x the size on disk; both loaders built the same arrays")
    args.out.write_text(json.dumps({"checkpoint": str(args.workdir), "shards": len(shards), "disk_bytes": disk,
                                    "reps": args.reps, "target_peak_over_disk": TARGET, "loaders": results,
                                    "naive_over_ours": ratios}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
