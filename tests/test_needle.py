"""The long-context retrieval sources: NeedleText (a pass key in filler text), NeedleVideo (a triangle among frames)."""

import re

import numpy as np
import pytest

from data_pipelines import COLORS, ByteTokenizer, NeedleText, NeedleVideo, PatchQuantizer, vision_tokens

TOK = ByteTokenizer()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


# NeedleText


def test_text_is_deterministic_and_seeded():
    source = NeedleText(20, length=300, seed=3)
    _same(source[7], NeedleText(20, length=300, seed=3)[7])
    other = NeedleText(20, length=300, seed=4)
    assert [source[i]["answer"] for i in range(20)] != [other[i]["answer"] for i in range(20)]
    assert len({source[i]["answer"] for i in range(20)}) > 10  # the key is drawn per example


@pytest.mark.parametrize("length", [105, 106, 1000, 4099])
def test_text_exact_length_and_layout(length):
    source = NeedleText(3, length=length, depth=0.3)
    assert source.min_length == 105
    for i in range(3):
        record = source[i]
        tokens, loss = record["tokens"], record["loss_mask"]
        assert tokens.dtype == np.int32 and tokens.shape == (length,) and loss.dtype == bool and loss.shape == (length,)
        assert record["vision_mask"].shape == (length,) and not record["vision_mask"].any()
        assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id and (tokens[1:-1] < 256).all()
        assert record["index"] == i


def test_text_loss_mask_is_the_answer_and_eos_and_answer_is_the_key():
    source = NeedleText(10, length=500)
    for i in range(10):
        record = source[i]
        tokens, loss = record["tokens"], record["loss_mask"]
        answer = record["answer"]
        assert re.fullmatch(r"[1-9]\d{4}", answer)
        n = len(answer) + 1
        assert loss[-n:].all() and not loss[:-n].any()
        assert tokens[loss].tolist() == [*TOK.encode(answer).tolist(), TOK.eos_id]
        text = TOK.decode(tokens)
        # The needle carries the same key as the answer, the question comes last, the answer after it.
        assert text.count(f"The pass key is {answer}. Remember it. {answer} is the pass key.") == 1
        assert text.endswith("\nWhat is the pass key? The pass key is " + answer)
        assert text.count(answer) == 3


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, 0.25])
def test_text_depth_puts_the_needle_where_documented(depth):
    length = 1000
    source = NeedleText(4, length=length, depth=depth)
    filler = length - source.min_length
    for i in range(4):
        record = source[i]
        needle = TOK.encode(NeedleText.NEEDLE.format(key=record["answer"]))
        start = record["needle_start"]
        assert start == 1 + round(depth * filler) and record["depth"] == depth
        assert record["tokens"][start:start + len(needle)].tolist() == needle.tolist()
        text = TOK.decode(record["tokens"])
        before = TOK.decode(record["tokens"][1:start])
        assert text.index("The pass key is") == len(before)
    if depth == 0.0:
        assert source[0]["needle_start"] == 1
    if depth == 1.0:  # right before the question
        record = source[0]
        end = record["needle_start"] + len(TOK.encode(NeedleText.NEEDLE.format(key=record["answer"])))
        assert TOK.decode(record["tokens"][end:]).startswith("\nWhat is the pass key?")


def test_text_filler_is_whole_sentences_around_the_needle():
    record = NeedleText(1, length=2000, depth=0.5)[0]
    text = TOK.decode(record["tokens"])
    before, after = text.split("The pass key is", 1)
    assert before.endswith("There and back again. ")
    assert after.split("is the pass key. ", 1)[1].startswith("The grass is green. The sky is blue.")


def test_text_same_example_at_every_depth():
    a, b = NeedleText(5, length=600, depth=0.1)[2], NeedleText(5, length=600, depth=0.9)[2]
    assert a["answer"] == b["answer"] and a["needle_start"] < b["needle_start"]
    tail = len(NeedleText.QUESTION) + len(a["answer"]) + 1  # the question, the answer and <eos>
    assert a["tokens"][-tail:].tolist() == b["tokens"][-tail:].tolist()
    assert a["tokens"][-tail - 1] != b["tokens"][-tail - 1] or a["tokens"][-tail - 2] != b["tokens"][-tail - 2]


