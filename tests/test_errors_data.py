"""data_pipelines on bad input and edge cases: a clear error naming the argument, or an exact, correct result."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import absl.flags
import av
import grain
import numpy as np
import pytest

from data_pipelines import (
    COLORS,
    MOTIONS,
    SHAPES,
    ByteTokenizer,
    MovingShapes,
    PackedShards,
    PackIterDataset,
    PackStats,
    PatchQuantizer,
    ToRingLayout,
    VideoDecodeError,
    VideoFiles,
    caption,
    global_packed_batches,
    lwm_sequence,
    pack,
    packed_batches,
    packing_stats,
    parse_caption,
    score_captions,
    shard_batches,
    video_text_examples,
    write_packed_shards,
)

TOK = ByteTokenizer()
ROOT = Path(__file__).resolve().parents[1]


# Captions: the article follows the colour.


def test_caption_article_follows_the_colour():
    assert [caption([0], [c], [4]) for c in range(len(COLORS))] == [
        "a red circle stays still", "a green circle stays still", "a blue circle stays still",
        "a yellow circle stays still", "a cyan circle stays still", "a magenta circle stays still",
        "a white circle stays still", "an orange circle stays still",
    ]
    assert caption([2, 1], [7, 0], [0, 3]) == "an orange triangle moves left and a red square moves down"


def test_parse_caption_reads_every_phrase_caption_writes_and_the_old_article():
    for s in range(len(SHAPES)):
        for c in range(len(COLORS)):
            for m in range(len(MOTIONS)):
                assert parse_caption(caption([s], [c], [m])) == [(s, c, m)]
    # Captions written before the article followed the colour still read.
    assert parse_caption("a orange square moves up and an orange circle moves left") == [(1, 7, 2), (0, 7, 0)]
    source = MovingShapes(40, seed=0)
    orange = next(source[i] for i in range(len(source)) if 7 in source[i]["color"].tolist())
    assert "an orange" in orange["caption"] and "a orange" not in orange["caption"]
    assert score_captions([orange["caption"]], [orange])["exact"] == 1.0


def test_caption_refuses_indices_outside_the_tables():
    with pytest.raises(ValueError, match=r"color indices must lie in \[0, 8\), got 8"):
        caption([0], [8], [0])
    with pytest.raises(ValueError, match=r"motion indices must lie in \[0, 5\), got -1"):
        caption([0], [1], [-1])
    with pytest.raises(ValueError, match="shape, color and motion must have one length, got 2, 1, 1"):
        caption([0, 1], [1], [0])
    assert caption([-1], [-1], [-1]) == ""


def test_score_captions_of_a_video_without_shapes():
    empty = {"num_shapes": 0, "shape": np.full(2, -1), "color": np.full(2, -1), "motion": np.full(2, -1)}
    assert score_captions([""], [empty]) == {"shape": 1.0, "color": 1.0, "motion": 1.0, "exact": 1.0}
    assert score_captions(["a red circle moves up"], [empty]) == {"shape": 0.0, "color": 0.0, "motion": 0.0,
                                                                  "exact": 0.0}
    with pytest.raises(ValueError, match=r"records\[0\]: num_shapes must lie in \[0, 2\].*got 3"):
        score_captions([""], [{**empty, "num_shapes": 3}])


# Packing statistics through a chain of packers.


def packing_example(n):
    return {"tokens": np.arange(1, n + 1, dtype=np.int32), "loss_mask": np.ones(n, bool),
            "vision_mask": np.zeros(n, bool)}


def test_packing_stats_counts_a_packer_behind_another_packer():
    inner = PackIterDataset(grain.MapDataset.source([packing_example(n) for n in (3, 5, 2)]).to_iter_dataset(), 4,
                            TOK.pad_id)
    # The inner packer's rows (4 tokens each) packed again into rows of 8.
    outer = iter(PackIterDataset(inner, 8, TOK.pad_id))
    assert len(list(outer)) == 2
    inner_stats = PackStats(examples=3, tokens=10, split=1, rows=3, padding=2)
    outer_stats = PackStats(examples=3, tokens=12, rows=2, padding=4)
    assert outer.stats == outer_stats
    assert packing_stats(outer) == PackStats(examples=6, tokens=22, split=1, rows=5, padding=6)
    assert inner_stats.rows + outer_stats.rows == packing_stats(outer).rows


def test_packers_count_the_records_a_source_skipped():
    rows, stats = pack([packing_example(3), None, None, packing_example(2)], 8, TOK.pad_id)
    assert [r["tokens"].tolist() for r in rows] == [[1, 2, 3, 1, 2] + [TOK.pad_id] * 3]
    assert stats == PackStats(examples=2, tokens=5, rows=1, padding=3, skipped=2)


# Shards.


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rows_per_shard": 0}, ValueError, "rows_per_shard must be positive, got 0"),
        ({"rows_per_shard": -1}, ValueError, "rows_per_shard must be positive, got -1"),
        ({"prefix": ""}, ValueError, "prefix must be a non-empty file name without a path separator, got ''"),
        ({"prefix": "a/b"}, ValueError, "prefix must be a non-empty file name without a path separator, got 'a/b'"),
    ],
)
def test_write_packed_shards_refuses_bad_arguments_before_writing(tmp_path, kwargs, error, message):
    rows = [{"tokens": np.full(4, i, np.int32)} for i in range(3)]
    with pytest.raises(error, match=message):
        write_packed_shards(rows, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_write_packed_shards_refuses_bad_rows_and_directories(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="directory must be a folder, got the existing file .*file'"):
        write_packed_shards([{"tokens": np.zeros(4)}], tmp_path / "file")
    with pytest.raises(TypeError, match=r"rows\[1\] must be a mapping of name -> array, got ndarray"):
        write_packed_shards((row for row in [{"tokens": np.zeros(4)}, np.zeros(4)]), tmp_path / "out")
    paths = write_packed_shards([{"tokens": np.zeros(4)}], tmp_path / "ok", rows_per_shard=1)
    with pytest.raises(TypeError, match="paths must be a sequence of shard files, got the single path"):
        PackedShards(paths[0])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        shard_batches(PackedShards(paths), batch_size=0)


# VideoFiles.


def write_video(path, num_frames, *, rate=8, audio_seconds=None, codec="ffv1", audio_codec="flac"):
    """A 32 x 32 video of `num_frames` frames; with `audio_seconds`, also a silent audio stream that long."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=rate)
        video.width = video.height = 32
        video.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        audio = out.add_stream(audio_codec, rate=8000, layout="mono") if audio_seconds else None
        for i in range(num_frames):
            frame = np.full((32, 32, 3), 4 * i, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        if audio is not None:
            dtype = np.int16 if audio.format.name.startswith("s16") else np.float32
            for start in range(0, int(audio_seconds * 8000), 800):
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype), format=audio.format.name, layout="mono")
                chunk.sample_rate, chunk.pts = 8000, start
                out.mux(audio.encode(chunk))
            out.mux(audio.encode())
    return path


