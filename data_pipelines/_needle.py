"""Long-context retrieval: a pass key hidden in filler text, a triangle hidden among many video frames.

Deterministic grain sources for needle-in-a-haystack training and evaluation at any context length and depth.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from ._lwm import vision_tokens
from ._pipeline import PatchQuantizer
from ._synthetic import _COLOR_TABLE, COLORS, SHAPES, _inside, _is_int
from ._tokenizer import ByteTokenizer, Tokenizer

_DISTRACTORS: tuple[int, ...] = (SHAPES.index("circle"), SHAPES.index("square"))
_TRIANGLE = SHAPES.index("triangle")


def _check_int(name: str, value: Any, low: int) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_depth(depth: Any) -> None:
    if depth is None:
        return
    if isinstance(depth, bool) or not isinstance(depth, int | float | np.integer | np.floating):
        raise TypeError(f"depth must be None or a number in [0, 1], got {type(depth).__name__} {depth!r}")
    if not (math.isfinite(depth) and 0 <= depth <= 1):
        raise ValueError(f"depth must be None or a fraction in [0, 1] (0 = first slot, 1 = last), got {depth!r}")


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be None or a Tokenizer, got {type(tokenizer).__name__}")


def _check_index(index: Any, num_examples: int, name: str) -> int:
    if not _is_int(index):
        raise TypeError(f"index must be an int, got {type(index).__name__} {index!r}")
    if not 0 <= index < num_examples:
        raise IndexError(f"index {index} out of range for {name} of {num_examples} examples")
    return int(index)


def _slot(depth: float, slots: int) -> int:
    """The one depth rule of both sources: slot `round(depth · (slots - 1))` (Python's round, halves to even)."""
    return int(round(depth * (slots - 1)))


@dataclass(frozen=True)
class NeedleText:
    """The pass-key retrieval task: a 5-digit number hidden in filler text, asked for at the end.

    A grain random-access source (`len`, `[index]`): example `i` depends only on `(seed, i)` (and
    the fields). Its tokens are

    `<bos> filler[:k] NEEDLE filler[k:] QUESTION answer <eos>`

    exactly `length` tokens in all, where the filler is [`FILLER`][data_pipelines.NeedleText.FILLER]
    repeated and cut to the `F = length - min_length` tokens left over, `NEEDLE` is
    `"The pass key is 12345. Remember it. 12345 is the pass key. "`, `QUESTION` is
    `"\\nWhat is the pass key? The pass key is "` and the answer is the key's 5 digits. The filler
    before the needle is the tail of the repetition (so it ends with a whole sentence) and the filler
    after it the head (so it starts with one). The key is drawn uniformly from `[10000, 99999]`.

    **Depth.** The needle starts at filler token `k = round(depth · (slots - 1))` with
    `slots = F + 1` insertion points (Python's `round`, halves to even): depth 0 puts it right after
    `<bos>`, depth 1 right before the question. [`NeedleVideo`][data_pipelines.NeedleVideo] places
    its needle frame by the same rule. The key does not depend on `depth`: the same `(seed, index)`
    at another depth asks for the same key, with the needle moved.

    Each record is a dict:

    - `"tokens"`: int32 `[length]`.
    - `"loss_mask"`: bool `[length]`, True exactly on the answer's tokens and `<eos>`.
    - `"vision_mask"`: bool `[length]`, all False (no vision), so that the records feed
      [`packed_batches`][data_pipelines.packed_batches] as they are.
    - `"answer"`: the pass key's digits, a str.
    - `"depth"`: the depth used (a float: the field, or the one drawn for this example).
    - `"needle_start"`: the token index where the needle sentence starts (`1 + k`).
    - `"index"`: the example's index, an int.

    A frozen dataclass; its fields are its arguments.

    **Arguments:**

    - `num_examples`: the number of examples, `len(source)`.
    - `length`: tokens per example (keyword only); at least
      [`min_length`][data_pipelines.NeedleText.min_length] (105 with the byte tokenizer).
    - `depth`: where the needle goes, a fraction in `[0, 1]` (keyword only); default `None` draws
      it uniformly per example from `(seed, index)`.
    - `seed`: with the index, determines every example; default 0 (keyword only).
    - `tokenizer`: a [`Tokenizer`][data_pipelines.Tokenizer]; default `None` is
      [`ByteTokenizer`][data_pipelines.ByteTokenizer] (keyword only).

    **Raises:**

    `ValueError` naming the argument if `num_examples < 0`, `seed < 0`, `depth` is not `None` or in
    `[0, 1]`, or `length` is below the minimum (the message gives it); `TypeError` naming it if
    one is of the wrong type.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import ByteTokenizer, NeedleText

    tok = ByteTokenizer()
    source = NeedleText(10, length=400, depth=0.5, seed=0)
    record = source[3]
    tokens, loss = record["tokens"], record["loss_mask"]
    assert tokens.shape == (400,) and tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert tok.decode(tokens[loss]) == record["answer"]  # loss on the answer digits (and <eos>)
    key = record["answer"]
    assert tok.decode(tokens[record["needle_start"]:]).startswith(f"The pass key is {key}.")
    assert tok.decode(tokens).endswith("What is the pass key? The pass key is " + key)
    assert np.array_equal(NeedleText(10, length=400, depth=0.5)[3]["tokens"], tokens)  # deterministic
    ```
    """

    FILLER: ClassVar[str] = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    """The filler text, repeated and cut to fit the length."""
    NEEDLE: ClassVar[str] = "The pass key is {key}. Remember it. {key} is the pass key. "
    """The needle sentence; `{key}` is the pass key's digits."""
    QUESTION: ClassVar[str] = "\nWhat is the pass key? The pass key is "
    """The question after the filler; the answer digits follow it directly."""

    num_examples: int
    length: int = field(kw_only=True)
    depth: float | int | None = field(default=None, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    tokenizer: Tokenizer | None = field(default=None, kw_only=True)

    def __post_init__(self):
        """Check the fields; raises as listed above."""
        _check_int("num_examples", self.num_examples, 0)
        _check_int("seed", self.seed, 0)
        _check_depth(self.depth)
        _check_tokenizer(self.tokenizer)
        if not _is_int(self.length):
            raise TypeError(f"length must be an int, got {type(self.length).__name__} {self.length!r}")
        if self.length < self.min_length:
            raise ValueError(f"length must be at least {self.min_length} tokens (<bos>, needle, question, answer and "
                             f"<eos> with no filler), got {self.length}")

    @property
    def min_length(self) -> int:
        """The shortest `length`: `<bos>`, the needle, the question, a 5-digit answer and `<eos>` with no filler."""
        return len(self._parts(10000)[0]) + 1

    def _tok(self) -> Tokenizer:
        return ByteTokenizer() if self.tokenizer is None else self.tokenizer

    def _parts(self, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(everything but the filler and <bos>: needle, question, answer, <eos>) and the needle, answer tokens."""
        tok = self._tok()
        needle, answer = tok.encode(self.NEEDLE.format(key=key)), tok.encode(str(key))
        rest = np.concatenate([needle, tok.encode(self.QUESTION), answer, [tok.eos_id]])
        return rest, needle, answer

    def __len__(self) -> int:
        """The number of examples.

        **Returns:**

        `num_examples`.
        """
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Generate example `index` (the same every time for the same fields).

        **Arguments:**

        - `index`: in `[0, num_examples)`; any integer type is accepted.

        **Returns:**

        The record described above: `"tokens"` (int32 `[length]`), `"loss_mask"` and
        `"vision_mask"` (bool `[length]`), `"answer"` (str), `"depth"` (float), `"needle_start"`
        (int) and `"index"` (int).

        **Raises:**

        `IndexError` if `index` is out of range (negative indices are not wrapped); `TypeError` if
        it is not an integer; `ValueError` naming `length` if a tokenizer whose token count for
        the key varies makes this example not fit.
        """
        index = _check_index(index, self.num_examples, "NeedleText")
        rng = np.random.default_rng([self.seed, index])
        key = int(rng.integers(10_000, 100_000))
        drawn = float(rng.uniform())  # drawn even when depth is given: the example is the same at every depth
        depth = drawn if self.depth is None else float(self.depth)
        tok = self._tok()
        rest, needle, answer = self._parts(key)
        num_filler = self.length - 1 - len(rest)
        if num_filler < 0:
            raise ValueError(f"length={self.length} is too short for example {index} (needs {1 + len(rest)} tokens)")
        before = _slot(depth, num_filler + 1)
        unit = tok.encode(self.FILLER)
        filler = np.tile(unit, -(-num_filler // len(unit)) + 1)
        tokens = np.concatenate([
            [tok.bos_id], filler[len(filler) - before:], needle, filler[:num_filler - before], rest[len(needle):],
        ]).astype(np.int32)
        loss = np.zeros(self.length, bool)
        loss[self.length - len(answer) - 1:] = True
        return {"tokens": tokens, "loss_mask": loss, "vision_mask": np.zeros(self.length, bool), "answer": str(key),
                "depth": depth, "needle_start": 1 + before, "index": index}


@dataclass(frozen=True)
class NeedleVideo:
    """Needle retrieval over a long video: one frame shows a triangle among many circles and squares; which colour?

    A grain random-access source (`len`, `[index]`): example `i` depends only on `(seed, i)` (and
    the fields). Every frame is one shape centred on a black `frame_size × frame_size` frame
    (radius `0.45 · frame_size`, drawn by [`MovingShapes`][data_pipelines.MovingShapes]' renderer):
    the needle frame a triangle of the answer's colour, every other frame a circle or a square of
    any of the [`COLORS`][data_pipelines.COLORS] (drawn uniformly), so the distractors look alike
    but never answer. The tokens are, in the LWM layout,

    `<bos> vision QUESTION answer <eos> <pad>…`

    where `vision` is [`vision_tokens`][data_pipelines.vision_tokens] of `quantizer(frames)`,
    `QUESTION` is `"What colour is the triangle? "` and the answer is the colour's name. The
    `<pad>`s (0 to 4) bring every example to the same
    [`sequence_length`][data_pipelines.NeedleVideo.sequence_length] whatever the length of the
    colour's name; they are neither trained nor vision. The names' first letters differ, so the first
    answer token decides the colour.

    **Depth.** The needle is frame `round(depth · (num_frames - 1))` (Python's `round`, halves to
    even), the same rule as [`NeedleText`][data_pipelines.NeedleText]. The answer and the
    distractor frames do not depend on `depth`: the same `(seed, index)` at another depth is the
    same video with the triangle moved.

    **Solvable from the codes.** With the defaults (8 × 8 frames, `PatchQuantizer(patch=4)`, 4
    levels per channel) a frame is 2 × 2 = 4 codes, 5 tokens with its `<eof>`. A centred circle or
    square fills the four quadrants alike, so all 4 codes are equal, while the triangle's apex
    leaves its top quadrants black and its base fills the bottom ones: codes `(0, 0, c, c)`, with a
    different `c` for each colour at this radius (at radius `0.4 · frame_size` two colours'
    triangles quantize alike, at `frame_size=16, patch=8` too). The source checks this when it is
    made: every colour's triangle codes differ from every code pattern a circle or square of any
    colour can have, and from each other's, else it refuses the `frame_size` and `quantizer`. (A
    circle and a square of one colour may share codes; both are distractors.)

    Each record is a dict:

    - `"tokens"`: int32 `[sequence_length]`; ids `>= tokenizer.vocab_size` are codes, so the model's
      vocabulary is `tokenizer.vocab_size + quantizer.codebook_size`.
    - `"loss_mask"`: bool, True exactly on the answer's tokens and `<eos>`.
    - `"vision_mask"`: bool, True on the vision part with its markers, as in
      [`lwm_sequence`][data_pipelines.lwm_sequence].
    - `"answer"`: the colour's name; `"answer_index"`: its index in `list(COLORS)`.
    - `"depth"`: the depth used (a float: the field, or the one drawn for this example).
    - `"needle_frame"`: the triangle's frame index.
    - `"index"`: the example's index, an int.

    A frozen dataclass; its fields are its arguments.

    **Arguments:**

    - `num_examples`: the number of examples, `len(source)`.
    - `num_frames`: frames per video (keyword only), at least 1. To fit a token budget use
      [`for_length`][data_pipelines.NeedleVideo.for_length].
    - `depth`: where the needle goes, a fraction in `[0, 1]` (keyword only); default `None` draws
      it uniformly per example from `(seed, index)`.
    - `seed`: with the index, determines every example; default 0 (keyword only).
    - `frame_size`: height and width of a frame in pixels, default 8 (keyword only); the
      quantizer's patch must divide it.
    - `quantizer`: frames uint8 `[T, H, W, 3]` → int codes `[T, codes_per_frame]`, default
      [`PatchQuantizer`][data_pipelines.PatchQuantizer]`(patch=4)` (keyword only).
    - `tokenizer`: a [`Tokenizer`][data_pipelines.Tokenizer]; default `None` is
      [`ByteTokenizer`][data_pipelines.ByteTokenizer] (keyword only).

    **Raises:**

    `ValueError` naming the argument if `num_examples < 0`, `num_frames < 1`, `seed < 0`,
    `frame_size < 4`, `depth` is not `None` or in `[0, 1]`, or `frame_size` and `quantizer` do not
    fit each other or cannot tell a triangle from a distractor or one triangle colour from another;
    `TypeError` naming it if one is of the wrong type.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import COLORS, ByteTokenizer, NeedleVideo, PatchQuantizer, vision_tokens

    tok = ByteTokenizer()
    source = NeedleVideo(10, num_frames=100, depth=0.25, seed=0)
    record = source[2]
    assert record["needle_frame"] == round(0.25 * 99) and source.codes_per_frame == 4
    assert record["tokens"].shape == (source.sequence_length,)  # 1 + 100 · 5 + 2 + 29 + 7 + 1
    codes = PatchQuantizer(patch=4)(source.render(2))  # [100, 4]
    vision = vision_tokens(codes, tok)
    assert np.array_equal(record["tokens"][1:1 + len(vision)], vision)
    assert record["answer"] == list(COLORS)[record["answer_index"]]
    text = record["tokens"][~record["vision_mask"]]
    assert tok.decode(text[record["loss_mask"][~record["vision_mask"]]]) == record["answer"]
    assert tok.decode(text) == "What colour is the triangle? " + record["answer"]
    long = NeedleVideo.for_length(10, length=8192, depth=1.0)  # as many frames as 8,192 tokens hold
    assert long.sequence_length <= 8192 < long.sequence_length + 5 and long[0]["needle_frame"] == long.num_frames - 1
    ```
    """

    QUESTION: ClassVar[str] = "What colour is the triangle? "
    """The question after the video; the colour's name follows it directly."""
    RADIUS: ClassVar[float] = 0.45
    """The shapes' radius as a fraction of `frame_size`, so that 2 × 2 patches of 4 levels tell every triangle apart."""

    num_examples: int
    num_frames: int = field(kw_only=True)
    depth: float | int | None = field(default=None, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    frame_size: int = field(default=8, kw_only=True)
    quantizer: Callable[[np.ndarray], np.ndarray] = field(default=PatchQuantizer(patch=4), kw_only=True)
    tokenizer: Tokenizer | None = field(default=None, kw_only=True)
    _frames: np.ndarray = field(init=False, repr=False, compare=False)
    _codes: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        """Check the fields, render and quantize every (shape, colour); raises as listed above."""
        _check_int("num_examples", self.num_examples, 0)
        _check_int("num_frames", self.num_frames, 1)
        _check_int("seed", self.seed, 0)
        _check_int("frame_size", self.frame_size, 4)
        _check_depth(self.depth)
        _check_tokenizer(self.tokenizer)
        if not callable(self.quantizer):
            raise TypeError(f"quantizer must be callable (frames -> codes), got {type(self.quantizer).__name__}")
        # Every frame the generator can draw: [shape, colour, size, size, 3], and its codes.
        size, radius = self.frame_size, self.RADIUS * self.frame_size
        centre = np.arange(size, dtype=np.float32) - (size - 1) / 2
        frames = np.zeros((len(SHAPES), len(COLORS), size, size, 3), np.uint8)
        for s, shape in enumerate(SHAPES):
            frames[s][:, _inside(shape, centre[:, None], centre[None, :], radius)] = _COLOR_TABLE[:, None]
        try:
            codes = np.asarray(self.quantizer(frames.reshape(-1, size, size, 3)))
        except ValueError as e:
            raise ValueError(f"frame_size={size} does not fit quantizer={self.quantizer!r}: {e}") from None
        count = len(SHAPES) * len(COLORS)
        if codes.ndim != 2 or codes.shape[0] != count or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"quantizer must map [T, H, W, 3] frames to int codes [T, codes_per_frame], got shape "
                             f"{codes.shape} and dtype {codes.dtype} for {count} frames")
        codes = codes.reshape(len(SHAPES), len(COLORS), -1)
        triangles = {tuple(c) for c in codes[_TRIANGLE].tolist()}
        distractors = {tuple(c) for s in _DISTRACTORS for c in codes[s].tolist()}
        if triangles & distractors:
            raise ValueError(f"frame_size={size} with quantizer={self.quantizer!r} cannot tell a triangle from a "
                             f"circle or square (same codes); use a larger frame_size or more levels")
        if len(triangles) < len(COLORS):
            raise ValueError(f"frame_size={size} with quantizer={self.quantizer!r} gives two colours' triangles the "
                             f"same codes; use a larger frame_size or more levels")
        object.__setattr__(self, "_frames", frames)
        object.__setattr__(self, "_codes", codes)

    @classmethod
    def for_length(cls, num_examples: int, *, length: int, **kwargs: Any) -> "NeedleVideo":
        """The source with as many frames as `length` tokens hold, for sweeping context lengths.

        **Arguments:**

        - `num_examples`: the number of examples.
        - `length`: the token budget of one example (keyword only).
        - `**kwargs`: the other fields (`depth`, `seed`, `frame_size`, `quantizer`, `tokenizer`),
          keyword only.

        **Returns:**

        A `NeedleVideo` whose `num_frames` is the largest with `sequence_length <= length`, i.e.
        `(length - overhead) // (codes_per_frame + 1)` where `overhead` is the tokens of everything
        but the frames (with the defaults 40: `<bos>`, `<vision>`, `</vision>`, the question, the
        longest colour name and `<eos>`).

        **Raises:**

        `ValueError` naming `length` and the minimum if not even one frame fits; the fields'
        errors as listed on the class.
        """
        if not _is_int(length):
            raise TypeError(f"length must be an int, got {type(length).__name__} {length!r}")
        probe = cls(num_examples, num_frames=1, **kwargs)
        per_frame = probe.codes_per_frame + 1
        frames = (length - (probe.sequence_length - per_frame)) // per_frame
        if frames < 1:
            raise ValueError(f"length must be at least {probe.sequence_length} tokens (one frame), got {length}")
        return replace(probe, num_frames=frames)

    @property
    def codes_per_frame(self) -> int:
        """The quantizer's codes per frame, `(frame_size / patch)²` for a `PatchQuantizer` (4 with the defaults)."""
        return self._codes.shape[-1]

    @property
    def sequence_length(self) -> int:
        """Tokens per example: `num_frames · (codes_per_frame + 1) + 2` for the vision part, plus `<bos>`, the question,
        the longest colour name and `<eos>` (`num_frames · 5 + 40` with the defaults)."""
        tok = self._tok()
        answer = max(len(tok.encode(name)) for name in COLORS)
        return 1 + self.num_frames * (self.codes_per_frame + 1) + 2 + len(tok.encode(self.QUESTION)) + answer + 1

    def _tok(self) -> Tokenizer:
        return ByteTokenizer() if self.tokenizer is None else self.tokenizer

    def __len__(self) -> int:
        """The number of examples.

        **Returns:**

        `num_examples`.
        """
        return self.num_examples

    def _draw(self, index: int) -> tuple[np.ndarray, np.ndarray, int, float, int]:
        """Per-frame shape and colour indices, the answer colour, the depth used and the needle frame."""
        rng = np.random.default_rng([self.seed, index])
        answer = int(rng.integers(len(COLORS)))
        drawn = float(rng.uniform())  # drawn even when depth is given: the example is the same at every depth
        shapes = np.asarray(_DISTRACTORS)[rng.integers(0, len(_DISTRACTORS), self.num_frames - 1)]
        colours = rng.integers(0, len(COLORS), self.num_frames - 1)
        depth = drawn if self.depth is None else float(self.depth)
        needle = _slot(depth, self.num_frames)
        return np.insert(shapes, needle, _TRIANGLE), np.insert(colours, needle, answer), answer, depth, needle

    def render(self, index: int) -> np.ndarray:
        """The frames of example `index`, as the quantizer sees them.

        **Arguments:**

        - `index`: in `[0, num_examples)`.

        **Returns:**

        uint8 `[num_frames, frame_size, frame_size, 3]`; frame `record["needle_frame"]` is the triangle.

        **Raises:**

        `IndexError` or `TypeError` for a bad `index`, as `source[index]`.
        """
        index = _check_index(index, self.num_examples, "NeedleVideo")
        shapes, colours, *_ = self._draw(index)
        return self._frames[shapes, colours]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Generate example `index` (the same every time for the same fields).

        **Arguments:**

        - `index`: in `[0, num_examples)`; any integer type is accepted.

        **Returns:**

        The record described above: `"tokens"` (int32 `[sequence_length]`), `"loss_mask"` and
        `"vision_mask"` (bool `[sequence_length]`), `"answer"` (str), `"answer_index"`,
        `"needle_frame"` and `"index"` (int), `"depth"` (float).

        **Raises:**

        `IndexError` if `index` is out of range (negative indices are not wrapped); `TypeError` if
        it is not an integer.
        """
        index = _check_index(index, self.num_examples, "NeedleVideo")
        shapes, colours, answer, depth, needle = self._draw(index)
        tok = self._tok()
        vision = vision_tokens(np.asarray(self.quantizer(self._frames[shapes, colours])), tok)
        question, name = tok.encode(self.QUESTION), tok.encode(list(COLORS)[answer])
        head = np.concatenate([[tok.bos_id], vision, question, name, [tok.eos_id]])
        tokens = np.full(self.sequence_length, tok.pad_id, np.int32)
        tokens[:len(head)] = head
        vision_mask = np.zeros(len(tokens), bool)
        vision_mask[1:1 + len(vision)] = True
        loss = np.zeros(len(tokens), bool)
        loss[len(head) - len(name) - 1:len(head)] = True
        return {"tokens": tokens, "loss_mask": loss, "vision_mask": vision_mask, "answer": list(COLORS)[answer],
                "answer_index": answer, "depth": depth, "needle_frame": needle, "index": index}
