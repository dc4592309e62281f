"""describe_video reads MovingShapes' shape, colour and motion back from the pixels; score_videos compares them."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import COLORS, MOTIONS, SHAPES, MovingShapes, caption, describe_video, score_videos

NOTHING = {"shape": None, "color": None, "motion": None}


def _truth(record) -> tuple[str, str, str]:
    """The record's ground truth as names, from its index fields (not from its caption)."""
    assert record["num_shapes"] == 1
    return SHAPES[record["shape"][0]], list(COLORS)[record["color"][0]], list(MOTIONS)[record["motion"][0]]


def _accuracy(records, videos) -> dict[str, float]:
    hits = np.zeros(3)
    for record, video in zip(records, videos, strict=True):
        d = describe_video(video)
        hits += [d[k] == t for k, t in zip(("shape", "color", "motion"), _truth(record), strict=True)]
    return dict(zip(("shape", "color", "motion"), (hits / len(records)).tolist(), strict=True))


def _records(num_frames: int, count: int, seed: int) -> list[dict]:
    source = MovingShapes(count, num_frames=num_frames, size=32, max_shapes=1, seed=seed)
    return [source[i] for i in range(count)]


def _blur_and_noise(frames: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """A slight blur (the binomial [1, 2, 1] / 4 kernel along rows and columns, edges repeated) and Gaussian pixel
    noise of `std` (in 0..255 units); float32, unclipped."""
    x = frames.astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (1, 1)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = (p.take(range(0, n), axis) + 2 * p.take(range(1, n + 1), axis) + p.take(range(2, n + 2), axis)) / 4
    return x + rng.normal(0.0, std, x.shape).astype(np.float32)


def test_clean_videos_are_read_exactly():
    """320 clean videos (2 and 8 frames, size 32): every attribute right, checked against the records' index
    fields; and the classes all occur, so no attribute is right by always answering one thing."""
    records = _records(2, 160, seed=21) + _records(8, 160, seed=22)
    videos = [r["frames"] for r in records]
    assert _accuracy(records, videos) == {"shape": 1.0, "color": 1.0, "motion": 1.0}
    truths = list(zip(*(_truth(r) for r in records), strict=True))
    assert [set(t) for t in truths] == [set(SHAPES), set(COLORS), set(MOTIONS)]
    # The same through score_videos against the captions that were drawn.
    described = [describe_video(v) for v in videos]
    assert score_videos(described, [r["caption"] for r in records]) == dict.fromkeys(
        ("shape", "color", "motion", "all"), 1.0)


def test_noisy_blurred_videos_are_still_read():
    """Blur by [1, 2, 1] / 4 and Gaussian noise of std 10/255: 320 videos, every attribute still right (measured:
    1.0 each). The 2-frame half goes in as uint8 (rounded, clipped), the 8-frame half as float in [0, 1]."""
    rng = np.random.default_rng(0)
    short, long = _records(2, 160, seed=31), _records(8, 160, seed=32)
    videos = [np.clip(np.rint(_blur_and_noise(r["frames"], rng, 10.0)), 0, 255).astype(np.uint8) for r in short]
    videos += [np.clip(_blur_and_noise(r["frames"], rng, 10.0) / 255, 0.0, 1.0) for r in long]
    assert _accuracy(short + long, videos) == {"shape": 1.0, "color": 1.0, "motion": 1.0}


def test_stray_specks_do_not_count():
    """Only each frame's largest foreground region is read: bright specks elsewhere change nothing."""
    rng = np.random.default_rng(1)
    records = _records(4, 40, seed=41)
    videos = []
    for r in records:
        frames = r["frames"].copy()
        empty = np.argwhere(frames.max(-1) == 0)  # (t, row, col) of background pixels
        for t, y, x in empty[rng.choice(len(empty), 6, replace=False)]:
            frames[t, y, x] = (255, 255, 255)
        videos.append(frames)
    assert _accuracy(records, videos) == {"shape": 1.0, "color": 1.0, "motion": 1.0}


def _square_video(rows, cols, color=(230, 40, 40), size=32, half=3) -> np.ndarray:
    """A drawn square (side 2 * half + 1) centred at each (row, col), one frame each."""
    video = np.zeros((len(rows), size, size, 3), np.uint8)
    for t, (y, x) in enumerate(zip(rows, cols, strict=True)):
        video[t, y - half:y + half + 1, x - half:x + half + 1] = color
    return video


def test_motion_axes_signs_and_the_still_threshold():
    assert describe_video(_square_video([8, 12, 20], [16, 16, 16])) == {"shape": "square", "color": "red",
                                                                       "motion": "down"}  # rows grow downward
    assert describe_video(_square_video([20, 8], [16, 16]))["motion"] == "up"
    assert describe_video(_square_video([16, 16], [20, 9]))["motion"] == "left"
    assert describe_video(_square_video([16, 18], [9, 20]))["motion"] == "right"  # the larger axis wins
    # A moving shape of MovingShapes travels at least 0.3 * 32 - 1.5 = 8.1 pixels at size 32; half: 4.05.
    assert describe_video(_square_video([16, 16], [14, 18]))["motion"] == "still"
    assert describe_video(_square_video([16, 16], [14, 19]))["motion"] == "right"
    # Only the first and last frames with foreground count; one such frame tells no motion.
    video = _square_video([8, 8, 20], [16, 16, 16])
    video[0] = 0
    assert describe_video(video)["motion"] == "down"
    video[2] = 0
    assert describe_video(video) == {"shape": "square", "color": "red", "motion": None}
    assert describe_video(_square_video([16], [16]))["motion"] is None


def test_input_forms():
    record = _records(4, 1, seed=51)[0]
    expected = describe_video(record["frames"])
    assert expected == dict(zip(("shape", "color", "motion"), _truth(record), strict=True))
    assert describe_video(jnp.asarray(record["frames"])) == expected
    assert describe_video(record["frames"].astype(np.float64) / 255) == expected
    assert describe_video(jnp.asarray(record["frames"], jnp.float32) / 255) == expected
    assert describe_video(np.zeros((3, 32, 32, 3), np.uint8)) == NOTHING
    assert describe_video(np.zeros((1, 16, 16, 3), np.float32)) == NOTHING
    # Dim pixels (below 100/255 in every channel) are background.
    assert describe_video(np.full((2, 16, 16, 3), 99, np.uint8)) == NOTHING
    assert describe_video(np.full((2, 16, 16, 3), 99 / 255, np.float32)) == NOTHING
    assert describe_video(np.full((2, 16, 16, 3), 100, np.uint8))["shape"] == "square"


@pytest.mark.parametrize("frames", [
    np.zeros((32, 32, 3), np.uint8),  # one frame, not a video
    np.zeros((2, 32, 32, 4), np.uint8),  # RGBA
    np.zeros((2, 3, 32, 32), np.uint8),  # channels first
    np.zeros((0, 32, 32, 3), np.uint8),  # no frames
    np.zeros((1, 2, 32, 32, 3), np.uint8),  # a batch
])
def test_wrong_shapes_are_refused(frames):
    with pytest.raises(ValueError, match=r"frames must be one video \[T, H, W, 3\] with T, H, W >= 1, got shape"):
        describe_video(frames)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, bool])
