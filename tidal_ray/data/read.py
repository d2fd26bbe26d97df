"""Reading a pool for scoring, by position: every row comes with its ``file`` (index into
the pool's files) and ``row`` (position within that file), so duplicates are decided by
position whatever order the pipeline delivers rows in (DESIGN §2).

The read unit is one parquet row group (image-file pools: a window of runs of the
listing, which the unit lists again for itself: no process holds the whole listing). ``read_unit``
is a plain function of one unit: Ray Data runs it in fractional-CPU tasks and the
in-process path calls it in a loop, so both read alike. ``repeated_ids`` is the pre-pass
that finds the ids occurring more than once, reading the ``id`` column alone.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.listing import run_files, windows
from tidal_ray.data.pool import PoolSpec

FILES_PER_TABLE = 64         # image files in one table a unit yields
READ_THREADS = 8             # image files (or footers) fetched at once
# Row groups share Ray tasks: a task per row group cost more than reading it (10M rows
# in 1,000 row groups of 10,000 took 463 s to score on 2 cores, in 100 of 100,000 about
# 90 s). Never fewer tasks than TASKS_PER_CPU per CPU, nor than one per TASK_BYTES of the
# pool, so a large pool still spreads over a cluster that grows while it reads.
TASKS_PER_CPU = 4
TASK_BYTES = 64 << 20


def read_units(spec: PoolSpec, cpus: float = 1.0) -> list[dict]:
    """The pool's read units, in pool order: ``{"file", "row_group", "uris", "rows"}``, one
    per parquet row group (``uris``: its file) or per window of image files (``uris``: the
    uri before the window, or "", and its last; ``file``: its first file's index;
    ``row_group`` -1): the runs of the listing joined into as many windows as
    ``read_tasks`` would give parquet of this size on ``cpus``, or more to keep each
    within ``listing.WINDOW_FILES``. A local directory is read whole by every listing of
    it, so a task per run made scoring a flat directory quadratic (300,000 files: 4,688
    runs, 0.1-0.4 s of listing each)."""
    if spec.format == "files":
        windows_wanted = max(1, int(TASKS_PER_CPU * cpus), -(-spec.bytes // TASK_BYTES))
        per_window = max(1, len(spec.ranges) // windows_wanted)
        runs = range(len(spec.ranges))
        return [{"file": first, "row_group": -1, "uris": [after, last], "rows": count}
                for start in range(0, len(runs), per_window)
                for after, last, first, count in windows(spec, list(runs[start:start + per_window]))]
    return [{"file": i, "row_group": g, "uris": [uri], "rows": rows}
            for i, ((uri, _), groups) in enumerate(zip(spec.files, spec.row_groups)) for g, rows in enumerate(groups)]


def read_tasks(spec: PoolSpec, units: int, cpus: float) -> int:
    """How many Ray tasks read ``units`` of the pool (``read_units``) for scoring; each
    task reads a run of consecutive units. Image-file units are windows already: one each."""
    if spec.format == "files":
        return max(1, units)
    by_bytes = -(-sum(size for _, size in spec.files) // TASK_BYTES)
    return max(1, min(units, max(int(TASKS_PER_CPU * cpus), by_bytes)))


def read_unit(unit: dict, spec: PoolSpec, block_rows: int = 65536, max_bytes: int = 64 << 20):
    """Yield one unit's rows as tables of at most ``block_rows`` rows and, going by the
    row group's average row size, about ``max_bytes`` (large encoded images): ``id`` and
    the data column (image files: ``bytes`` and ``path``, the id being the key), plus
    ``file`` and ``row``."""
    if spec.format == "files":
        yield from _read_image_range(unit, spec, max_bytes)
        return
    first = int(unit["file"])
    fs, path = storage.resolve(unit["uris"][0])
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        group = int(unit["row_group"])
        row = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        meta = pf.metadata.row_group(group)
        row_size = meta.total_byte_size / max(1, meta.num_rows)
        rows = max(1, min(block_rows, int(max_bytes // max(row_size, 1.0))))
        for batch in pf.iter_batches(batch_size=rows, row_groups=[group], columns=["id", spec.column]):
            n = batch.num_rows
            yield pa.Table.from_batches([batch]).append_column("file", pa.array(np.full(n, first, dtype=np.int32))) \
                .append_column("row", pa.array(np.arange(row, row + n, dtype=np.int64)))
            row += n


def _read_image_range(unit: dict, spec: PoolSpec, max_bytes: int):
    """A window of image files, listed again here, as tables of at most ``FILES_PER_TABLE``
    files and (unless one file is larger) ``max_bytes``."""
    files = run_files(spec, *unit["uris"], unit["rows"], when="while it was scored")
    first = int(unit["file"])
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        start = 0
        while start < len(files):
            stop, size = start, 0
            while stop < len(files) and stop - start < FILES_PER_TABLE \
                    and (stop == start or size + files[stop][1] <= max_bytes):
                size += files[stop][1]
                stop += 1
            uris = [uri for uri, _ in files[start:stop]]
            yield pa.table({"bytes": pa.array(list(pool.map(storage.read_bytes, uris)), pa.binary()),
                            "path": pa.array([storage.resolve(u)[1] for u in uris], pa.string()),
                            "file": pa.array(np.arange(first + start, first + stop, dtype=np.int32)),
                            "row": pa.array(np.zeros(stop - start, dtype=np.int64))})
            start = stop


def read_batches(batch: pa.Table, spec: PoolSpec, block_rows: int = 65536, max_bytes: int = 64 << 20):
    """Ray Data's form of ``read_unit``: a batch of units in, their rows' tables out."""
    for unit in batch.to_pylist():
        yield from read_unit(unit, spec, block_rows, max_bytes)


def repeated_ids(spec: PoolSpec) -> np.ndarray:
    """The ids that occur more than once in the pool (sorted unique), from its ``id``
    columns alone, a few row groups fetched at a time (driver memory follows the row
    group, not the file). Image-file ids are keys: never repeated."""
    if spec.format == "files":
        return id_utils.empty(spec.id_type)

    def ids_of(unit):
        fs, path = storage.resolve(unit["uris"][0])
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_group(unit["row_group"], columns=["id"]).column("id").cast(spec.id_type)

    def chunks():  # a row group's ids at a time, a few fetched at once: memory is bounded by row groups
        units = read_units(spec)
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(units))) as pool:
            for start in range(0, len(units), READ_THREADS):
                yield from pool.map(ids_of, units[start:start + READ_THREADS])

    return id_utils.repeated_ids(chunks(), spec.id_type)


def arrival_order_for_tests(units: list) -> list:
    """TEST-ONLY (tests/README.md): ``TIDAL_RAY_TEST_UNIT_ORDER=reverse`` makes the
    in-process path read the units last first, so tests see rows arrive out of pool order."""
    return units[::-1] if os.environ.get("TIDAL_RAY_TEST_UNIT_ORDER") == "reverse" else units
