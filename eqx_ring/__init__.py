"""eqx-ring: exact ring attention and blockwise transformers for Equinox."""

from . import sharding as sharding
from ._attention import RingAttention as RingAttention
from ._dense import dot_product_attention as dot_product_attention
from ._ffn import BlockwiseFFN as BlockwiseFFN, RMSNorm as RMSNorm
from ._layout import (
    from_layout as from_layout,
    layout_positions as layout_positions,
    layout_slot as layout_slot,
    to_layout as to_layout,
)
from ._ring import blockwise_attention as blockwise_attention, ring_attention as ring_attention
from ._rope import RopeScaling as RopeScaling
from ._spec import AttentionSpec as AttentionSpec, KernelTuning as KernelTuning
from ._transformer import (
    KVCache as KVCache,
    RingTransformer as RingTransformer,
    RingTransformerBlock as RingTransformerBlock,
    chunked_cross_entropy as chunked_cross_entropy,
)

__version__ = "0.1.0"
