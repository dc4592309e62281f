"""The Large World Model token layout: video codes and a caption as one token sequence with loss masks."""

import numpy as np

from ._tokenizer import Tokenizer

TASKS: tuple[str, ...] = ("video_to_text", "text_to_video", "both")
"""The tasks of [`lwm_sequence`][data_pipelines.lwm_sequence]: captioning, generation, or both at once.

[`ToLWMSequence`][data_pipelines.ToLWMSequence] records the task it drew as an index into this tuple.
"""


def vision_tokens(codes: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Video codes as the vision part of the LWM layout, the one definition of it that the data and the
    models use.

    `<vision>`, then each frame's codes followed by `<eof>` (`<eov>` after the last frame), then
    `</vision>`. Code `c` becomes token `tokenizer.vocab_size + c`, so every id at or above
    `tokenizer.vocab_size` is a code and every other one a marker.

    **Arguments:**

    - `codes`: int `[*batch, frames, codes_per_frame]`, e.g. from a video tokenizer.
    - `tokenizer`: a [`Tokenizer`][data_pipelines.Tokenizer] (or anything with its `vocab_size`
      and special ids), for the ids.

    **Returns:** int32 `[*batch, frames · (codes_per_frame + 1) + 2]`.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import ByteTokenizer, vision_tokens

    tok = ByteTokenizer()
    tokens = vision_tokens(np.array([[0, 5], [7, 1]]), tok)  # 2 frames of 2 codes
    assert tokens.tolist() == [tok.vision_start_id, 263, 268, tok.eof_id, 270, 264, tok.eov_id, tok.vision_end_id]
    ```
    """
    codes = np.asarray(codes)
    *batch, frames, _ = codes.shape
    markers = np.full((*batch, frames, 1), tokenizer.eof_id, np.int32)
    markers[..., -1, :] = tokenizer.eov_id
    framed = np.concatenate([codes.astype(np.int32) + tokenizer.vocab_size, markers], -1).reshape(*batch, -1)
    start, end = (np.full((*batch, 1), i, np.int32) for i in (tokenizer.vision_start_id, tokenizer.vision_end_id))
    return np.concatenate([start, framed, end], -1)


def lwm_sequence(
    codes: np.ndarray, caption_ids: np.ndarray, tokenizer: Tokenizer, task: str
) -> dict[str, np.ndarray]:
    """One example as a token sequence in the LWM layout.

    The vision part is [`vision_tokens`][data_pipelines.vision_tokens]`(codes, tokenizer)`: `<vision>`,
    then each frame's codes followed by `<eof>` (`<eov>` after the last frame), then `</vision>`. Code
    `c` becomes token `tokenizer.vocab_size + c`, so text and vision share one vocabulary of
    `tokenizer.vocab_size + codebook_size` ids.

    - `"video_to_text"` (captioning): `<bos> vision caption <eos>`; the caption and `<eos>` are trained.
    - `"text_to_video"` (generation): `<bos> caption vision <eos>`; the vision part and `<eos>` are
      trained. The caption comes first so that a causal model generates the video from it.
    - `"both"`: `<bos> vision caption <eos>`, every token after `<bos>` trained.

    The sequence has `length = frames · (codes_per_frame + 1) + len(caption_ids) + 4` tokens.

    **Arguments:**

    - `codes`: int `[frames, codes_per_frame]`, non-negative, from a video tokenizer (e.g.
      [`PatchQuantizer`][data_pipelines.PatchQuantizer]).
    - `caption_ids`: the tokenized caption, int `[caption_len]`, without BOS/EOS.
    - `tokenizer`: a [`Tokenizer`][data_pipelines.Tokenizer], for `vocab_size` and the special ids.
    - `task`: one of [`TASKS`][data_pipelines.TASKS].

    **Returns:**

    A dict of `[length]` NumPy arrays:

    - `"tokens"`: int32 token ids.
    - `"vision_mask"`: bool, True on vision tokens including the markers `<vision>`, `<eof>`,
      `<eov>`, `</vision>`.
    - `"loss_mask"`: bool, True where the token is a training target, i.e. predicted from the
      tokens before it.

    **Raises:**

    `ValueError` if `codes` is not a 2-D integer array with at least one frame or has a negative
    code, if `caption_ids` is not a 1-D integer array of ids in `[0, tokenizer.vocab_size)`, or if
    `task` is not in [`TASKS`][data_pipelines.TASKS].

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import ByteTokenizer, lwm_sequence

    tok = ByteTokenizer()
    codes = np.array([[0, 5], [7, 1]])  # 2 frames of 2 codes
    seq = lwm_sequence(codes, tok.encode("hi"), tok, "video_to_text")
    vision = [tok.vision_start_id, 263, 268, tok.eof_id, 270, 264, tok.eov_id, tok.vision_end_id]
    assert seq["tokens"].tolist() == [tok.bos_id, *vision, *tok.encode("hi"), tok.eos_id]
    assert seq["vision_mask"].tolist() == [False] + [True] * 8 + [False] * 3
    assert seq["loss_mask"].tolist() == [False] * 9 + [True] * 3  # the caption and <eos>
    ```
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] < 1:
        raise ValueError(f"codes must have shape [frames >= 1, codes_per_frame], got {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and codes.min() < 0:
        raise ValueError(f"codes must be non-negative, got minimum {codes.min()}")
    caption_ids = np.asarray(caption_ids)
    if caption_ids.ndim != 1 or (caption_ids.size and not np.issubdtype(caption_ids.dtype, np.integer)):
        raise ValueError(f"caption_ids must be a 1-D array of integers, got shape {caption_ids.shape} and dtype "
                         f"{caption_ids.dtype}")
    if caption_ids.size and (caption_ids.min() < 0 or caption_ids.max() >= tokenizer.vocab_size):
        raise ValueError(f"caption_ids must lie in [0, tokenizer.vocab_size={tokenizer.vocab_size}), got values in "
                         f"[{caption_ids.min()}, {caption_ids.max()}]")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    tok = tokenizer
    vision = vision_tokens(codes, tok)
    text = np.asarray(caption_ids, np.int32)
    parts = [vision, text] if task != "text_to_video" else [text, vision]
    tokens = np.concatenate([[tok.bos_id], *parts, [tok.eos_id]]).astype(np.int32)
    is_vision = np.concatenate([[False], *(np.full(len(p), p is vision) for p in parts), [False]])
    if task == "video_to_text":
        loss = ~is_vision
    elif task == "text_to_video":
        loss = is_vision.copy()
    else:
        loss = np.ones(len(tokens), bool)
    loss[0] = False  # <bos> is never predicted
    loss[-1] = True  # <eos> ends every task
    return {"tokens": tokens, "vision_mask": is_vision, "loss_mask": loss}
