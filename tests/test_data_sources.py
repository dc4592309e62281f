"""MovingShapes (deterministic, captions true to the pixels) and the byte tokenizer (exact round trip)."""

import numpy as np
import pytest

from data_pipelines import COLORS, MOTIONS, SHAPES, ByteTokenizer, MovingShapes, Tokenizer, caption


def test_same_seed_and_index_give_the_same_example():
    a, b = MovingShapes(100, seed=3), MovingShapes(100, seed=3)
    for i in (0, 17, 99):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"]
        np.testing.assert_array_equal(x["frames"], y["frames"])
    assert not np.array_equal(a[5]["frames"], MovingShapes(100, seed=4)[5]["frames"])
    assert len({a[i]["caption"] for i in range(100)}) > 50


def test_records_hold_what_the_caption_says():
    source = MovingShapes(300, num_frames=6, size=24, max_shapes=3)
    seen = {"shape": set(), "color": set(), "motion": set(), "count": set()}
    for i in range(len(source)):
        ex = source[i]
        n = ex["num_shapes"]
        assert ex["frames"].shape == (6, 24, 24, 3) and ex["frames"].dtype == np.uint8
        assert ex["caption"] == caption(ex["shape"], ex["color"], ex["motion"])
        assert (ex["shape"][n:] == -1).all() and (ex["shape"][:n] >= 0).all()
        words = ex["caption"].split()
        for s, c in zip(ex["shape"][:n], ex["color"][:n], strict=True):
            assert f"{list(COLORS)[c]} {SHAPES[s]}" in " ".join(words)
        seen["shape"].update(ex["shape"][:n].tolist())
        seen["color"].update(ex["color"][:n].tolist())
        seen["motion"].update(ex["motion"][:n].tolist())
        seen["count"].add(n)
    assert seen == {"shape": set(range(3)), "color": set(range(8)), "motion": set(range(5)), "count": {1, 2, 3}}


def test_single_shapes_move_the_way_the_label_says():
    """Centroid of the shape's colour moves along its labelled direction (and stays put when still)."""
    source = MovingShapes(200, num_frames=8, size=32, max_shapes=1, seed=1)
    for i in range(len(source)):
        ex = source[i]
        color = np.array(list(COLORS.values())[ex["color"][0]], np.uint8)
        pixels = (ex["frames"] == color).all(-1)
        assert pixels.any(axis=(1, 2)).all(), "the shape is visible in every frame"
        rows, cols = np.arange(32)[:, None], np.arange(32)[None, :]
        centroid = np.array([[(p * rows).sum() / p.sum(), (p * cols).sum() / p.sum()] for p in pixels])
        moved = centroid[-1] - centroid[0]
        direction = np.array(list(MOTIONS.values())[ex["motion"][0]])
        if not direction.any():
            assert np.abs(moved).max() < 1.0
        else:
            along, across = moved @ direction, moved @ direction[::-1]
            assert along > 4 and abs(across) < 1.0


def test_bad_arguments():
    with pytest.raises(IndexError, match="index 5 out of range for MovingShapes of 5 examples"):
        MovingShapes(5)[5]
    with pytest.raises(ValueError, match="size must be at least 12"):
        MovingShapes(5, size=8)


@pytest.mark.parametrize("text", ["", "a red square moves left", "naïve café — 東京 🎥", "\x00\n\t"])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and (ids < 256).all()
    assert tok.decode(ids) == text
    specials = [tok.bos_id, *ids, tok.vision_start_id, tok.eof_id, tok.eov_id, tok.vision_end_id, tok.eos_id,
                tok.pad_id]
    assert tok.decode(np.array(specials)) == text


def test_byte_tokenizer_specials_and_protocol():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    special = [tok.pad_id, tok.bos_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id, tok.eof_id, tok.eov_id]
    assert len(set(special)) == 7 and min(special) == 256 and max(special) == tok.vocab_size - 1
    assert [tok.token_name(i) for i in (65, tok.vision_start_id, tok.eov_id)] == ["<0x41>", "<vision>", "<eov>"]
    assert tok.decode(np.array([0xE6, 0x9D])) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 263\)"):
        tok.decode(np.array([300]))
