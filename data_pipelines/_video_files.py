"""`VideoFiles`: a grain source of real videos and captions, listed in a JSONL manifest and decoded with PyAV."""

import json
import logging
import math
import os
import re
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class VideoDecodeError(ValueError):
    """A manifest entry whose video is missing, truncated or undecodable; the message names file and line.

    Raised by [`VideoFiles`][data_pipelines.VideoFiles] when a record is read (not when the source
    is built). A subclass of `ValueError`.
    """


class VideoFiles:
    """Videos with captions, from a JSONL manifest of `{"path", "caption"}` (optional `"start"`, `"end"` in seconds).

    A grain random-access source: record `i` decodes manifest entry `i` into `num_frames` uint8 RGB
    frames of `size × size` pixels (scaled so the short side is `size`, then centre-cropped),
    sampled uniformly over `[start, end)` or, with `fps`, at that rate from `start`. Relative paths
    are relative to the manifest's folder. Records are dicts with `"frames"`, `"caption"`,
    `"index"` and `"path"`, like [`MovingShapes`][data_pipelines.MovingShapes] without labels.
    Decoding uses PyAV (`av`), imported on the first read. The arguments are kept as the
    attributes `manifest` (a `str`), `num_frames`, `size`, `fps` and `skip_errors`.

    **Errors:** a malformed manifest line raises `ValueError` when the source is built, naming the
    manifest and line. A missing, truncated or undecodable video raises
    [`VideoDecodeError`][data_pipelines.VideoDecodeError] naming the file and its manifest line; with
    `skip_errors=True` the record is `None` instead (grain drops it), a warning names the file, and
    `skipped` maps each skipped index to its message (`num_skipped` counts them): never a silent drop.

    `skipped` lives in the process that decoded: grain worker processes (`mp_prefetch`, e.g.
    [`packed_batches`][data_pipelines.packed_batches] with `num_workers > 0`) fill their own
    copies. The packers of [`packed_batches`][data_pipelines.packed_batches] and
    [`global_packed_batches`][data_pipelines.global_packed_batches] count the skipped records in
    their state, so `packing_stats(iterator).skipped` is the total over every worker, and survives
    a checkpoint; the warnings (from the workers' processes too) name the files.
    """

    def __init__(
        self, manifest: str | os.PathLike, *, num_frames: int = 8, size: int = 32, fps: float | None = None,
        skip_errors: bool = False,
    ):
        """**Arguments:**

        - `manifest`: the JSONL file, one object per line: `"path"` and `"caption"` (strings),
          optionally `"start"` and `"end"` (seconds; `end` after `start`). Blank lines are skipped.
        - `num_frames`: frames per record (keyword only), default 8, positive.
        - `size`: height and width of the frames in pixels (keyword only), default 32, positive.
        - `fps`: `None` (default) samples `num_frames` distinct frames evenly over the clip (a clip
          with fewer frames is an error, not repeated frames); a positive rate samples the frames
          nearest to `start + k / fps`, `k < num_frames`, so a rate above the video's own repeats
          frames, as any frame-rate conversion does (keyword only).
        - `skip_errors`: `False` (default) raises [`VideoDecodeError`][data_pipelines.VideoDecodeError]
          on a bad video; `True` returns `None` for it and records it in `skipped` (keyword only).

        **Raises:**

        `ValueError` naming the argument if `num_frames` or `size` is not a positive int or `fps` is
        not `None` or a positive finite number (`TypeError` for a non-bool `skip_errors`);
        `ValueError` naming the manifest and line for a line that is not valid JSON, lacks a string
        `"path"` or `"caption"`, has non-numeric `"start"`/`"end"`, or `end <= start`; `OSError`
        (e.g. `FileNotFoundError`) if the manifest cannot be read. Videos are not opened here.
        """
        for name, value in (("num_frames", num_frames), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float | np.integer | np.floating)
                                or not math.isfinite(fps) or fps <= 0):
            raise ValueError(f"fps must be None or a positive number of frames per second, got {fps!r}")
        if not isinstance(skip_errors, bool):
            raise TypeError(f"skip_errors must be a bool, got {type(skip_errors).__name__} {skip_errors!r}")
        self.manifest = os.fspath(manifest)
        self.num_frames = num_frames
        self.size = size
        self.fps = fps
        self.skip_errors = skip_errors
        self.skipped: dict[int, str] = {}
        self._entries = self._read_manifest()

    def _read_manifest(self) -> list[dict[str, Any]]:
        root = os.path.dirname(os.path.abspath(self.manifest))
        entries = []
        with open(self.manifest, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.manifest}:{line_number}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(
                        entry.get("caption"), str):
                    raise ValueError(f'{where}: each line must be an object with string "path" and "caption"')
                try:
                    start = float(entry.get("start", 0.0))
                    end = None if entry.get("end") is None else float(entry["end"])
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: start and end must be numbers of seconds") from None
                if end is not None and end <= start:
                    raise ValueError(f"{where}: end={end:g} must be after start={start:g}")
                path = entry["path"] if os.path.isabs(entry["path"]) else os.path.join(root, entry["path"])
                entries.append({"path": path, "caption": entry["caption"], "start": start,
                                "end": end, "line": line_number})
        return entries

    @property
    def num_skipped(self) -> int:
        """How many records this object has skipped so far (`len(skipped)`), with `skip_errors=True`.

        Counted in the process that read the records: records read by grain worker processes are
        counted in the workers' copies; `packing_stats(iterator).skipped` of a packed pipeline
        counts them all (see the class's docstring).
        """
        return len(self.skipped)

    def __len__(self) -> int:
        """The number of manifest entries.

        **Returns:**

        The number of videos in the manifest (skipped ones included).
        """
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """Decode manifest entry `index`.

        **Arguments:**

        - `index`: the entry's position in the manifest, in `[0, len(self))` (blank lines not counted).

        **Returns:**

        A dict with the keys `"frames"` (uint8 `[num_frames, size, size, 3]`, RGB), `"caption"`
        (str), `"index"` (int) and `"path"` (the video's path, resolved against the manifest's
        folder); or `None` when the video cannot be decoded and `skip_errors` is set.

        **Raises:**

        [`VideoDecodeError`][data_pipelines.VideoDecodeError] when the video is missing, has no
        video stream, is truncated, cannot be decoded, has no frames in `[start, end)`, has fewer
        than `num_frames` frames there (without `fps`), or is too short for `num_frames` at `fps`,
        unless `skip_errors` is set.
        """
        entry = self._entries[index]
        try:
            frames = self._decode(entry)
        except VideoDecodeError as e:
            if not self.skip_errors:
                raise
            self.skipped[int(index)] = str(e)
            logger.warning("skipping a video: %s", e)
            return None
        return {"frames": frames, "caption": entry["caption"], "index": int(index), "path": entry["path"]}

    def _decode(self, entry: dict[str, Any]) -> np.ndarray:
        import av  # a heavy import, needed only when real video is read

        where = f"{entry['path']} (manifest {self.manifest}:{entry['line']})"
        if not os.path.exists(entry["path"]):
            raise VideoDecodeError(f"{where}: file not found")
        frames, times = [], []
        try:
            with av.open(entry["path"]) as container:
                if not container.streams.video:
                    raise VideoDecodeError(f"{where}: no video stream")
                for frame in container.decode(video=0):
                    t = float(frame.time or 0.0)
                    if t < entry["start"]:
                        continue
                    if entry["end"] is not None and t >= entry["end"]:
                        break
                    frames.append(frame)
                    times.append(t)
                self._check_complete(container, times, entry, where)
                chosen = self._sample(times, entry, where)
                return np.stack([self._resize(frames[i]) for i in chosen])
        except (av.FFmpegError, OSError) as e:
            raise VideoDecodeError(f"{where}: cannot decode ({type(e).__name__}: {e})") from None

    @staticmethod
    def _check_complete(container, times: list[float], entry: dict[str, Any], where: str) -> None:
        """Raise if decoding stopped well before the duration the video stream declares (a truncated file)."""
        stream = container.streams.video[0]
        rate = stream.average_rate
        declared = _declared_seconds(container, stream)
        if not times or declared is None or not rate:
            return
        period = 1 / float(rate)
        limit = declared if entry["end"] is None else min(entry["end"], declared)
        if times[-1] < limit - 2.5 * period:
            raise VideoDecodeError(
                f"{where}: truncated: frames stop at {times[-1]:.2f} s but the file declares {declared:.2f} s"
            )

    def _sample(self, times: list[float], entry: dict[str, Any], where: str) -> np.ndarray:
        if not times:
            raise VideoDecodeError(f"{where}: no frames decoded in [{entry['start']}, {entry['end']})")
        if self.fps is None:
            if len(times) < self.num_frames:
                end = "end" if entry["end"] is None else f"{entry['end']:g} s"
                span = f"[{entry['start']:g} s, {end})"
                raise VideoDecodeError(
                    f"{where}: num_frames={self.num_frames} frames asked for, but the video has {len(times)} "
                    f"frames in {span}; ask for fewer, or pass fps to sample at a rate"
                )
            return np.linspace(0, len(times) - 1, self.num_frames).round().astype(int)
        wanted = entry["start"] + np.arange(self.num_frames) / self.fps
        if wanted[-1] > times[-1] + 0.5 / self.fps:
            raise VideoDecodeError(
                f"{where}: {self.num_frames} frames at fps={self.fps} need {wanted[-1] - entry['start']:.2f} s, "
                f"the clip has {times[-1] - entry['start']:.2f} s"
            )
        return np.abs(np.asarray(times)[None, :] - wanted[:, None]).argmin(axis=1)

    def _resize(self, frame) -> np.ndarray:
        scale = self.size / min(frame.width, frame.height)
        w, h = max(self.size, round(frame.width * scale)), max(self.size, round(frame.height * scale))
        pixels = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return pixels[top : top + self.size, left : left + self.size]


_DURATION_TAG = re.compile(r"^(\d+):(\d\d):(\d\d(?:\.\d+)?)$")


def _declared_seconds(container, stream) -> float | None:
    """Where the video stream says it ends: its own duration, else the container's (the longest stream's).

    A container's duration covers every stream, so a complete video whose audio runs on past the
    picture would look truncated against it. MP4 and most formats give the stream a duration;
    Matroska writes it as the stream's `DURATION` tag (`HH:MM:SS.nnnnnnnnn`).
    """
    if stream.duration and stream.time_base:
        start = stream.start_time if stream.start_time is not None else 0
        return float((start + stream.duration) * stream.time_base)
    tag = _DURATION_TAG.match(stream.metadata.get("DURATION", ""))
    if tag:
        hours, minutes, seconds = tag.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None if container.duration is None else container.duration / 1e6
