"""`MovingShapes`: a procedural video-text dataset, deterministic from (seed, index), for offline training.

Also its captions' parser and scores, and `describe_video`, which reads a video's shape, colour and motion back.
"""

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""The shapes [`MovingShapes`][data_pipelines.MovingShapes] draws; a record's `"shape"` indexes this tuple."""
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 220),
    "magenta": (220, 50, 220),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}
"""Colour name → uint8 RGB of [`MovingShapes`][data_pipelines.MovingShapes]; a record's `"color"` indexes the names.

Index `i` is the `i`-th key in insertion order (`list(COLORS)[i]`).
"""
MOTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}
"""Motion name → unit velocity in (row, column) per frame; a record's `"motion"` indexes the names (`list(MOTIONS)`).

A moving shape's actual speed is drawn per shape so that it stays inside the frame; `"still"` does not move.
"""
_PHRASE = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down", "still": "stays still"}
_COLOR_TABLE = np.array(list(COLORS.values()), dtype=np.uint8)
# A shape's radius, as a fraction of the frame's size, is drawn uniformly from this range.
_RADIUS = (0.12, 0.2)
# A moving shape's centre travels this fraction of the room its radius leaves it (see `_path`).
_TRAVEL = (0.5, 1.0)


@dataclass(frozen=True)
class MovingShapes:
    """Videos of 1 to `max_shapes` coloured shapes moving in straight lines, with a caption saying what happens.

    A grain random-access source (`len`, `[index]`): example `i` depends only on `(seed, i)`, so
    nothing is stored and any process can read any example. Each record is a dict:

    - `"frames"`: uint8 `[num_frames, size, size, 3]` on a black background; later shapes are drawn
      over earlier ones.
    - `"caption"`: e.g. `"a red square moves left and a blue circle stays still"` (see
      [`caption`][data_pipelines.caption]).
    - `"num_shapes"` (an int) and int32 `[max_shapes]` arrays `"shape"`, `"color"`, `"motion"`
      (indices into [`SHAPES`][data_pipelines.SHAPES], [`COLORS`][data_pipelines.COLORS],
      [`MOTIONS`][data_pipelines.MOTIONS]; -1 past `num_shapes`): the ground truth the caption was
      made from, for evaluation (see [`score_captions`][data_pipelines.score_captions]).
    - `"index"`: the example's index, an int.

    A frozen dataclass; its fields are its arguments.

    **Arguments:**

    - `num_examples`: the number of examples, `len(source)`.
    - `num_frames`: frames per video, default 8.
    - `size`: height and width of a frame in pixels, default 32; at least 12.
    - `max_shapes`: the most shapes in a video, default 3; each video has 1 to `max_shapes`, drawn
      uniformly.
    - `seed`: with the index, determines every example; default 0.

    **Raises:**

    `ValueError` naming the argument if `num_examples < 0`, `num_frames < 1`, `max_shapes < 1`,
    `size < 12` or `seed < 0`; `TypeError` if one of them is not an int (a bool is not).

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import MovingShapes, caption, parse_caption, score_captions

    source = MovingShapes(num_examples=100, num_frames=4, size=16, seed=0)
    record = source[7]
    assert len(source) == 100 and record["index"] == 7
    assert record["frames"].shape == (4, 16, 16, 3) and record["frames"].dtype == np.uint8
    assert record["shape"].shape == (3,) and 1 <= record["num_shapes"] <= 3
    assert record["caption"] == caption(record["shape"], record["color"], record["motion"])
    assert len(parse_caption(record["caption"])) == record["num_shapes"]
    assert np.array_equal(MovingShapes(100, 4, 16)[7]["frames"], record["frames"])  # deterministic
    assert score_captions([record["caption"]], [record])["exact"] == 1.0
    ```
    """

    num_examples: int
    num_frames: int = 8
    size: int = 32
    max_shapes: int = 3
    seed: int = 0

    def __post_init__(self):
        """Check the fields; raises as listed above."""
        for name, low in (("num_examples", 0), ("num_frames", 1), ("size", 12), ("max_shapes", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                bound = "at least 12 pixels to draw a shape" if name == "size" else f">= {low}"
                raise ValueError(f"{name} must be {bound}, got {value}")

    def __len__(self) -> int:
        """The number of examples.

        **Returns:**

        `num_examples`.
        """
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Generate example `index` (the same every time for the same `seed`).

        **Arguments:**

        - `index`: in `[0, num_examples)`; any integer type (e.g. a NumPy integer) is accepted.

        **Returns:**

        A dict with the keys `"frames"` (uint8 `[num_frames, size, size, 3]`), `"caption"` (str),
        `"num_shapes"` (int), `"shape"`, `"color"`, `"motion"` (int32 `[max_shapes]`, -1 past
        `num_shapes`) and `"index"` (int), as described above.

        **Raises:**

        `IndexError` if `index` is out of range (negative indices are not wrapped); `TypeError` if
        it is not an integer.
        """
        if not _is_int(index):
            raise TypeError(f"index must be an int, got {type(index).__name__} {index!r}")
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for MovingShapes of {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(1, self.max_shapes + 1))
        shape = rng.integers(0, len(SHAPES), count)
        color = rng.choice(len(COLORS), count, replace=False) if count <= len(COLORS) else rng.integers(
            0, len(COLORS), count)
        motion = rng.integers(0, len(MOTIONS), count)
        frames = np.zeros((self.num_frames, self.size, self.size, 3), np.uint8)
        rows = np.arange(self.size, dtype=np.float32)[None, :, None]
        cols = np.arange(self.size, dtype=np.float32)[None, None, :]
        t = np.arange(self.num_frames, dtype=np.float32)[:, None, None]
        for s, c, m in zip(shape, color, motion, strict=True):
            radius = float(rng.uniform(*_RADIUS) * self.size)
            start, step = self._path(rng, radius, MOTIONS[list(MOTIONS)[m]])
            dy, dx = rows - (start[0] + step[0] * t), cols - (start[1] + step[1] * t)
            frames[_inside(SHAPES[s], dy, dx, radius)] = _COLOR_TABLE[c]
        pad = np.full(self.max_shapes - count, -1, np.int32)
        return {
            "frames": frames,
            "caption": caption(shape, color, motion),
            "num_shapes": count,
            "shape": np.concatenate([shape.astype(np.int32), pad]),
            "color": np.concatenate([color.astype(np.int32), pad]),
            "motion": np.concatenate([motion.astype(np.int32), pad]),
            "index": index,
        }

    def _path(self, rng: np.random.Generator, radius: float, direction: tuple[int, int]):
        """A start point and per-frame step along `direction` that keep the shape inside the frame."""
        lo, hi = radius + 1, self.size - radius - 2
        travel = (hi - lo) * rng.uniform(*_TRAVEL)
        speed = travel / max(self.num_frames - 1, 1)
        start = []
        for d in direction:
            if d == 0:
                start.append(rng.uniform(lo, hi))
            else:
                first = lo + rng.uniform(0, hi - lo - travel)
                start.append(first if d > 0 else first + travel)
        return np.array(start, np.float32), np.array(direction, np.float32) * speed


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _inside(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    # An upward triangle: apex at dy = -r, base at dy = +r, half-width growing to r.
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def caption(shape, color, motion) -> str:
    """`"a red square moves left and an orange circle stays still"` from index arrays (as in the records).

    One phrase `"a {color} {shape} {motion phrase}"` per shape, in order, joined by `", "` and a
    final `" and "`; the article is `"an"` before a colour that starts with a vowel (`"an orange"`).
    Entries whose shape index is negative (the -1 padding of a
    [`MovingShapes`][data_pipelines.MovingShapes] record) are skipped.

    **Arguments:**

    - `shape`: int `[max_shapes]` indices into [`SHAPES`][data_pipelines.SHAPES].
    - `color`: int `[max_shapes]` indices into [`COLORS`][data_pipelines.COLORS] (its names in order).
    - `motion`: int `[max_shapes]` indices into [`MOTIONS`][data_pipelines.MOTIONS] (its names in order).

    **Returns:**

    The caption string; `""` when no shape index is `>= 0`.

    **Raises:**

    `ValueError` if the three differ in length or hold an index outside its table
    (a negative shape index is padding; a negative colour or motion index of a shape is an error).
    """
    shape, color, motion = (np.asarray(a).reshape(-1) for a in (shape, color, motion))
    if not len(shape) == len(color) == len(motion):
        raise ValueError(f"shape, color and motion must have one length, got {len(shape)}, {len(color)}, {len(motion)}")
    color_names, motion_names = list(COLORS), list(MOTIONS)
    parts = []
    for s, c, m in zip(shape.tolist(), color.tolist(), motion.tolist(), strict=True):
        if s < 0:
            continue
        for name, value, table in (("shape", s, SHAPES), ("color", c, color_names), ("motion", m, motion_names)):
            if not 0 <= value < len(table):
                raise ValueError(f"{name} indices must lie in [0, {len(table)}), got {value}")
        parts.append(f"{_article(color_names[c])} {color_names[c]} {SHAPES[s]} {_PHRASE[motion_names[m]]}")
    if not parts:
        return ""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# "a" or "an" before any colour: the article is grammar, not an attribute, and captions written
# before `caption` chose the article by the colour ("a orange") still read.
_OBJECT = re.compile(
    rf"\ban? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(_PHRASE.values())})\b"
)


def parse_caption(text: str) -> list[tuple[int, int, int]]:
    """The `(shape, color, motion)` index triples a caption names, in order; unreadable phrases are skipped.

    The inverse of [`caption`][data_pipelines.caption] on its own output. A phrase is read when it
    matches `"a {color} {shape} {motion phrase}"` or `"an {color} {shape} {motion phrase}"`
    exactly (lower case, whole words), anywhere in `text`. Either article is read before any
    colour, so `"an orange ..."` (what `caption` writes) and `"a orange ..."` (what it wrote
    before) both count.

    **Arguments:**

    - `text`: a caption, e.g. a model's generated text.

    **Returns:**

    A list of `(shape, color, motion)` tuples of ints, indices into [`SHAPES`][data_pipelines.SHAPES],
    [`COLORS`][data_pipelines.COLORS] and [`MOTIONS`][data_pipelines.MOTIONS]; empty when nothing
    is readable.
    """
    color_names, phrases = list(COLORS), list(_PHRASE.values())
    return [(SHAPES.index(s), color_names.index(c), phrases.index(m)) for c, s, m in _OBJECT.findall(text)]


def score_captions(texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-attribute accuracy of captions against the [`MovingShapes`][data_pipelines.MovingShapes] records.

    For each attribute (`"shape"`, `"color"`, `"motion"`) a video scores the size of the multiset
    intersection of the predicted and true values over the larger of its number of shapes and the
    number of phrases read, so the order of the phrases does not matter and a missing or extra
    phrase costs. A video with no shapes scores 1 when the caption names none (nothing missed,
    nothing invented) and 0 otherwise. `"exact"` is the fraction of captions whose multiset of
    (shape, color, motion) triples equals the truth's.

    **Arguments:**

    - `texts`: one caption per record, e.g. generated by a model.
    - `records`: [`MovingShapes`][data_pipelines.MovingShapes] records (anything with `"num_shapes"`,
      `"shape"`, `"color"`, `"motion"`), as many as `texts`.

    **Returns:**

    A dict with the keys `"shape"`, `"color"`, `"motion"` and `"exact"`, each a float in `[0, 1]`
    averaged over the captions (all 0.0 when there are none).

    **Raises:**

    `ValueError` if `texts` and `records` differ in length, or a record's `"num_shapes"` is not in
    `[0, len(record["shape"])]`.
    """
    if len(texts) != len(records):
        raise ValueError(f"got {len(texts)} captions for {len(records)} records")
    totals = dict.fromkeys(("shape", "color", "motion", "exact"), 0.0)
    for i, (text, record) in enumerate(zip(texts, records, strict=True)):
        predicted = parse_caption(text)
        count = int(record["num_shapes"])
        if not 0 <= count <= len(record["shape"]):
            raise ValueError(f"records[{i}]: num_shapes must lie in [0, {len(record['shape'])}] (the length of its "
                             f"label arrays), got {count}")
        truth = [tuple(int(record[a][i]) for a in ("shape", "color", "motion")) for i in range(count)]
        for a, name in enumerate(("shape", "color", "motion")):
            overlap = Counter(t[a] for t in truth) & Counter(p[a] for p in predicted)
            # No shapes and no phrase: nothing to find and nothing wrong, a perfect score.
            totals[name] += sum(overlap.values()) / max(count, len(predicted)) if count or predicted else 1.0
        totals["exact"] += float(sorted(predicted) == sorted(truth))
    return {k: v / max(len(texts), 1) for k, v in totals.items()}


# Foreground: a pixel whose brightest channel reaches half that of the dimmest colour (green's 200), so at most
# halfway between the black background and a shape's colour: 100/255, 0.39.
_FOREGROUND = 0.5 * float(_COLOR_TABLE.max(axis=1).min()) / 255
# A shape's pixel rows are skewed toward its base when their skewness is below this: an upward triangle's is
# -0.57 (-0.55 to -0.65 as rasterised at size 32), a circle's or a square's 0 (within +-0.1 rasterised).
_TRIANGLE_SKEW = -0.3
# A square fills its bounding box exactly; a rasterised disc at most 0.92 of it at size 32 (pi/4 in the limit).
_SQUARE_FILL = 0.95


def _min_travel(size: int) -> float:
    """The least distance `MovingShapes._path` moves a moving shape's centre in a `size` frame, in pixels."""
    # The room is (size - radius - 2) - (radius + 1), least for the largest radius; a shape travels a fraction of it.
    return _TRAVEL[0] * (size * (1 - 2 * _RADIUS[1]) - 3)


def describe_video(frames) -> dict[str, str | None]:
    """The shape, colour and motion of the one shape in a video, read back from its pixels.

    Made to check generated videos against the caption that prompted them (see
    [`score_videos`][data_pipelines.score_videos]), so it reads frames as
    [`MovingShapes`][data_pipelines.MovingShapes] draws them (one shape, `max_shapes=1`, black
    background) and tolerates the slightly noisy colours and soft edges of frames decoded from VQ codes
    (e.g. by [`VideoVQ.decode`][models.VideoVQ.decode], which returns uint8). The rules:

    - **Foreground**: the pixels whose brightest channel is at least 100/255 (half that of the
      dimmest colour, green's 200). In each frame only the largest 4-connected region of
      foreground counts, so stray specks do not; frames without foreground are skipped.
    - **Colour**: the [`COLORS`][data_pipelines.COLORS] entry nearest (in RGB) the per-channel median of
      the regions' inner pixels (the region less its edge, where blur mixes in the background; the
      whole region when that leaves nothing), over all frames.
    - **Shape**: two numbers per frame, each then the median over the frames: the skewness of the
      region's pixel rows and the fraction of its bounding box it fills. `"triangle"` if the skewness
      is below -0.3 (the renderer's triangles point up, their mass sits toward the base: -0.57; a circle's
      or a square's is 0); otherwise `"square"` if the fill is at least 0.95 (a square fills its box, a
      rasterised disc at most 0.92 of it at size 32, pi/4 in the limit), else `"circle"`. The fill is
      measured after removing one-pixel-wide bumps (a morphological opening by a 2x2 square), such as
      a noisy pixel stuck to the edge, unless that removes over a tenth of the region (a small disc's
      own bumps). The fill alone cannot tell a small disc (0.7 to 0.92) from a triangle (0.5 to 0.63),
      hence the skewness.
    - **Motion**: the region's centroid in the last frame with foreground minus that in the first. If
      both components are below half the least distance `MovingShapes` moves a moving shape from its
      first frame to its last (that distance is `0.3 * size - 1.5` pixels, `size` the frame's smaller
      side: half of it is 4.05 pixels at size 32; the threshold is at least 0.5), `"still"`;
      otherwise the larger component's axis and sign: rows grow downward, so a growing row is
      `"down"` (as in [`MOTIONS`][data_pipelines.MOTIONS]), a growing column `"right"`.

    On clean `MovingShapes` videos of one shape it is exact at size 32 (4,000 videos; also at 48 and 64)
    and stays so under a slight blur and pixel noise of std 10/255 (tests/test_detect.py). Smaller frames
    rasterise a few small discs as squares: 0.994 of the shapes are right at size 24, 0.987 at 16, 0.95 at
    12; colour and motion stay exact. Several shapes are not separated: each frame's largest
    region is read as the shape.

    **Arguments:**

    - `frames`: one video `[T, H, W, 3]` (RGB), uint8 in `[0, 255]` (what `MovingShapes` and
      `VideoVQ.decode` give) or floating point in `[0, 1]`; a NumPy or JAX array, or anything
      `np.asarray` takes.

    **Returns:**

    A dict `{"shape": ..., "color": ..., "motion": ...}` of names from [`SHAPES`][data_pipelines.SHAPES],
    [`COLORS`][data_pipelines.COLORS] and [`MOTIONS`][data_pipelines.MOTIONS]. All three are `None`
    when no frame has foreground; `"motion"` alone is `None` when only one frame has.

    **Raises:**

    `ValueError` naming `frames` if it is not `[T, H, W, 3]` with `T, H, W >= 1`, or is floating point
    with a value outside `[0, 1]` or NaN; `TypeError` naming `frames` if its dtype is neither uint8
    nor floating point.

    **Example:**

    ```python
    import numpy as np
    from data_pipelines import MovingShapes, describe_video, score_videos

    record = MovingShapes(num_examples=10, num_frames=4, size=32, max_shapes=1)[0]
    assert record["caption"] == "a magenta triangle moves up"
    described = describe_video(record["frames"])
    assert described == {"shape": "triangle", "color": "magenta", "motion": "up"}
    assert describe_video(record["frames"] / 255.0) == described  # float frames in [0, 1]
    assert describe_video(np.zeros((4, 32, 32, 3), np.uint8)) == {"shape": None, "color": None, "motion": None}
    assert score_videos([described], [record["caption"]]) == {"shape": 1.0, "color": 1.0, "motion": 1.0, "all": 1.0}
    ```
    """
    from scipy import ndimage  # scipy comes with jax; imported here to keep `import data_pipelines` light

    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3 or 0 in video.shape:
        raise ValueError(f"frames must be one video [T, H, W, 3] with T, H, W >= 1, got shape {video.shape}")
    if video.dtype == np.uint8:
        video = video.astype(np.float32) / 255
    elif np.issubdtype(video.dtype, np.floating):
        video = video.astype(np.float32)
        if not (np.all(video >= 0) and np.all(video <= 1)):  # also when there is a NaN
            raise ValueError(f"frames of a floating dtype must lie in [0, 1] (uint8 frames / 255), got values from "
                             f"{video.min()} to {video.max()}")
    else:
        raise TypeError(f"frames must be uint8 in [0, 255] or floating point in [0, 1], got dtype {video.dtype}")
    colors, fills, skews, centroids = [], [], [], []
    for frame in video:
        labels, count = ndimage.label(frame.max(axis=-1) >= _FOREGROUND)
        if count == 0:
            continue
        region = labels == 1 + np.bincount(labels.ravel())[1:].argmax()
        inner = ndimage.binary_erosion(region)
        colors.append(frame[inner if inner.any() else region])
        opened = ndimage.binary_opening(region, np.ones((2, 2), bool))
        rows, cols = np.nonzero(opened if opened.sum() >= 0.9 * region.sum() else region)
        fills.append(rows.size / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)))
        rows, cols = np.nonzero(region)
        spread = rows.std()
        skews.append(float(np.mean((rows - rows.mean()) ** 3) / spread**3) if spread > 0 else 0.0)
        centroids.append((rows.mean(), cols.mean()))
    if not colors:
        return {"shape": None, "color": None, "motion": None}
    median = np.median(np.concatenate(colors), axis=0) * 255
    color = list(COLORS)[int(np.argmin(((_COLOR_TABLE - median) ** 2).sum(axis=1)))]
    if np.median(skews) < _TRIANGLE_SKEW:
        shape = "triangle"
    else:
        shape = "square" if np.median(fills) >= _SQUARE_FILL else "circle"
    motion = None
    if len(centroids) >= 2:
        d_row, d_col = np.subtract(centroids[-1], centroids[0])
        if max(abs(d_row), abs(d_col)) < max(0.5 * _min_travel(min(video.shape[1:3])), 0.5):
            motion = "still"
        elif abs(d_row) > abs(d_col):
            motion = "down" if d_row > 0 else "up"
        else:
            motion = "right" if d_col > 0 else "left"
    return {"shape": shape, "color": color, "motion": motion}


