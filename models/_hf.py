"""Hugging Face checkpoints of the LLaMA family (Llama 2/3, Mistral, Qwen2) read into and written from `RingLM`."""

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from jax.typing import DTypeLike

from eqx_ring import AttentionSpec, RopeScaling
from eqx_ring.sharding import param_shardings

from ._lm import PARAM_DTYPES, LMConfig, RingLM

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""The `config.json` `"architectures"` [`from_pretrained`][models.from_pretrained] reads."""

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"

# Our parameter path -> the checkpoint's tensor name; "{}" is the layer of a stacked (scanned) block array.
_TENSORS = {
    "transformer.embedding.weight": "model.embed_tokens.weight",
    "transformer.norm.weight": "model.norm.weight",
    "transformer.lm_head.weight": "lm_head.weight",
    "transformer.blocks.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.blocks.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    **{f"transformer.blocks.attention.{ours}_proj.{kind}": f"model.layers.{{}}.self_attn.{theirs}_proj.{kind}"
       for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("output", "o"))
       for kind in ("weight", "bias")},
    **{f"transformer.blocks.ffn.{name}_proj.weight": f"model.layers.{{}}.mlp.{name}_proj.weight"
       for name in ("gate", "up", "down")},
}
# Tensors a checkpoint may hold that carry nothing the model needs: older Llama checkpoints saved RoPE's
# frequencies (recomputed from the config), and some tied checkpoints keep a copy of the embedding as the head.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _path(keys: tuple) -> str:
    return jax.tree_util.keystr(keys, simple=True, separator=".")


def _require(hf: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in hf:
        raise ValueError(f"{where} lacks {key!r}")
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}: {key}={value!r} is not a {getattr(kind, '__name__', kind)}")
    return value


def _rope_scaling(hf: Mapping[str, Any], where: str) -> RopeScaling | None:
    scaling = hf.get("rope_scaling")
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"{where}: rope_scaling.rope_type={kind!r} is not supported; eqx-ring implements "
                         "'linear' and 'llama3'")
    fields = {"factor": scaling.get("factor")}
    if kind == "llama3":
        fields.update({k: scaling[k] for k in ("low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings") if k in scaling})
    try:
        return RopeScaling(kind, **fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: rope_scaling: {error}") from None


def config_from_hf(hf: Mapping[str, Any], *, layout: str = "contiguous", where: str = "config.json") -> LMConfig:
    """The [`LMConfig`][models.LMConfig] of a Hugging Face `config.json` of the LLaMA family.

    Every key that changes what the model computes is honoured or refused; keys that do not
    (`max_position_embeddings`, `initializer_range`, `use_cache`, token ids, `torch_dtype`, ...)
    are ignored.

    **Arguments:**

    - `hf`: the parsed `config.json`.
    - `layout`: the ring layout of the config's `attention` spec (default `"contiguous"`).
    - `where`: how errors name the file (default `"config.json"`).

    **Returns:** the `LMConfig`: `attention` holds `rope_theta`, `rope_scaling`, `attention_dropout`
    (as `dropout`) and (Mistral) `sliding_window`; `qkv_bias` is set for Qwen2.

    **Raises:** `ValueError` naming the key: an architecture not in
    [`ARCHITECTURES`][models.ARCHITECTURES], a missing size, a `hidden_act` other than `"silu"`, a
    `rope_scaling` type other than `"linear"` or `"llama3"`, Llama's `attention_bias` or
    `mlp_bias`, Qwen2's `use_sliding_window`, or an `attention_dropout` outside [0, 1).
    """
    architectures = hf.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1:
        raise ValueError(f"{where}: architectures={architectures!r} must name one architecture, one of {ARCHITECTURES}")
    architecture = architectures[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {architecture!r} is not supported; eqx-ring reads {ARCHITECTURES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; the LLaMA family's MLP is "
                         "SwiGLU, hidden_act='silu'")
    refused = {"attention_bias": False, "mlp_bias": False, "use_sliding_window": False}
    for key, supported in refused.items():
        if hf.get(key, supported) != supported:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (only {key}={supported})")
    sizes = {key: _require(hf, key, where) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads")}
    num_kv_heads = hf.get("num_key_value_heads") or sizes["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * sizes["num_attention_heads"] == sizes["hidden_size"]:
        head_dim = None  # the default: d_model // num_heads
    window = hf.get("sliding_window") if architecture == "MistralForCausalLM" else None
    dropout = hf.get("attention_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"{where}: attention_dropout={dropout!r} must be a number in [0, 1)")
    spec = AttentionSpec(rope_theta=float(hf.get("rope_theta", 10_000.0)), rope_scaling=_rope_scaling(hf, where),
                         sliding_window=window, layout=layout, dropout=float(dropout))
    return LMConfig(vocab_size=sizes["vocab_size"], d_model=sizes["hidden_size"],
                    num_layers=sizes["num_hidden_layers"], num_heads=sizes["num_attention_heads"],
                    num_kv_heads=num_kv_heads, hidden_size=sizes["intermediate_size"], head_dim=head_dim,
                    qkv_bias=architecture == "Qwen2ForCausalLM", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention=spec)


class _Checkpoint:
    """The safetensors files of a folder: which file holds each tensor, their shapes, and reads of slices.

    Files are opened per read and closed after it: safetensors maps a file into memory, and pages a
    read touched stay in the process's resident memory until the file is closed.
    """

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        index = directory / _INDEX
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (directory / _SINGLE).exists():
            files, weight_map = [_SINGLE], None
        else:
            raise FileNotFoundError(f"{directory} holds neither {_SINGLE} nor {_INDEX}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.files: dict[str, str] = {}
        for file in files:
            path = directory / file
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: {_INDEX} lists tensors in it")
            try:
                with safe_open(path, framework="numpy") as f:
                    for name in f.keys():
                        view = f.get_slice(name)
                        self.shapes[name], self.dtypes[name], self.files[name] = (
                            tuple(view.get_shape()), view.get_dtype(), file)
            except Exception as error:  # safetensors raises its own SafetensorError for a damaged file
                raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
        if weight_map is not None:
            for name, file in weight_map.items():
                if self.files.get(name) != file:
                    raise ValueError(f"{index} puts {name!r} in {file}, which does not hold it")

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` of the tensor `name`."""
        from safetensors import safe_open

        with safe_open(self.directory / self.files[name], framework="numpy") as f:
            return f.get_slice(name)[index]


