"""Zoo files: JSON hyperparameters + Equinox-serialised weights, checked by SHA-256 before loading."""

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from eqx_ring import AttentionSpec

from ._lm import LMConfig, RingLM, config_from_dict
from ._video_lm import VideoTextConfig, VideoTextLM
from ._vq import VideoVQ, VQConfig

FORMAT = "eqx-ring-zoo/3"
# Format 1 hashed the weights only; its files still load, with a warning that the JSON is unchecked.
_OLD_FORMATS = ("eqx-ring-zoo/1", "eqx-ring-zoo/2")
# Formats 1 and 2 kept the attention settings as flat config fields; format 3 nests them in `attention`.
_FLAT_ATTENTION = ("rope_theta", "causal_block_size", "layout")
_FLAT_TUNING = ("query_chunk_size", "key_chunk_size", "ffn_chunk_size")

REGISTRY: dict[str, tuple[type, Callable[..., Any]]] = {
    "RingLM": (RingLM, LMConfig),
    "VideoTextLM": (VideoTextLM, VideoTextConfig),
    "VideoVQ": (VideoVQ, VQConfig),
}
"""The classes [`load`][models.load] can rebuild, by class name: `(class, config class)`.

`"RingLM"`: ([`RingLM`][models.RingLM], [`LMConfig`][models.LMConfig]); `"VideoTextLM"`:
([`VideoTextLM`][models.VideoTextLM], [`VideoTextConfig`][models.VideoTextConfig]); `"VideoVQ"`:
([`VideoVQ`][models.VideoVQ], [`VQConfig`][models.VQConfig]). [`save`][models.save] records
`type(model).__name__`, so a model of another class can be saved but not loaded.
"""