def test_wrong_dtypes_are_refused(dtype):
    with pytest.raises(TypeError, match=r"frames must be uint8 in \[0, 255\] or floating point in \[0, 1\], got dtype"):
        describe_video(np.zeros((2, 16, 16, 3), dtype))


@pytest.mark.parametrize("value", [255.0, -0.1, 1.01, np.nan])
def test_float_frames_outside_the_unit_range_are_refused(value):
    frames = np.zeros((2, 16, 16, 3), np.float32)
    frames[1, 3, 4, 0] = value
    with pytest.raises(ValueError, match=r"frames of a floating dtype must lie in \[0, 1\] \(uint8 frames / 255\)"):
        describe_video(frames)


def test_score_videos_on_hand_made_examples():
    captions = ["a red square moves left", "an orange circle stays still", "a blue triangle moves up",
                "a white circle moves down"]
    descriptions = [
        {"shape": "square", "color": "red", "motion": "left"},  # all right
        {"shape": "circle", "color": "yellow", "motion": "still"},  # colour wrong
        {"shape": "circle", "color": "blue", "motion": "down"},  # shape and motion wrong
        NOTHING,  # nothing readable: a miss on every attribute
    ]
    assert score_videos(descriptions, captions) == {"shape": 0.5, "color": 0.5, "motion": 0.5, "all": 0.25}
    assert score_videos(descriptions[:1], captions[:1]) == {"shape": 1.0, "color": 1.0, "motion": 1.0, "all": 1.0}
    assert score_videos([NOTHING], ["a green square moves right"]) == dict.fromkeys(
        ("shape", "color", "motion", "all"), 0.0)
    # The caption's old article ("a orange") reads the same; the captions can come from `caption`.
    assert score_videos(descriptions[1:2], ["a orange circle stays still"])["motion"] == 1.0
    made = caption([2], [list(COLORS).index("blue")], [list(MOTIONS).index("up")])
    assert score_videos(descriptions[2:3], [made]) == {"shape": 0.0, "color": 1.0, "motion": 0.0, "all": 0.0}
    assert score_videos([], []) == dict.fromkeys(("shape", "color", "motion", "all"), 0.0)


def test_an_all_background_video_is_a_miss():
    record = _records(2, 1, seed=61)[0]
    described = [describe_video(record["frames"]), describe_video(np.zeros_like(record["frames"]))]
    assert described[1] == NOTHING
    assert score_videos(described, [record["caption"]] * 2) == dict.fromkeys(("shape", "color", "motion", "all"), 0.5)


def test_score_videos_refuses_mismatched_inputs():
    one = [{"shape": "square", "color": "red", "motion": "left"}]
    with pytest.raises(ValueError, match="got 1 descriptions for 2 captions"):
        score_videos(one, ["a red square moves left"] * 2)
    with pytest.raises(ValueError, match=r"captions\[0\] must name exactly one shape, read 2 in"):
        score_videos(one, ["a red square moves left and a blue circle stays still"])
    with pytest.raises(ValueError, match=r"captions\[0\] must name exactly one shape, read 0 in"):
        score_videos(one, ["a purple hexagon dances"])
