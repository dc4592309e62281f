"""VideoFiles: a PyAV round trip on videos the test writes, sampling, and errors that name the file and line."""

import json
import logging

import av
import numpy as np
import pytest

from data_pipelines import MovingShapes, PatchQuantizer, VideoDecodeError, VideoFiles, video_text_examples


def write_video(path, frames, rate=8):
    """Lossless (FFV1) so decoded pixels can be compared exactly."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def write_manifest(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


@pytest.fixture
def videos(tmp_path):
    source = MovingShapes(3, num_frames=40, size=32, seed=5)
    for i in range(3):
        write_video(tmp_path / f"v{i}.mkv", source[i]["frames"])
    return tmp_path, source


def test_round_trip_uniform_fps_and_clip(videos):
    root, source = videos
    manifest = write_manifest(root / "m.jsonl", [
        {"path": "v0.mkv", "caption": source[0]["caption"]},
        {"path": str(root / "v1.mkv"), "caption": "absolute path"},
        {"path": "v2.mkv", "caption": "a clip", "start": 1.0, "end": 2.0},
    ])
    ds = VideoFiles(manifest, num_frames=40, size=32)
    assert len(ds) == 3
    record = ds[0]
    assert record["caption"] == source[0]["caption"] and record["index"] == 0
    np.testing.assert_array_equal(record["frames"], source[0]["frames"])  # every frame, exactly
    np.testing.assert_array_equal(ds[1]["frames"], source[1]["frames"])
    uniform = VideoFiles(manifest, num_frames=5, size=32)
    np.testing.assert_array_equal(uniform[0]["frames"], source[0]["frames"][[0, 10, 20, 29, 39]])
    at_fps = VideoFiles(manifest, num_frames=4, size=32, fps=2.0)
    np.testing.assert_array_equal(at_fps[0]["frames"], source[0]["frames"][[0, 4, 8, 12]])
    # The clip [1 s, 2 s) at 8 fps is frames 8..15.
    np.testing.assert_array_equal(uniform[2]["frames"], source[2]["frames"][[8, 10, 12, 13, 15]])


def test_resize_and_centre_crop(tmp_path):
    frames = np.zeros((4, 48, 96, 3), np.uint8)
    frames[:, :, :24] = (255, 0, 0)  # the outer quarters are cropped away...
    frames[:, :, 72:] = (0, 0, 255)
    frames[:, :, 24:72] = (0, 255, 0)  # ...the centre half survives
    write_video(tmp_path / "wide.mkv", frames)
    ds = VideoFiles(write_manifest(tmp_path / "m.jsonl", [{"path": "wide.mkv", "caption": "green"}]), num_frames=2,
                    size=16)
    out = ds[0]["frames"]
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    # Scaling filters blend the outermost output columns with the cropped-away colours a little.
    assert np.abs(out[:, :, 1:-1].astype(int) - (0, 255, 0)).max() <= 8
    assert (out[:, :, [0, -1], 1] > 200).all()


def test_bad_files_raise_errors_naming_file_and_line(videos):
    root, _ = videos
    (root / "garbage.mp4").write_bytes(b"not a video" * 100)
    data = (root / "v0.mkv").read_bytes()
    (root / "truncated.mkv").write_bytes(data[: len(data) // 2])
    manifest = write_manifest(root / "m.jsonl", [
        {"path": "v1.mkv", "caption": "fine"},
        {"path": "missing.mkv", "caption": "x"},
        {"path": "garbage.mp4", "caption": "x"},
        {"path": "truncated.mkv", "caption": "x"},
    ])
    ds = VideoFiles(manifest)
    cases = {1: "missing.mkv .*m.jsonl:2\\): file not found", 2: "garbage.mp4 .*m.jsonl:3\\): cannot decode",
             3: "truncated.mkv .*m.jsonl:4\\): truncated"}
    for index, message in cases.items():
        with pytest.raises(VideoDecodeError, match=message):
            ds[index]
    with pytest.raises(VideoDecodeError, match=r"need 9.75 s, the clip has 4.88 s"):
        VideoFiles(manifest, num_frames=40, fps=4.0)[0]


def test_skip_errors_counts_and_reports(videos, caplog):
    root, _ = videos
    manifest = write_manifest(root / "m.jsonl", [{"path": "v0.mkv", "caption": "a"},
                                                 {"path": "missing.mkv", "caption": "b"},
                                                 {"path": "v1.mkv", "caption": "c"}])
    ds = VideoFiles(manifest, num_frames=4, skip_errors=True)
    with caplog.at_level(logging.WARNING):
        examples = video_text_examples(ds, video_tokenizer=PatchQuantizer(), shuffle=False, process_index=0,
                                       process_count=1)
        kept = list(examples.to_iter_dataset())
    assert [e["index"] for e in kept] == [0, 2]
    assert ds.num_skipped == 1 and "missing.mkv" in ds.skipped[1]
    assert "missing.mkv" in caplog.text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"m.jsonl:2: not valid JSON"),
        ('{"path": "v0.mkv"}', r'm.jsonl:2: each line must be an object with string "path" and "caption"'),
        ('{"path": "v0.mkv", "caption": "x", "start": 2, "end": 1}', r"m.jsonl:2: end=1 must be after start=2"),
        ('{"path": "v0.mkv", "caption": "x", "start": "soon"}', r"m.jsonl:2: start and end must be numbers"),
    ],
)
def test_bad_manifest_lines_are_named(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "v0.mkv", "caption": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        VideoFiles(manifest)
