"""A few rows of a parquet pool, found by id or by position, without reading the pool.

Only the columns asked for are read, and only from the row groups that can hold a
wanted row: for integer ids the row group's min/max statistics rule most out before
any byte of it is read, and the ``id`` column decides for the rest. Memory stays
within one row group's worth of the asked columns plus the wanted ids, so the driver
can use these (the oracle, ``campaign init``) and Ray tasks can too (training reads).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import ids as id_utils
from . import storage
from .errors import BadInput
from .pool import PoolSpec

BATCH_ROWS = 65536


def _may_hold(metadata: pq.FileMetaData, group: int, id_column: int, wanted_sorted: np.ndarray | None) -> bool:
    """False only when the row group's id statistics prove that no wanted id is in it."""
    if wanted_sorted is None:
        return True
    stats = metadata.row_group(group).column(id_column).statistics
    if stats is None or not stats.has_min_max:
        return True
    low = np.searchsorted(wanted_sorted, stats.min, side="left")
    high = np.searchsorted(wanted_sorted, stats.max, side="right")
    return bool(high > low)


def rows_with_ids(uri: str, wanted: pa.Array, columns: list[str], batch_rows: int = BATCH_ROWS):
    """Yield ``(table, rows)``: the rows of one parquet file whose id is in ``wanted``
    (``columns`` only, ``id`` included) and their positions in the file, in file order."""
    fs, path = storage.resolve(uri)
    wanted_sorted = np.sort(wanted.to_numpy(zero_copy_only=False)) if pa.types.is_integer(wanted.type) else None
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        id_column = pf.schema_arrow.get_field_index("id")
        first_row = 0
        for g in range(meta.num_row_groups):
            group_rows = meta.row_group(g).num_rows
            start, first_row = first_row, first_row + group_rows
            if not _may_hold(meta, g, id_column, wanted_sorted):
                continue
            group_ids = pf.read_row_group(g, columns=["id"]).column("id")
            hit = pc.is_in(group_ids.cast(wanted.type), value_set=wanted).fill_null(False)
            if not pc.any(hit).as_py():
                continue
            offset = start
            for rb in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns):
                table = pa.Table.from_batches([rb])
                mask = pc.is_in(table.column("id").cast(wanted.type), value_set=wanted).fill_null(False)
                where = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
                if len(where):
                    yield table.take(pa.array(where)), offset + where
                offset += table.num_rows


def labels_of(spec: PoolSpec, ids) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)`` for ``ids`` in the order given, reading only the pool's ``id`` and
    ``label`` columns; for duplicate ids the earliest row wins. BadInput when an id is not
    in the pool or its row has no label."""
    if spec.format == "files" or not spec.has_label:
        raise BadInput(f"the oracle needs a 'label' column in the pool {spec.uri}")
    wanted = id_utils.from_user(ids, spec.id_type, spec.uri)
    found_ids, found_labels = [], []
    for uri, _ in spec.files:
        for table, _ in rows_with_ids(uri, wanted, ["id", "label"]):
            found_ids.append(table.column("id").cast(spec.id_type))
            found_labels.append(table.column("label").cast(pa.int64()))
    all_ids = id_utils.to_numpy(pa.chunked_array(found_ids, spec.id_type), spec.id_type) if found_ids \
        else id_utils.empty(spec.id_type)
    all_labels = pa.chunked_array(found_labels, pa.int64()).to_numpy() if found_labels else np.empty(0, np.int64)
    first = {}
    for position, value in enumerate(all_ids.tolist()):
        first.setdefault(value, position)
    requested = wanted.to_pylist()
    missing = [v for v in requested if v not in first]
    if missing:
        raise BadInput(f"{len(missing)} requested id(s) not found in {spec.uri} (e.g. {missing[0]!r})")
    take = np.array([first[v] for v in requested], dtype=np.int64)
    labels = pa.array(all_labels, pa.int64()).take(pa.array(take)) if len(all_labels) else pa.array([], pa.int64())
    if labels.null_count:
        raise BadInput(f"the pool {spec.uri} has no label for id {requested[int(np.flatnonzero(labels.is_null()))[0]]!r}")
    return all_ids[take], labels.to_numpy()


def _file_row_counts(spec: PoolSpec) -> np.ndarray:
    counts = []
    for uri, _ in spec.files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return np.array(counts, dtype=np.int64)


def rows_at(uri: str, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows at sorted ``positions`` of one parquet file (``columns`` only), reading just
    the row groups that hold them."""
    fs, path = storage.resolve(uri)
    parts = []
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            stop = start + pf.metadata.row_group(g).num_rows
            inside = positions[(positions >= start) & (positions < stop)]
            if len(inside):
                parts.append(pf.read_row_group(g, columns=columns).take(pa.array(inside - start)))
            start = stop
    return pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(columns)


def sample_labels(spec: PoolSpec, n: int, seed: int) -> pa.Table:
    """``n`` rows drawn uniformly at random from the pool's rows (by position, from the
    parquet footers' row counts), as ``id, label``, reading only those rows' two columns.

    Rows with a null id or label, and repeats of an id already drawn, are left out, so
    the table may hold fewer than ``n`` rows. For a pool without such rows the draw is
    ``default_rng(seed).choice(rows, n, replace=False)`` over the rows in pool order."""
    if spec.format == "files" or not spec.has_label:
        raise BadInput(f"the oracle needs a 'label' column in the pool {spec.uri}")
    if n > spec.rows:
        raise BadInput(f"--initial-labels {n} is more than the pool's {spec.rows} rows")
    chosen = np.sort(np.random.default_rng(seed).choice(spec.rows, size=n, replace=False))
    ends = np.cumsum(_file_row_counts(spec))
    starts = np.concatenate([[0], ends[:-1]])
    parts = []
    for i, (uri, _) in enumerate(spec.files):
        inside = chosen[(chosen >= starts[i]) & (chosen < ends[i])]
        if len(inside):
            table = rows_at(uri, inside - starts[i], ["id", "label"])
            parts.append(pa.table({"id": id_utils.cast(table.column("id"), spec.id_type, uri),
                                   "label": table.column("label").cast(pa.int64())}))
    table = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], spec.id_type),
                                                            "label": pa.array([], pa.int64())})
    table = table.filter(pc.and_(pc.is_valid(table.column("id")), pc.is_valid(table.column("label"))))
    first = id_utils.SeenIds().first_seen(id_utils.to_numpy(table.column("id"), spec.id_type))
    return table.filter(pa.array(first))
