"""The LWM token layout and packing: every token and every boundary kept, masks where the task says."""

import grain
import numpy as np
import pytest

from data_pipelines import ByteTokenizer, PackIterDataset, lwm_sequence, pack

TOK = ByteTokenizer()


def video_codes(frames=3, per_frame=4, seed=0):
    return np.random.default_rng(seed).integers(0, 16, (frames, per_frame))


@pytest.mark.parametrize("task", ["video_to_text", "text_to_video", "both"])
def test_lwm_sequence_layout(task):
    codes, text = video_codes(), "a red square moves left"
    ex = lwm_sequence(codes, TOK.encode(text), TOK, task)
    tokens, vision, loss = ex["tokens"], ex["vision_mask"], ex["loss_mask"]
    assert tokens.dtype == np.int32 and len(tokens) == len(vision) == len(loss)
    v = tokens[vision]
    expected_vision = [TOK.vision_start_id]
    for f, frame in enumerate(codes):
        expected_vision += [*(frame + TOK.vocab_size), TOK.eov_id if f == len(codes) - 1 else TOK.eof_id]
    expected_vision.append(TOK.vision_end_id)
    assert v.tolist() == expected_vision
    assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
    assert TOK.decode(tokens[~vision]) == text
    vision_first = np.flatnonzero(vision)[0] == 1
    assert vision_first == (task != "text_to_video")
    trained = {"video_to_text": ~vision, "text_to_video": vision.copy(), "both": np.ones_like(vision)}[task]
    trained[0], trained[-1] = False, True
    np.testing.assert_array_equal(loss, trained)


def test_lwm_sequence_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        lwm_sequence(video_codes(), TOK.encode("x"), TOK, "captioning")
    with pytest.raises(ValueError, match=r"codes must have shape \[frames >= 1, codes_per_frame\]"):
        lwm_sequence(np.zeros(5, int), TOK.encode("x"), TOK, "both")


def random_examples(count, max_len, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(1, max_len + 1))
        out.append({"tokens": rng.integers(0, 256, n).astype(np.int32), "loss_mask": rng.random(n) < 0.5,
                    "vision_mask": np.full(n, i % 2 == 0)})
    return out


def unpack(rows):
    """The segments of packed rows, in order, as dicts of arrays."""
    segments = []
    for row in rows:
        for s in range(1, row["segment_ids"].max() + 1):
            where = row["segment_ids"] == s
            assert where.any() and np.all(np.diff(np.flatnonzero(where)) == 1), "a segment is one contiguous run"
            np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
            segments.append({k: row[k][where] for k in ("tokens", "loss_mask", "vision_mask")})
        pad = row["segment_ids"] == 0
        assert (row["tokens"][pad] == TOK.pad_id).all() and not row["loss_mask"][pad].any()
        assert (row["positions"][pad] == 0).all()
    return segments


@pytest.mark.parametrize("seq_len", [16, 64, 100])
def test_packing_keeps_every_token_and_boundary(seq_len):
    examples = random_examples(200, 40)
    rows, stats = pack(examples, seq_len, TOK.pad_id)
    assert all(len(r["tokens"]) == seq_len for r in rows)
    pieces = unpack(rows)
    # Split examples come back as consecutive seq_len pieces; rejoin them in order.
    rejoined, i = [], 0
    for ex in examples:
        n = len(ex["tokens"])
        count = -(-n // seq_len)
        rejoined.append({k: np.concatenate([p[k] for p in pieces[i : i + count]]) for k in ex})
        i += count
    assert i == len(pieces)
    for got, ex in zip(rejoined, examples, strict=True):
        for k in ex:
            np.testing.assert_array_equal(got[k], ex[k])
    total = sum(len(e["tokens"]) for e in examples)
    assert stats.tokens == total and stats.rows == len(rows) and stats.padding == len(rows) * seq_len - total
    assert stats.split == sum(len(e["tokens"]) > seq_len for e in examples) and stats.rejected == 0


def test_packing_rejects_and_counts_long_examples():
    examples = random_examples(100, 40, seed=1)
    rows, stats = pack(examples, 24, TOK.pad_id, overflow="reject")
    kept = [e for e in examples if len(e["tokens"]) <= 24]
    assert stats.rejected == len(examples) - len(kept) > 0 and stats.split == 0 and stats.examples == 100
    for got, ex in zip(unpack(rows), kept, strict=True):
        np.testing.assert_array_equal(got["tokens"], ex["tokens"])


def test_packer_errors():
    with pytest.raises(ValueError, match="overflow must be one of"):
        PackIterDataset(grain.MapDataset.range(3).to_iter_dataset(), 8, TOK.pad_id, overflow="truncate")
    with pytest.raises(ValueError, match="must have one length"):
        pack([{"tokens": np.zeros(3), "loss_mask": np.zeros(2), "vision_mask": np.zeros(3)}], 8, TOK.pad_id)


@pytest.mark.parametrize("overflow", ["split", "reject"])
def test_packing_resumes_exactly(overflow):
    """Restoring the state saved after k rows gives the same following rows and the same counts."""
    examples = random_examples(120, 40, seed=2)
    dataset = PackIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), 24, TOK.pad_id, overflow=overflow)
    full = list(dataset)
    for k in (0, 1, 7, 30, len(full) - 1):
        it = iter(dataset)
        for _ in range(k):
            next(it)
        state = it.get_state()
        restored = iter(dataset)
        restored.set_state(state)
        # A checkpoint taken right after a restore, before any row, is the restored position.
        assert restored.get_state() == state
        again = iter(dataset)
        again.set_state(restored.get_state())
        restored = again
        rest = list(restored)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:], strict=True):
            for key in b:
                np.testing.assert_array_equal(a[key], b[key])
        complete = iter(dataset)
        list(complete)
        assert restored.stats == complete.stats