def _aligned_empty(shape: list[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _numpy_dtype(safetensors_dtype: str) -> np.dtype:
    import ml_dtypes

    names = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    if safetensors_dtype not in names:
        raise ValueError(f"tensors of dtype {safetensors_dtype} are not weights eqx-ring reads")
    return np.dtype(names[safetensors_dtype])


def from_pretrained(directory: str | os.PathLike, *, mesh: Mesh | None = None, layout: str = "contiguous",
                    dtype: DTypeLike | None = None) -> RingLM:
    """A [`RingLM`][models.RingLM] with the weights of a Hugging Face LLaMA-family checkpoint folder.

    Reads `config.json` (see [`config_from_hf`][models.config_from_hf]: Llama 2/3/3.1/3.2,
    Mistral, Qwen2) and the weights, `model.safetensors` or the shards that
    `model.safetensors.index.json` lists, with the `safetensors` package (no torch). Each array is
    built straight on its devices (`jax.make_array_from_callback`, with the shardings of
    [`param_shardings`][eqx_ring.sharding.param_shardings] on `mesh`), each device's part read
    from the files as a slice: no second copy of the model exists on the host. The RMSNorm scales
    are float32, as in every `RingLM`.

    **Arguments:**

    - `directory`: the folder.
    - `mesh`: a mesh to place the weights on and to run the ring over (its `"sp"` axis), or `None`
      (default) for the default device.
    - `layout`: the ring layout of the model's spec (default `"contiguous"`); inputs must be in it.
    - `dtype`: the weights' dtype; default `None`: as stored (e.g. bfloat16), that of the
      embedding when the tensors differ.

    **Returns:** the `RingLM`, its config's `param_dtype` the weights' dtype.

    **Raises:** `FileNotFoundError` naming a missing `config.json` or weights file; `ValueError`
    naming the key or file for a config [`config_from_hf`][models.config_from_hf] refuses, a
    damaged or truncated safetensors file, a tensor of the wrong shape, a tensor the model needs
    that no file holds, or one the model has no place for.

    **Example:** see the guide "Pretrained models and context extension".
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing: a Hugging Face model folder has one")
    config = config_from_hf(json.loads(config_path.read_text()), layout=layout, where=str(config_path))
    checkpoint = _Checkpoint(directory)
    embedding = "model.embed_tokens.weight"
    if embedding not in checkpoint.shapes:
        raise ValueError(f"{directory} holds no tensor {embedding!r}, which the config's model needs")
    param_dtype = np.dtype(dtype or _numpy_dtype(checkpoint.dtypes[embedding]))
    if param_dtype.name not in PARAM_DTYPES:
        raise ValueError(f"dtype must be one of {PARAM_DTYPES}, got {param_dtype.name}")
    config = dataclasses.replace(config, param_dtype=param_dtype.name)
    skeleton = eqx.filter_eval_shape(lambda: RingLM(config, mesh=mesh, key=jax.random.key(0)))
    shardings = (param_shardings(skeleton, mesh) if mesh is not None
                 else jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), skeleton))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    used = set()
    arrays = []
    for (keys, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        path = _path(keys)
        template = _TENSORS.get(path)
        if template is None:
            raise ValueError(f"RingLM's {path} has no Hugging Face name")  # a model change not mirrored here
        stacked = "{}" in template
        names = [template.format(i) for i in range(config.num_layers)] if stacked else [template]
        expected = leaf.shape[1:] if stacked else leaf.shape
        for name in names:
            if name not in checkpoint.shapes:
                raise ValueError(f"{directory} holds no tensor {name!r}, which the config's model needs")
            if checkpoint.shapes[name] != expected:
                raise ValueError(f"{name!r} in {directory / checkpoint.files[name]} has shape "
                                 f"{checkpoint.shapes[name]}, but the config's model needs {expected}")
        used.update(names)
        target = leaf.dtype  # the config's param_dtype; float32 for the RMSNorm scales

        def read(index, names=names, stacked=stacked, target=target, shape=leaf.shape):
            # Filled one tensor (one layer) at a time into a 64-byte-aligned buffer, which the CPU backend adopts
            # as the device array instead of copying it: peak host memory 1.17x the checkpoint's size instead of
            # 1.50x for the 1B preset (benchmarks/hf_load.py).
            out = _aligned_empty([len(range(n)[i]) for n, i in zip(shape, index, strict=True)], target)
            if stacked:
                for j, layer in enumerate(range(config.num_layers)[index[0]]):
                    out[j] = checkpoint.read(names[layer], index[1:])
            else:
                out[...] = checkpoint.read(names[0], index)
            return out

        arrays.append(jax.make_array_from_callback(leaf.shape, sharding, read))
    unused = sorted(n for n in set(checkpoint.shapes) - used
                    if not n.endswith(_IGNORED_SUFFIXES) and not (n == "lm_head.weight" and config.tie_embeddings))
    if unused:
        raise ValueError(f"{directory} holds tensors the config's model has no place for: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''} (check config.json)")
    return jax.tree_util.tree_unflatten(treedef, arrays)


def hf_config(config: LMConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` of a model of `config`: the inverse of [`config_from_hf`][models.config_from_hf].

    The architecture is the one that computes the same function: `Qwen2ForCausalLM` with
    `qkv_bias`, `MistralForCausalLM` with a `sliding_window`, `LlamaForCausalLM` otherwise.

    **Arguments:**

    - `config`: the [`LMConfig`][models.LMConfig]; its `param_dtype` is recorded as `torch_dtype`.

    **Returns:** the `config.json` fields, a `dict`.

    **Raises:** `ValueError` naming the field, for what none of these architectures computes: no
    RoPE, no causal mask, a `causal_block_size` other than 1, chunked attention, a logit softcap,
    sinks, a sliding window with `qkv_bias` or with `rope_scaling`.
    """
    spec = config.attention
    problems = {"attention.rope_theta": spec.rope_theta is None, "attention.causal": not spec.causal,
                "attention.causal_block_size": spec.causal_block_size != 1,
                "attention.attention_chunk_size": spec.attention_chunk_size is not None,
                "attention.logit_softcap": spec.logit_softcap is not None, "use_sinks": config.use_sinks,
                "attention.sliding_window with qkv_bias": spec.sliding_window is not None and config.qkv_bias,
                "attention.sliding_window with rope_scaling": (spec.sliding_window is not None
                                                               and spec.rope_scaling is not None)}
    for name, bad in problems.items():
        if bad:
            raise ValueError(f"LMConfig.{name} ({spec}) is not something a LLaMA-family Hugging Face model computes")
    architecture = ("Qwen2ForCausalLM" if config.qkv_bias else
                    "MistralForCausalLM" if spec.sliding_window is not None else "LlamaForCausalLM")
    head_dim = config.head_dim or config.d_model // config.num_heads
    scaling = spec.rope_scaling
    rope_scaling = None if scaling is None else (
        {"rope_type": "linear", "factor": scaling.factor} if scaling.kind == "linear" else
        {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
         "high_freq_factor": scaling.high_freq_factor,
         "original_max_position_embeddings": scaling.original_max_position_embeddings})
    return {
        "architectures": [architecture], "model_type": _MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.hidden_size or 4 * config.d_model,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads or config.num_heads, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling, "sliding_window": spec.sliding_window,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": spec.dropout,
        # Transformers sizes its position tables and caches by this; RoPE itself has no limit.
        "max_position_embeddings": max(4096, (scaling.original_max_position_embeddings * math.ceil(scaling.factor)
                                              if scaling is not None and scaling.kind == "llama3" else 0)),
        "torch_dtype": config.param_dtype,
    }


def _hf_tensors(model: RingLM) -> list[tuple[str, jax.Array, int | None]]:
    """`(name, array, layer)` of every tensor of `model` in checkpoint order: the tensor is `array[layer]` for
    a stacked block array, `array` itself when `layer` is `None`."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
    named = {_path(keys): leaf for keys, leaf in leaves if leaf is not None}
    tensors = []
    for path, template in _TENSORS.items():
        if path in named:
            if "{}" in template:
                tensors += [(template.format(i), named[path], i) for i in range(model.config.num_layers)]
            else:
                tensors.append((template, named[path], None))
    return tensors


def save_pretrained(model: RingLM, directory: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> list[str]:
    """Write `model` as a Hugging Face checkpoint folder that transformers and
    [`from_pretrained`][models.from_pretrained] load: `config.json` and safetensors weights.

    Tensors are written in their own dtypes (the RMSNorm scales float32), split into shards of at
    most `max_shard_size` bytes with a `model.safetensors.index.json` when one file would be larger,
    each shard gathered to the host when it is written. With several processes, every process
    calls it; process 0 writes.

    **Arguments:**

    - `model`: a [`RingLM`][models.RingLM].
    - `directory`: the folder (made if missing; files of the same names are overwritten).
    - `max_shard_size`: bytes per weights file (default 5 GiB, transformers' own).

    **Returns:** the paths written, as strings.

    **Raises:** `TypeError` if `model` is not a `RingLM`; `ValueError` as
    [`hf_config`][models.hf_config] for a config no LLaMA-family architecture computes.
    """
    from safetensors.numpy import save_file

    if not isinstance(model, RingLM):
        raise TypeError(f"model must be a models.RingLM, got {type(model).__name__}")
    config = hf_config(model.config)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        model = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)
                             if isinstance(x, jax.Array) and not x.is_fully_addressable else x, model)
    directory = Path(directory)
    written: list[str] = []
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = _hf_tensors(model)
        # Shards are planned from the shapes first, so that each file's name can say how many there are.
        plan: list[list[tuple[str, jax.Array, int | None]]] = [[]]
        sizes = [0]
        for tensor in tensors:
            array, layer = tensor[1], tensor[2]
            nbytes = array.nbytes // (array.shape[0] if layer is not None else 1)
            if plan[-1] and sizes[-1] + nbytes > max_shard_size:
                plan.append([])
                sizes.append(0)
            plan[-1].append(tensor)
            sizes[-1] += nbytes
        files = ([_SINGLE] if len(plan) == 1 else
                 [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
        for file, shard in zip(files, plan, strict=True):
            host = {name: np.ascontiguousarray(array if layer is None else array[layer])
                    for name, array, layer in shard}
            save_file(host, directory / file, metadata={"format": "pt"})
            written.append(str(directory / file))
            del host
        if len(plan) > 1:
            weight_map = {name: file for file, shard in zip(files, plan, strict=True) for name, _, _ in shard}
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (directory / _INDEX).write_text(json.dumps(index, indent=2))
            written.append(str(directory / _INDEX))
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        written.append(str(directory / "config.json"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"eqx_ring save_pretrained {directory}")
    return written