def write_manifest(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fps": 0.0}, "fps must be None or a positive number of frames per second, got 0.0"),
        ({"fps": -2.0}, "fps must be None or a positive number of frames per second, got -2.0"),
        ({"fps": float("nan")}, "fps must be None or a positive number of frames per second, got nan"),
        ({"num_frames": 0}, "num_frames must be a positive int, got 0"),
        ({"size": -8}, "size must be a positive int, got -8"),
        ({"size": 0}, "size must be a positive int, got 0"),
    ],
)
def test_video_files_refuses_bad_arguments(tmp_path, kwargs, message):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "v.mkv", "caption": "x"}])
    with pytest.raises(ValueError, match=message):
        VideoFiles(manifest, **kwargs)


def test_video_files_refuses_more_frames_than_the_clip_has(tmp_path):
    write_video(tmp_path / "short.mkv", 8)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "short.mkv", "caption": "x"},
                                                     {"path": "short.mkv", "caption": "x", "start": 0.5}])
    message = r"short.mkv \(manifest .*m.jsonl:1\): num_frames=64 frames asked for, but the video has 8 frames in "
    with pytest.raises(VideoDecodeError, match=message + r"\[0 s, end\)"):
        VideoFiles(manifest, num_frames=64)[0]
    with pytest.raises(VideoDecodeError, match=r"m.jsonl:2\): num_frames=8 frames asked for, but the video has 4 "
                                               r"frames in \[0.5 s, end\)"):
        VideoFiles(manifest, num_frames=8)[1]
    assert VideoFiles(manifest, num_frames=8)[0]["frames"].shape == (8, 32, 32, 3)  # exactly enough is fine
    skipping = VideoFiles(manifest, num_frames=64, skip_errors=True)
    assert skipping[0] is None and skipping.num_skipped == 1
    assert "num_frames=64 frames asked for, but the video has 8 frames" in skipping.skipped[0]


