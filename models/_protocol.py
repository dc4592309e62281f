"""What every zoo model is: `ZooModel` (a config it is rebuilt from) and `RingModel` (one on a `RingTransformer`)."""

import dataclasses
import enum
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from eqx_ring import AttentionSpec, KernelTuning, RingTransformer


class Keep(enum.Enum):
    """The default of `respec`'s placement arguments: the model's own."""

    KEEP = "keep"


_KEEP = Keep.KEEP


class ZooModel(eqx.Module):
    """A zoo model: what [`save`][models.save], [`load`][models.load] and [`train`][models.train] may rely on.

    A subclass holds its hyperparameters as a frozen dataclass `config` (a static field, saved as
    JSON by `save`) and is built as `cls(config, *, key, **placement)`, where placement is whatever
    says where it runs and is not saved (a mesh, for [`RingModel`][models.RingModel]s). Nothing
    else about a model is assumed: no search through its tree.
    """

    config: eqx.AbstractVar[Any]

    def rebuilt(self, config: Any, **placement: Any) -> "ZooModel":
        """This model's arrays in a model of the same class built from `config` and `placement`.

        The new model is built shape-only (`eqx.filter_eval_shape`) and takes this model's arrays
        as they are: nothing is initialised, copied or moved between devices.

        **Arguments:**

        - `config`: the new config (of this model's config class).
        - `**placement`: the constructor's other keyword arguments besides `key` (e.g. `mesh=`).

        **Returns:** the rebuilt model.

        **Raises:** `ValueError` if the new config changes the shapes or dtypes of the arrays.
        """
        skeleton = eqx.filter_eval_shape(lambda: type(self)(config, key=jax.random.key(0), **placement))
        new, old = jax.tree.leaves(skeleton), jax.tree.leaves(self)
        if [(x.shape, x.dtype) for x in new] != [(x.shape, x.dtype) for x in old]:
            changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                       if getattr(config, f.name) != getattr(self.config, f.name)}
            raise ValueError(f"config changes {changed} change the shapes of the weights; a rebuild only moves them")
        return jax.tree.unflatten(jax.tree.structure(skeleton), old)


class RingModel(ZooModel):
    """A zoo model on a [`RingTransformer`][eqx_ring.RingTransformer] ([`RingLM`][models.RingLM],
    [`VideoTextLM`][models.VideoTextLM]): what [`generate`][models.generate] and
    [`respec`][models.respec] rely on.

    Its `config` has an `attention` [`AttentionSpec`][eqx_ring.AttentionSpec] without placement
    (what is saved); the constructor `cls(config, *, mesh=None, head_axis=None, key)` adds the
    placement and hands the whole spec down to its `transformer` once. The model's spec is then
    `model.spec` (the transformer's).
    """

    transformer: eqx.AbstractVar[RingTransformer]

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"] | None = None,
        segment_ids: Int[Array, " seq"] | None = None,
        tuning: KernelTuning | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "seq d_model"]:
        """Final (normalised) hidden states of one sequence: its
        [`RingTransformer.__call__`][eqx_ring.RingTransformer.__call__].

        **Arguments:**

        - `tokens`: token ids `[seq]`, in the spec's `layout` order.
        - `positions`: each token's RoPE position `[seq]` (e.g. restarting in every packed segment);
          `None`: its position in natural order, given the layout.
        - `segment_ids`: `[seq]` ids of packed documents, which attend only within themselves; `None`:
          one document.
        - `tuning`: a [`KernelTuning`][eqx_ring.KernelTuning] for this call instead of the spec's
          (default `None`: the spec's); no rebuild.
        - `key`, `inference`: ignored (there is no dropout); for compatibility with the Equinox API.

        **Returns:** the hidden states, `[seq, d_model]`.
        """
        return self.transformer(tokens, positions=positions, segment_ids=segment_ids, tuning=tuning)

    @property
    def spec(self) -> AttentionSpec:
        """The spec the model runs with: its config's `attention` placed on its mesh.

        **Returns:** the transformer's [`AttentionSpec`][eqx_ring.AttentionSpec].
        """
        return self.transformer.spec

    def respec(self, *, mesh: Mesh | None | Keep = _KEEP, head_axis: str | None | Keep = _KEEP,
               **changes: Any) -> "RingModel":
        """The same weights on another mesh or with config changes that alter no weight shape.

        See [`respec`][models.respec], which calls this.

        **Arguments:**

        - `mesh`: the new mesh, or `None` for one device; default: the model's own.
        - `head_axis`: the mesh axis to split heads over, or `None`; default: the model's own, or
          `None` when `mesh=None` is given.
        - `**changes`: fields of the config, or of its `attention` spec (e.g. `layout=`,
          `rope_theta=`, `tuning=`); the names do not overlap.

        **Returns:** a model of the same class with the same arrays.

        **Raises:** `ValueError` if the changes alter the shapes (or dtypes) of the weights; `TypeError`
        for a name that is neither a config nor a spec field.
        """
        mesh = self.spec.mesh if mesh is _KEEP else mesh
        if head_axis is _KEEP:
            head_axis = None if mesh is None else self.spec.head_axis
        spec_fields = {f.name for f in dataclasses.fields(AttentionSpec)}
        spec_changes = {k: changes.pop(k) for k in list(changes) if k in spec_fields}
        config = dataclasses.replace(self.config, **changes)
        if spec_changes:
            config = dataclasses.replace(config, attention=config.attention.replace(**spec_changes))
        return self.rebuilt(config, mesh=mesh, head_axis=head_axis)