class ZooIntegrityError(ValueError):
    """Raised by [`load`][models.load] for a zoo file whose SHA-256 is not the one its JSON records
    (tampered or corrupt): the weights file's, or the JSON's own fields' (class, config and the
    weights' name and hash); a subclass of `ValueError`."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_sha256(meta: dict[str, Any]) -> str:
    """The SHA-256 of every field of a zoo JSON but this hash itself, in canonical JSON (sorted keys, no spaces)."""
    fields = {k: v for k, v in meta.items() if k != "json_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(path: str | os.PathLike, model: eqx.Module) -> tuple[str, str]:
    """Write `model` as `{path}.json` (class, config, SHA-256s) and `{path}.eqx` (weights).

    The JSON records the weights file's SHA-256 (`"sha256"`) and the SHA-256 of its own other
    fields in canonical JSON (`"json_sha256"`), so that [`load`][models.load] notices an edited
    config as well as altered weights.

    The model must have a dataclass `config` from which `type(model)(config, key=...)` rebuilds it
    (the classes of [`REGISTRY`][models.REGISTRY]; [`load`][models.load] reads the files back).
    Existing files are overwritten. With several processes every process calls `save`; arrays
    split across processes are gathered, process 0 writes the files, and all return once they
    are written.

    **Arguments:**

    - `path`: the files' path without extension: `.json` and `.eqx` are appended to it (a `.json` ending
      is dropped first, so `save` and [`load`][models.load] take the same paths); missing folders are made.
    - `model`: the model to save.

    **Returns:** `(json_path, weights_path)`, the two paths written, as strings.

    **Example:**

    ```python
    import tempfile
    import jax
    import jax.numpy as jnp
    import models

    model = models.VideoVQ(models.VQConfig(frame_size=8, hidden=8, codebook_size=4, code_dim=2), key=jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        json_path, weights_path = models.save(f"{tmp}/vq", model)
        loaded = models.load(json_path)
    assert loaded.config == model.config and jnp.array_equal(loaded.codebook, model.codebook)
    ```
    """
    base = os.fspath(path).removesuffix(".json")  # as `load` reads it
    weights = base + ".eqx"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        model = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True)
                             if isinstance(x, jax.Array) and not x.is_fully_addressable else x, model)
        if jax.process_index() == 0:
            _write(base, weights, model)
        multihost_utils.sync_global_devices(f"eqx_ring zoo save {base}")
    else:
        _write(base, weights, model)
    return base + ".json", weights


def _write(base: str, weights: str, model: eqx.Module) -> None:
    os.makedirs(os.path.dirname(weights) or ".", exist_ok=True)
    eqx.tree_serialise_leaves(weights, model)
    meta = {
        "format": FORMAT,
        "class": type(model).__name__,
        # Through JSON once, so that the hash is of exactly what `load` reads back (tuples become lists).
        "config": json.loads(json.dumps(_config_fields(model.config))),
        "weights": os.path.basename(weights),
        "sha256": _sha256(weights),
    }
    meta["json_sha256"] = _json_sha256(meta)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def load(path: str | os.PathLike, **build_kwargs: Any) -> eqx.Module:
    """Load what [`save`][models.save] wrote: check the JSON's and the weights' SHA-256, then fill a shape-only
    skeleton.

    Files of the first zoo format (`"eqx-ring-zoo/1"`, whose hash covers the weights only) still
    load, with a `UserWarning` that their config is unchecked: save them again to upgrade them.

    The class must be in [`REGISTRY`][models.REGISTRY]. The skeleton is built with
    `eqx.filter_eval_shape`, so no weights are initialised; the weights are read onto the default
    device (with a `mesh=`, place them with [`shard_params`][eqx_ring.sharding.shard_params]).

    **Arguments:**

    - `path`: the path given to [`save`][models.save], or its `.json` file.
    - `**build_kwargs`: keyword arguments for the class's constructor besides `config` and `key`,
      e.g. `mesh=` and `head_axis=` for [`RingLM`][models.RingLM] and
      [`VideoTextLM`][models.VideoTextLM].

    **Returns:** the model, of the class the JSON names, with the saved config and weights.

    **Raises:** [`ZooIntegrityError`][models.ZooIntegrityError], naming the file, if the JSON's
    fields (e.g. an edited `rope_theta`) or the weights file do not have the SHA-256 the JSON
    records; `ValueError` if the JSON is not a zoo file or names a class not in `REGISTRY`, or
    if its config holds values the config class refuses.
    """
    base = os.fspath(path).removesuffix(".json")
    with open(base + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *_OLD_FORMATS):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{base}.json is not an {FORMAT} file (format={found!r})")
    missing = sorted({"class", "config", "weights", "sha256"} - set(meta))
    if missing:
        raise ValueError(f"{base}.json is not a complete zoo file: it lacks {missing}")
    if meta["format"] != "eqx-ring-zoo/1":  # from format 2 on, hash the JSON too
        actual = _json_sha256(meta)
        if actual != meta.get("json_sha256"):
            raise ZooIntegrityError(
                f"{base}.json: its fields (class, config, weights) have SHA-256 {actual}, but it records "
                f"json_sha256={meta.get('json_sha256')!r}: the JSON was edited or corrupted; refusing to load it"
            )
    else:
        warnings.warn(f"{base}.json is a {meta['format']} file, whose SHA-256 covers the weights but not the "
                      "config: an edit of its config would go unnoticed; save the model again to upgrade it",
                      stacklevel=2)
    if meta["class"] not in REGISTRY:
        raise ValueError(f"{base}.json holds a {meta['class']!r}; known classes are {sorted(REGISTRY)}")
    weights = os.path.join(os.path.dirname(base + ".json"), meta["weights"])
    actual = _sha256(weights)
    if actual != meta["sha256"]:
        raise ZooIntegrityError(
            f"{weights} has SHA-256 {actual}, but {base}.json records {meta['sha256']}: the file was modified or "
            "corrupted; refusing to load it"
        )
    cls, config_cls = REGISTRY[meta["class"]]
    fields = meta["config"] if meta["format"] == FORMAT else _nest_attention(meta["config"])
    config = config_from_dict(config_cls, fields, f"{base}.json: {config_cls.__name__}")
    skeleton = eqx.filter_eval_shape(lambda: cls(config, key=jax.random.key(0), **build_kwargs))
    return eqx.tree_deserialise_leaves(weights, skeleton)


def _nest_attention(config: dict[str, Any]) -> dict[str, Any]:
    """A format-1/2 config's flat attention fields moved into its `attention` spec (format 3)."""
    attention = {k: config[k] for k in _FLAT_ATTENTION if k in config}
    tuning = {k: config[k] for k in _FLAT_TUNING if k in config}
    if not attention and not tuning:
        return config
    rest = {k: v for k, v in config.items() if k not in _FLAT_ATTENTION + _FLAT_TUNING}
    return {**rest, "attention": {**attention, "tuning": tuning}}


def _config_fields(config: Any) -> dict[str, Any]:
    """`config` as a dict of its fields, an attention spec's without its placement (which is not saved)."""
    fields = dataclasses.asdict(config)
    if isinstance(getattr(config, "attention", None), AttentionSpec):
        fields["attention"] = config.attention.to_dict()
    return fields
