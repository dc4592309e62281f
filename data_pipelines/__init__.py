"""grain data pipelines for eqx-ring: video-text sources, tokenizers, the LWM layout, packing, sharded batches."""

from ._hf_text import VISION_TOKENS as VISION_TOKENS, HFTokenizer as HFTokenizer, text_examples as text_examples
from ._lwm import TASKS as TASKS, lwm_sequence as lwm_sequence, vision_tokens as vision_tokens
from ._needle import NeedleText as NeedleText, NeedleVideo as NeedleVideo
from ._packing import (
    PackIterator as PackIterator,
    PackIterDataset as PackIterDataset,
    PackStats as PackStats,
    pack as pack,
    packing_stats as packing_stats,
)
from ._pipeline import (
    ROW_KEYS as ROW_KEYS,
    PatchQuantizer as PatchQuantizer,
    ToLWMSequence as ToLWMSequence,
    ToRingLayout as ToRingLayout,
    global_batch as global_batch,
    global_packed_batches as global_packed_batches,
    packed_batches as packed_batches,
    process_rows as process_rows,
    shard_batches as shard_batches,
    video_text_examples as video_text_examples,
    with_targets as with_targets,
)
from ._shards import PackedShards as PackedShards, write_packed_shards as write_packed_shards
from ._synthetic import (
    COLORS as COLORS,
    MOTIONS as MOTIONS,
    SHAPES as SHAPES,
    MovingShapes as MovingShapes,
    caption as caption,
    describe_video as describe_video,
    parse_caption as parse_caption,
    score_captions as score_captions,
    score_videos as score_videos,
)
from ._tokenizer import SPECIAL_TOKENS as SPECIAL_TOKENS, ByteTokenizer as ByteTokenizer, Tokenizer as Tokenizer
from ._video_files import VideoDecodeError as VideoDecodeError, VideoFiles as VideoFiles