def grain_first_fit(examples, seq_len, keys=("tokens", "loss_mask", "vision_mask"), **kwargs):
    import grain.experimental

    return grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(**kwargs), length_struct={k: seq_len for k in keys},
        num_packing_bins=1, shuffle_bins=False, padding_struct={k: TOK.pad_id if k == "tokens" else 0 for k in keys})


def test_grain_first_fit_with_one_bin_packs_as_ours():
    """On examples no longer than a row, grain's first-fit with one bin makes our rows, array for array (its
    per-key segment ids and positions, equal for every key, renamed): a switch would keep the pinned outputs."""
    examples = random_examples(200, 24, seed=3)
    ours, _ = pack(examples, 24, TOK.pad_id)
    theirs = list(grain_first_fit(examples, 24))
    assert len(theirs) == len(ours) > 0
    for a, b in zip(theirs, ours, strict=True):
        for k in ("tokens", "loss_mask", "vision_mask"):
            np.testing.assert_array_equal(a[f"{k}_segment_ids"], b["segment_ids"])
            np.testing.assert_array_equal(a[f"{k}_positions"], b["positions"])
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype


def test_grain_first_fit_lacks_what_the_pipeline_needs():
    """The gaps `PackIterDataset`'s docstring names as the reason to keep it (grain 0.2.18). If a grain upgrade
    closes one, this fails: reconsider switching to grain's packer."""
    long = {"tokens": np.arange(1, 11, dtype=np.int32), "loss_mask": np.ones(10, bool),
            "vision_mask": np.zeros(10, bool)}
    # An example longer than the row (our default overflow="split"; "reject" drops it, counted).
    with pytest.raises(ValueError, match="must be truncated to max length"):
        list(grain_first_fit([long], 8))
    rows, stats = pack([long], 8, TOK.pad_id)
    assert [r["segment_ids"].tolist() for r in rows] == [[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]] and stats.split == 1
    # A record a source skipped (None), e.g. an undecodable video.
    short = {"tokens": np.array([1, 2, 3], np.int32), "loss_mask": np.ones(3, bool), "vision_mask": np.ones(3, bool)}
    with pytest.raises(TypeError):
        list(grain_first_fit([short, None], 8, allow_nones=True))
    assert pack([short, None], 8, TOK.pad_id)[1].skipped == 1
    # Per-token arrays of different lengths are packed each on its own, so later masks shift silently.
    bad = {"tokens": np.array([1, 2, 3], np.int32), "loss_mask": np.array([True, True])}
    row = next(iter(grain_first_fit([bad, {"tokens": np.array([4], np.int32), "loss_mask": np.array([False])}], 8,
                                    keys=("tokens", "loss_mask"))))
    assert row["loss_mask"][:3].tolist() == [True, True, False]  # token 3's mask is the next example's
    with pytest.raises(ValueError, match="must have one length"):
        pack([bad], 8, TOK.pad_id, keys=("tokens", "loss_mask"))
    # No shared "segment_ids"/"positions", and no counts in the state for `packing_stats`.
    iterator = iter(grain_first_fit([short], 8))
    row = next(iterator)
    assert "segment_ids" not in row and "positions" not in row
    assert set(iterator.get_state()) == {"parent", "next_row", "counter"}