def test_text_depth_none_spreads_needles():
    source = NeedleText(60, length=800)
    records = [source[i] for i in range(60)]
    depths = np.array([r["depth"] for r in records])
    assert ((0 <= depths) & (depths <= 1)).all() and depths.min() < 0.15 and depths.max() > 0.85
    starts = {r["needle_start"] for r in records}
    assert len(starts) > 40
    filler = 800 - source.min_length
    assert all(r["needle_start"] == 1 + round(r["depth"] * filler) for r in records)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=-1, length=200), "num_examples"),
    (dict(num_examples=3, length=104), r"length must be at least 105"),
    (dict(num_examples=3, length=200, depth=1.5), "depth"),
    (dict(num_examples=3, length=200, depth=-0.1), "depth"),
    (dict(num_examples=3, length=200, seed=-2), "seed"),
])
def test_text_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeedleText(**kwargs)


def test_text_bad_index():
    source = NeedleText(3, length=200)
    with pytest.raises(IndexError, match="index 3"):
        source[3]


# NeedleVideo


def test_video_is_deterministic_and_seeded():
    source = NeedleVideo(20, num_frames=30, seed=1)
    _same(source[5], NeedleVideo(20, num_frames=30, seed=1)[5])
    other = NeedleVideo(20, num_frames=30, seed=2)
    assert not all(np.array_equal(source[i]["tokens"], other[i]["tokens"]) for i in range(20))
    assert len({source[i]["answer"] for i in range(20)}) > 3


@pytest.mark.parametrize("num_frames", [1, 2, 37])
def test_video_layout_lengths_and_masks(num_frames):
    source = NeedleVideo(12, num_frames=num_frames, seed=5)
    assert source.codes_per_frame == 4
    longest = max(len(name) for name in COLORS)
    assert source.sequence_length == 1 + num_frames * 5 + 2 + len(NeedleVideo.QUESTION) + longest + 1
    for i in range(12):
        record = source[i]
        tokens, loss, vision = record["tokens"], record["loss_mask"], record["vision_mask"]
        assert tokens.shape == loss.shape == vision.shape == (source.sequence_length,) and tokens.dtype == np.int32
        codes = PatchQuantizer(patch=4)(source.render(i))
        expected_vision = vision_tokens(codes, TOK)
        assert np.array_equal(tokens[1:1 + len(expected_vision)], expected_vision)
        assert vision.tolist() == [False] + [True] * len(expected_vision) + [False] * (len(tokens) - 1 - len(
            expected_vision))
        name = record["answer"]
        assert name == list(COLORS)[record["answer_index"]]
        text = tokens[1 + len(expected_vision):]
        assert TOK.decode(text) == NeedleVideo.QUESTION + name
        end = len(NeedleVideo.QUESTION) + len(name)
        assert text[end] == TOK.eos_id and (text[end + 1:] == TOK.pad_id).all()
        assert tokens[loss].tolist() == [*TOK.encode(name).tolist(), TOK.eos_id]


def test_video_answer_is_the_triangle_colour_and_the_needle_frame_is_the_triangle():
    source = NeedleVideo(15, num_frames=20, seed=2)
    for i in range(15):
        record, frames = source[i], source.render(i)
        needle = frames[record["needle_frame"]]
        # The answer's colour is drawn there, and only a triangle's rows differ from top to bottom of the frame.
        assert (needle.reshape(-1, 3) == COLORS[record["answer"]]).all(axis=1).any()
        widths = needle.any(-1).sum(1)  # the drawn pixels per row
        assert widths[1] < widths[-2]  # narrow apex, wide base
        for j in np.delete(np.arange(20), record["needle_frame"]):
            w = frames[j].any(-1).sum(1)
            assert w.max() > 0 and np.array_equal(w, w[::-1])  # circles and squares are top-bottom symmetric


def test_video_triangle_codes_are_unique_among_the_frames():
    source = NeedleVideo(30, num_frames=50, seed=7)
    for i in range(30):
        record = source[i]
        codes = PatchQuantizer(patch=4)(source.render(i))
        needle = codes[record["needle_frame"]]
        others = np.delete(codes, record["needle_frame"], axis=0)
        assert not (others == needle).all(axis=1).any()


def test_video_every_triangle_differs_from_every_distractor_pattern():
    # Exhaustively: all shapes × colours at the default size, through one-frame videos of many seeds.
    quantizer = PatchQuantizer(patch=4)
    triangles, distractors = {}, set()
    source = NeedleVideo(400, num_frames=6, seed=0)
    for i in range(400):
        record = source[i]
        codes = quantizer(source.render(i))
        triangles.setdefault(record["answer_index"], set()).add(tuple(codes[record["needle_frame"]]))
        distractors |= {tuple(c) for c in np.delete(codes, record["needle_frame"], axis=0)}
    assert sorted(triangles) == list(range(len(COLORS)))
    assert all(len(t) == 1 for t in triangles.values())  # one pattern per colour: the colour reads off the codes
    patterns = [next(iter(t)) for t in triangles.values()]
    assert len(set(patterns)) == len(COLORS) and not set(patterns) & distractors
    assert len(distractors) > 8


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, 0.3])
def test_video_depth_puts_the_needle_where_documented(depth):
    num_frames = 41
    source = NeedleVideo(4, num_frames=num_frames, depth=depth)
    for i in range(4):
        record = source[i]
        assert record["needle_frame"] == round(depth * (num_frames - 1)) and record["depth"] == depth
    if depth == 0.0:
        assert source[0]["needle_frame"] == 0
    if depth == 1.0:
        assert source[0]["needle_frame"] == num_frames - 1