@pytest.mark.parametrize(("name", "codec", "audio_codec"), [("v.mkv", "ffv1", "flac"), ("v.mp4", "mpeg4", "aac")])
def test_video_whose_audio_outlasts_the_picture_is_complete(tmp_path, name, codec, audio_codec):
    # 40 frames at 8 fps end at 5 s; the audio runs 0.5 s (4 frames) longer, so the container says 5.5 s.
    path = write_video(tmp_path / name, 40, audio_seconds=5.5, codec=codec, audio_codec=audio_codec)
    with av.open(str(path)) as container:
        assert container.duration / 1e6 == pytest.approx(5.5)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": name, "caption": "x"}])
    frames = VideoFiles(manifest, num_frames=40)[0]["frames"]
    assert frames.shape == (40, 32, 32, 3)
    if codec == "ffv1":  # lossless: the frames are the ones written, in order
        np.testing.assert_array_equal(frames[:, 0, 0, 0], 4 * np.arange(40))


def test_truncated_video_with_audio_is_still_truncated(tmp_path):
    data = write_video(tmp_path / "v.mkv", 40, audio_seconds=5.5).read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "cut.mkv", "caption": "x"}])
    with pytest.raises(VideoDecodeError, match=r"cut.mkv .*truncated: frames stop at .* s but the file declares"):
        VideoFiles(manifest, num_frames=4)[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_videos_are_counted_where_the_batches_are_read(tmp_path, num_workers):
    """Skips made in grain's worker processes reach the consumer through the packers' state."""
    if num_workers:
        absl.flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    write_video(tmp_path / "v.mkv", 4)
    bad = {0, 1, 4, 5}  # early in both workers' slices (workers take every other example)
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"path": "missing.mkv" if i in bad else "v.mkv", "caption": f"video {i}"} for i in range(12)])
    videos = VideoFiles(manifest, num_frames=4, size=16, skip_errors=True)
    examples = video_text_examples(videos, video_tokenizer=PatchQuantizer(), shuffle=False, process_index=0,
                                   process_count=1)
    dataset = packed_batches(examples, seq_len=32, batch_size=1, pad_id=TOK.pad_id, num_workers=num_workers)
    iterator = iter(dataset)
    batches = list(iterator)
    stats = packing_stats(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    restored = iter(dataset)
    restored.set_state(state)
    restored_stats = packing_stats(restored)
    for i in (iterator, restored):
        i.close()
    assert len(batches) == 8 and stats.examples == 8
    assert stats.skipped == restored_stats.skipped == len(bad)
    # The count in `videos` is only this process's: the workers decoded in their own copies.
    assert videos.num_skipped == (0 if num_workers else len(bad))


# grain's shared memory at exit.


def test_worker_batches_leak_no_shared_memory_at_exit():
    script = textwrap.dedent("""
        import absl.flags
        from data_pipelines import ByteTokenizer, MovingShapes, PatchQuantizer, packed_batches, video_text_examples

        absl.flags.FLAGS.mark_as_parsed()
        if __name__ == "__main__":
            examples = video_text_examples(MovingShapes(32, num_frames=2, size=16), video_tokenizer=PatchQuantizer(),
                                           process_index=0, process_count=1)
            iterator = iter(packed_batches(examples, seq_len=128, batch_size=2, pad_id=ByteTokenizer.pad_id,
                                           num_workers=2))
            kept = [next(iterator) for _ in range(3)]  # batches still referenced when the interpreter exits
            iterator.close()
            print(type(kept[0]["tokens"]).__name__, kept[0]["tokens"].shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ndarray (2, 128)"
    assert "leaked" not in done.stderr, done.stderr


# Token ids against the model's vocabulary.


class OverflowingQuantizer:
    """A video tokenizer whose codes exceed its codebook of 64: a realistic bug the pipeline must catch."""

    codebook_size = 64

    def __call__(self, frames):
        codes = PatchQuantizer()(frames)
        codes[-1, -1] = 200
        return codes


def test_video_text_examples_checks_ids_against_the_vocabulary():
    source = MovingShapes(4, num_frames=2, size=16)
    vocab = TOK.vocab_size + 64
    ok = video_text_examples(source, video_tokenizer=PatchQuantizer(), process_index=0, process_count=1,
                             vocab_size=vocab, shuffle=False)
    assert int(ok[0]["tokens"].max()) < vocab
    bad = video_text_examples(source, video_tokenizer=OverflowingQuantizer(), process_index=0, process_count=1,
                              vocab_size=vocab, shuffle=False)
    message = (r"example 2: token id 463 is outside the vocabulary \[0, vocab_size=327\) \(video code 200: the "
               r"codebook holds 64 codes after the 263 text ids\)")
    with pytest.raises(ValueError, match=message):
        bad[2]
    with pytest.raises(ValueError, match=r"vocab_size must be an int > tokenizer.vocab_size=263 .*got 263"):
        video_text_examples(source, video_tokenizer=PatchQuantizer(), vocab_size=263)


def test_packed_batches_check_ids_against_the_vocabulary():
    examples = [{**packing_example(5), "index": 10 + i} for i in range(4)]
    examples[2]["tokens"] = np.array([1, 2, 300, 4, 5], np.int32)
    examples[3]["tokens"] = np.array([1, -1, 3, 4, 5], np.int32)
    ds = grain.MapDataset.source(examples)
    with pytest.raises(ValueError, match=r"example 2 \(index 12\): token id 300 is outside the vocabulary "
                                         r"\[0, vocab_size=263\)"):
        list(packed_batches(ds, seq_len=8, batch_size=1, pad_id=TOK.pad_id, vocab_size=263))
    with pytest.raises(ValueError, match=r"example 0 \(index 13\): token id -1 is outside"):
        list(packed_batches(ds[3:], seq_len=8, batch_size=1, pad_id=TOK.pad_id, vocab_size=263))
    with pytest.raises(ValueError, match=r"example 2 \(index 12\): token id 300 is outside"):
        list(global_packed_batches(ds, seq_len=8, batch_size=2, pad_id=TOK.pad_id, vocab_size=263))
    assert len(list(packed_batches(ds[:2], seq_len=8, batch_size=1, pad_id=TOK.pad_id, vocab_size=263))) == 2


# Every size argument: refused with the argument's name.


def examples_ds():
    return grain.MapDataset.source([packing_example(5)])


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: MovingShapes(4, num_frames=0), ValueError, "num_frames must be >= 1, got 0"),
        (lambda: MovingShapes(4, max_shapes=0), ValueError, "max_shapes must be >= 1, got 0"),
        (lambda: MovingShapes(-1), ValueError, "num_examples must be >= 0, got -1"),
        (lambda: MovingShapes(4, seed=-1), ValueError, "seed must be >= 0, got -1"),
        (lambda: PatchQuantizer(patch=0), ValueError, "patch must be a positive int, got 0"),
        (lambda: PatchQuantizer(levels=0), ValueError, r"levels must be an int in \[1, 256\].*got 0"),
        (lambda: PatchQuantizer(levels=300), ValueError, r"levels must be an int in \[1, 256\].*got 300"),
        (lambda: PatchQuantizer()(np.zeros((16, 16, 3), np.uint8)), ValueError,
         r"frames must have shape \[T, H, W, 3\] \(RGB\), got \(16, 16, 3\)"),
        (lambda: TOK.decode(np.array([97.0, 98.5])), ValueError, "ids must be a 1-D array of integers, got shape"),
        (lambda: TOK.token_name(263), ValueError, r"token_id must be an int in \[0, 263\), got 263"),
        (lambda: TOK.token_name(-1), ValueError, r"token_id must be an int in \[0, 263\), got -1"),
        (lambda: lwm_sequence(np.ones((2, 2)) * 1.5, TOK.encode("x"), TOK, "both"), ValueError,
         "codes must be integers, got dtype float64"),
        (lambda: lwm_sequence(np.ones((2, 2), int), np.array([300]), TOK, "both"), ValueError,
         r"caption_ids must lie in \[0, tokenizer.vocab_size=263\), got values in \[300, 300\]"),
        (lambda: PackIterDataset(examples_ds().to_iter_dataset(), 8, TOK.pad_id, keys=()), ValueError,
         r"keys must be distinct key names, at least one, got \(\)"),
        (lambda: packed_batches(examples_ds(), seq_len=0, batch_size=1, pad_id=0), ValueError,
         "seq_len must be a positive int, got 0"),
        (lambda: packed_batches(examples_ds(), seq_len=8, batch_size=0, pad_id=0), ValueError,
         "batch_size must be a positive int, got 0"),
        (lambda: packed_batches(examples_ds(), seq_len=8, batch_size=1, pad_id=0, layout="zigzag", ring_size=0),
         ValueError, "ring_size must be a positive int, got 0"),
        (lambda: packed_batches(examples_ds(), seq_len=8, batch_size=1, pad_id=0, ring_size=4), ValueError,
         "ring_size=4 needs a layout"),
        (lambda: packed_batches(examples_ds(), seq_len=100, batch_size=1, pad_id=0, layout="zigzag", ring_size=4),
         ValueError, r"seq_len=100 must be divisible by 8 \(2 × 4 shards\) for layout='zigzag'"),
        (lambda: packed_batches(examples_ds(), seq_len=8, batch_size=1, pad_id=0, layout="ring", ring_size=2),
         ValueError, "layout must be one of"),
        (lambda: packed_batches(examples_ds(), seq_len=8, batch_size=1, pad_id=0, num_workers=-1), ValueError,
         "num_workers must be a non-negative int, got -1"),
        (lambda: packed_batches(examples_ds(), seq_len=8, batch_size=1, pad_id=0, vocab_size=0), ValueError,
         "vocab_size must be a positive int, got 0"),
        (lambda: global_packed_batches(examples_ds(), seq_len=8, batch_size=0, pad_id=0), ValueError,
         "batch_size must be a positive int, got 0"),
        (lambda: global_packed_batches(examples_ds(), seq_len=12, batch_size=1, pad_id=0, layout="striped",
                                       ring_size=8), ValueError, "seq_len=12 must be divisible by 8"),
        (lambda: video_text_examples([], video_tokenizer=None, num_epochs=0), ValueError,
         "num_epochs must be a positive int, got 0"),
        (lambda: video_text_examples([], video_tokenizer=None, process_index=0, process_count=0), ValueError,
         "process_count must be a positive int, got 0"),
        (lambda: ToRingLayout("zigzag", 0), ValueError, "num_shards must be a positive int, got 0"),
    ],
)
def test_size_arguments_are_refused_by_name(build, error, message):
    with pytest.raises(error, match=message):
        build()
