"""Put a model and its batches on a `("dp", "fsdp", "tp", "sp")` mesh.

A jitted train step that runs on any mesh, from one CPU device to many hosts:

```python
import equinox as eqx
import jax
import optax
import eqx_ring
from eqx_ring.sharding import BATCH_AXES, batch_sharding, make_mesh, shard_params

mesh = make_mesh(dp=2, fsdp=1, tp=1, sp=4)
spec = eqx_ring.AttentionSpec(layout="zigzag", mesh=mesh)
model = shard_params(eqx_ring.RingTransformer(256, 512, 8, 8, spec=spec, key=jax.random.key(0)), mesh)
optimizer = optax.adamw(3e-4)
opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

@eqx.filter_jit
def train_step(model, opt_state, tokens, labels, mask):
    tokens, labels, mask = eqx.filter_shard((tokens, labels, mask), batch_sharding(mesh))

    def loss_fn(model):
        hidden = jax.vmap(model, spmd_axis_name=BATCH_AXES)(tokens)
        return eqx_ring.chunked_cross_entropy(hidden, model.head_weight, labels, mask)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return shard_params(eqx.apply_updates(model, updates), mesh), opt_state, loss
```

Batches are `[batch, seq]`, already in the model's layout (`eqx_ring.to_layout`).
"""

from ._sharding import (
    AXES as AXES,
    BATCH_AXES as BATCH_AXES,
    DEFAULT_RULES as DEFAULT_RULES,
    batch_sharding as batch_sharding,
    initialize_distributed as initialize_distributed,
    logical_axes as logical_axes,
    make_mesh as make_mesh,
    param_shardings as param_shardings,
    shard_params as shard_params,
)
