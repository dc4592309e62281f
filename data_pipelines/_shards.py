"""Pre-tokenized shards: packed rows written once to ArrayRecord files, read back as a grain source."""

import io
import os
from collections.abc import Iterable, Mapping, Sequence

import grain
import numpy as np


def _encode(row: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in row.items()})
    return buffer.getvalue()


def _decode(record: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(record), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


def write_packed_shards(
    rows: Iterable[Mapping[str, np.ndarray]], directory: str | os.PathLike, *, rows_per_shard: int = 1024,
    prefix: str = "packed",
) -> list[str]:
    """Write packed rows (e.g. from [`PackIterDataset`][data_pipelines.PackIterDataset]) to ArrayRecord files.

    Each row is one record (its arrays in NumPy's `.npz` format, no pickle). Files are named
    `{prefix}-00000.array_record`, ... with `rows_per_shard` rows each (the last may hold fewer);
    returns their paths, in order. Decoding video and tokenizing happen once here, not every epoch.
    Read them back with [`PackedShards`][data_pipelines.PackedShards] and
    [`shard_batches`][data_pipelines.shard_batches]. Store rows in natural order (no ring layout).

    **Arguments:**

    - `rows`: an iterable of rows, each a mapping of name → array (e.g. `[seq_len]` arrays from
      [`pack`][data_pipelines.pack]); consumed once.
    - `directory`: the folder to write into; created if missing. Existing files of the same names
      are overwritten.
    - `rows_per_shard`: rows per file (keyword only), default 1024.
    - `prefix`: the start of each file name (keyword only), default `"packed"`.

    **Returns:**

    The list of the written files' paths, in order; empty when `rows` is empty.

    **Raises:**

    `ValueError` if `rows_per_shard` is not positive, `prefix` is empty or holds a path separator,
    or `directory` is an existing file; `TypeError` if `rows_per_shard` is not an int, `prefix`
    not a string, `rows` a single mapping instead of an iterable of them, or a row not a mapping
    of names to arrays (named by its index). Arguments are checked before anything is written.

    **Example:**

    ```python
    import tempfile

    import numpy as np
    from data_pipelines import PackedShards, write_packed_shards

    rows = [{"tokens": np.full(8, i, np.int32), "segment_ids": np.ones(8, np.int32)} for i in range(5)]
    with tempfile.TemporaryDirectory() as directory:
        paths = write_packed_shards(rows, directory, rows_per_shard=2)
        assert [p.rsplit("/", 1)[-1] for p in paths] == [f"packed-0000{i}.array_record" for i in range(3)]
        source = PackedShards(paths)
        assert len(source) == 5 and source[3]["tokens"].tolist() == [3] * 8
    ```
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int | np.integer):
        raise TypeError(f"rows_per_shard must be an int, got {type(rows_per_shard).__name__} {rows_per_shard!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
    if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix):
        raise ValueError(f"prefix must be a non-empty file name without a path separator, got {prefix!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory must be a folder, got the existing file {os.fspath(directory)!r}")
    if isinstance(rows, Mapping):
        raise TypeError("rows must be an iterable of rows (mappings of name -> array), got a single mapping")
    os.makedirs(directory, exist_ok=True)
    paths: list[str] = []
    writer = None
    try:
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"rows[{i}] must be a mapping of name -> array, got {type(row).__name__}")
            if i % rows_per_shard == 0:
                if writer is not None:
                    writer.close()
                    writer = None  # closed once, even if the next file cannot be opened
                paths.append(os.path.join(os.fspath(directory), f"{prefix}-{len(paths):05d}.array_record"))
                writer = ArrayRecordWriter(paths[-1], "group_size:1")
            writer.write(_encode(row))
    finally:
        if writer is not None:
            writer.close()
    return paths


class PackedShards:
    """A grain random-access source over the rows [`write_packed_shards`][data_pipelines.write_packed_shards] wrote.

    `source[i]` is row `i` (across the files, in order) as a dict of arrays, exactly as written.
    `paths` holds the files' paths as strings.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        """**Arguments:**

        - `paths`: the shard files, in order, e.g. as `write_packed_shards` returned them.

        **Raises:**

        `ValueError` if `paths` is empty; `TypeError` if it is a single path rather than a sequence
        of them; `FileNotFoundError` naming the files that do not exist.
        """
        if isinstance(paths, str | bytes | os.PathLike):
            raise TypeError(f"paths must be a sequence of shard files, got the single path {os.fspath(paths)!r}; "
                            "wrap it in a list")
        if not paths:
            raise ValueError("PackedShards needs at least one file")
        missing = [os.fspath(p) for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"packed shard files not found: {missing}")
        self.paths = [os.fspath(p) for p in paths]
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        """The number of rows.

        **Returns:**

        The total number of rows in all the files.
        """
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Read one row.

        **Arguments:**

        - `index`: the row's index in `[0, len(self))`, counting across the files in order.

        **Returns:**

        The row as written: a dict of name → NumPy array, dtypes and shapes preserved.
        """
        return _decode(self._records[index])

    def __repr__(self) -> str:
        """`PackedShards(N files, M rows)`."""
        return f"PackedShards({len(self.paths)} files, {len(self)} rows)"