def score_videos(descriptions: Sequence[Mapping[str, str | None]], captions: Sequence[str]) -> dict[str, float]:
    """Per-attribute match rates of described videos against the one-shape captions that prompted them.

    Each caption is read by [`parse_caption`][data_pipelines.parse_caption] and must name exactly one
    shape; a video matches on an attribute when its description (from
    [`describe_video`][data_pipelines.describe_video]) names the same value. A `None` (nothing
    readable) is a miss.

    **Arguments:**

    - `descriptions`: one dict with the keys `"shape"`, `"color"` and `"motion"` per video, e.g.
      `describe_video`'s.
    - `captions`: the caption each video was generated from, as many as `descriptions`.

    **Returns:**

    A dict with the keys `"shape"`, `"color"`, `"motion"` (the fraction of videos that match on it)
    and `"all"` (the fraction that match on all three), floats in `[0, 1]`; all 0.0 when there are no
    videos.

    **Raises:**

    `ValueError` if `descriptions` and `captions` differ in length, or a caption does not name exactly
    one shape.
    """
    if len(descriptions) != len(captions):
        raise ValueError(f"got {len(descriptions)} descriptions for {len(captions)} captions")
    names = ("shape", "color", "motion")
    totals = dict.fromkeys((*names, "all"), 0.0)
    for i, (described, text) in enumerate(zip(descriptions, captions, strict=True)):
        phrases = parse_caption(text)
        if len(phrases) != 1:
            raise ValueError(f"captions[{i}] must name exactly one shape, read {len(phrases)} in {text!r}")
        s, c, m = phrases[0]
        truth = (SHAPES[s], list(COLORS)[c], list(MOTIONS)[m])
        matches = [described[name] == value for name, value in zip(names, truth, strict=True)]
        for name, match in zip(names, matches, strict=True):
            totals[name] += match
        totals["all"] += all(matches)
    return {k: v / max(len(captions), 1) for k, v in totals.items()}