def test_depth_rule_is_the_same_for_text_and_video():
    # A text whose filler has as many insertion points as the video has frames puts its needle in the same slot.
    for depth in (0.0, 0.1, 0.45, 0.5, 0.77, 1.0):
        frames = 23
        text = NeedleText(1, length=NeedleText(1, length=200).min_length + frames - 1, depth=depth)[0]
        video = NeedleVideo(1, num_frames=frames, depth=depth)[0]
        assert text["needle_start"] - 1 == video["needle_frame"]


def test_video_same_example_at_every_depth():
    a, b = NeedleVideo(3, num_frames=25, depth=0.0), NeedleVideo(3, num_frames=25, depth=1.0)
    ra, rb = a[1], b[1]
    assert ra["answer"] == rb["answer"]
    fa, fb = a.render(1), b.render(1)
    assert np.array_equal(fa[1:], fb[:-1]) and np.array_equal(fa[0], fb[-1])


def test_video_depth_none_spreads_needles():
    source = NeedleVideo(60, num_frames=101)
    records = [source[i] for i in range(60)]
    frames = {r["needle_frame"] for r in records}
    assert len(frames) > 35 and min(frames) < 15 and max(frames) > 85
    assert all(r["needle_frame"] == round(r["depth"] * 100) for r in records)


@pytest.mark.parametrize("length", [45, 46, 1000, 8192, 32768])
def test_video_for_length(length):
    source = NeedleVideo.for_length(2, length=length, depth=0.5, seed=4)
    assert source.sequence_length <= length < source.sequence_length + source.codes_per_frame + 1
    assert source.depth == 0.5 and source.seed == 4
    assert source[1]["tokens"].shape == (source.sequence_length,)


def test_video_for_length_too_short():
    with pytest.raises(ValueError, match=r"length must be at least 45"):
        NeedleVideo.for_length(2, length=44)


def test_video_other_sizes_are_checked():
    # 16 × 16 frames in 4 × 4 patches still tell the triangle apart; 2 × 2 patches of 8 pixels do not (two colours'
    # triangles quantize alike), nor does a single patch per frame.
    source = NeedleVideo(3, num_frames=4, frame_size=16, quantizer=PatchQuantizer(patch=4))
    assert source.codes_per_frame == 16
    with pytest.raises(ValueError, match=r"frame_size=16 .*two colours' triangles"):
        NeedleVideo(3, num_frames=4, frame_size=16, quantizer=PatchQuantizer(patch=8))
    with pytest.raises(ValueError, match=r"frame_size=8 .*cannot tell a triangle"):
        NeedleVideo(3, num_frames=4, frame_size=8, quantizer=PatchQuantizer(patch=8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=-1, num_frames=4), "num_examples"),
    (dict(num_examples=2, num_frames=0), "num_frames"),
    (dict(num_examples=2, num_frames=4, depth=2.0), "depth"),
    (dict(num_examples=2, num_frames=4, seed=-1), "seed"),
    (dict(num_examples=2, num_frames=4, frame_size=2), "frame_size"),
    (dict(num_examples=2, num_frames=4, frame_size=10), r"frame_size=10 does not fit quantizer"),
])
def test_video_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeedleVideo(**kwargs)


def test_video_bad_index():
    source = NeedleVideo(3, num_frames=4)
    with pytest.raises(IndexError, match="index -1"):
        source[-1]
    with pytest.raises(IndexError, match="index 3"):
        source.render(3)


def test_sources_feed_packed_batches_one_example_a_row():
    import grain

    from data_pipelines import packed_batches

    for source, seq_len in ((NeedleText(4, length=256, seed=1), 256),
                            (NeedleVideo(4, num_frames=40, seed=1), NeedleVideo(4, num_frames=40).sequence_length)):
        batches = packed_batches(grain.MapDataset.source(source), seq_len=seq_len, batch_size=2, pad_id=TOK.pad_id,
                                 overflow="reject")
        rows = [row for batch in batches for row in batch["tokens"]]
        assert len(rows) == 4
        assert sorted(map(tuple, rows)) == sorted(tuple(source[i]["tokens"]) for i in range(4))
