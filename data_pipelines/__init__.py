"""grain data pipelines for eqx-ring: synthetic video-text data, tokenizers, the LWM layout and packing."""

from ._lwm import TASKS as TASKS, lwm_sequence as lwm_sequence
from ._packing import (
    PackIterator as PackIterator,
    PackIterDataset as PackIterDataset,
    PackStats as PackStats,
    pack as pack,
)
from ._synthetic import (
    COLORS as COLORS,
    MOTIONS as MOTIONS,
    SHAPES as SHAPES,
    MovingShapes as MovingShapes,
    caption as caption,
)
from ._tokenizer import SPECIAL_TOKENS as SPECIAL_TOKENS, ByteTokenizer as ByteTokenizer, Tokenizer as Tokenizer
