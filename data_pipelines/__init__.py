"""grain data pipelines for eqx-ring: synthetic video-text data and text tokenizers (more arriving)."""

from ._synthetic import (
    COLORS as COLORS,
    MOTIONS as MOTIONS,
    SHAPES as SHAPES,
    MovingShapes as MovingShapes,
    caption as caption,
)
from ._tokenizer import SPECIAL_TOKENS as SPECIAL_TOKENS, ByteTokenizer as ByteTokenizer, Tokenizer as Tokenizer
