"""Rows of a pool found by id or by position, without reading the pool: the one way to
read rows by id (oracle labels, exports, in-memory loads, existence checks, training)
and by position (``rows_at_positions``: where a selection says its rows live).

Only the columns asked for are read, and only from the row groups that can hold a
wanted row: for integer ids the row group's min/max statistics (found by the Parquet
column path ``id``, not by field index: a struct column before ``id`` shifts the leaf
columns) rule most out before any byte of it is read, and the ``id`` column decides
for the rest. Memory stays within one row group's worth of the asked columns plus the
wanted ids, so the driver can use these and Ray tasks can too.

Of several rows with one id, the earliest decodable one wins (``ids.earliest_rows``), as
in scoring: ``winning_rows`` decodes the rows of repeated ids to find it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import decode_batch
from tidal_ray.data.listing import image_keys_present, run_files, windows
from tidal_ray.data.pool import PoolSpec, describe_pool, input_shape_for
from tidal_ray.errors import BadInput

BATCH_ROWS = 65536
BATCH_BYTES = 4 << 20    # a read batch of wide rows (encoded images): about this much
READ_BUFFER = 8 << 20
ROW_BITS = 40         # one int64 per row: file << ROW_BITS | row within the file
POSITION_COLUMNS = ("file", "row_group", "row")


def id_leaf_index(metadata: pq.FileMetaData) -> int | None:
    """The index of the ``id`` leaf column among a file's Parquet columns (by path)."""
    if metadata.num_row_groups == 0:
        return None
    group = metadata.row_group(0)
    for j in range(group.num_columns):
        if group.column(j).path_in_schema == "id":
            return j
    return None


def _may_hold(metadata: pq.FileMetaData, group: int, id_leaf: int | None, wanted_sorted: np.ndarray | None) -> bool:
    """False only when the row group's id statistics prove that no wanted id is in it."""
    if wanted_sorted is None or id_leaf is None:
        return True
    stats = metadata.row_group(group).column(id_leaf).statistics
    if stats is None or not stats.has_min_max:
        return True
    low = np.searchsorted(wanted_sorted, stats.min, side="left")
    high = np.searchsorted(wanted_sorted, stats.max, side="right")
    return bool(high > low)


def _open_parquet(f) -> pq.ParquetFile:
    # A buffered stream rather than pre-buffering, which reads a row group's whole column
    # chunks first: reading through one row group of 40,000 encoded images (480 MB) in
    # 8,192-row batches peaked at 880 MB that way, 440 MB this way (and less in smaller batches).
    return pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)


def _batch_rows(meta: pq.FileMetaData, row_group: int, most: int) -> int:
    """Rows per read batch of a row group: at most ``most``, and about ``BATCH_BYTES``."""
    group = meta.row_group(row_group)
    return max(1, min(most, BATCH_BYTES * group.num_rows // max(1, group.total_byte_size)))


def rows_with_ids(uri: str, wanted: pa.Array, columns: list[str], batch_rows: int = BATCH_ROWS):
    """Yield ``(table, rows)``: the rows of one parquet file whose id is in ``wanted``
    (``columns`` only, ``id`` included) and their positions in the file, in file order."""
    fs, path = storage.resolve(uri)
    wanted_sorted = np.sort(wanted.to_numpy(zero_copy_only=False)) if pa.types.is_integer(wanted.type) else None
    with fs.open_input_file(path) as f:
        pf = _open_parquet(f)
        meta = pf.metadata
        id_leaf = id_leaf_index(meta)
        columns = [c for c in dict.fromkeys(["id", *columns]) if c in pf.schema_arrow.names]
        first_row = 0
        for g in range(meta.num_row_groups):
            group_rows = meta.row_group(g).num_rows
            start, first_row = first_row, first_row + group_rows
            if not _may_hold(meta, g, id_leaf, wanted_sorted):
                continue
            group_ids = pf.read_row_group(g, columns=["id"]).column("id")
            hit = pc.is_in(group_ids.cast(wanted.type), value_set=wanted).fill_null(False)
            if not pc.any(hit).as_py():
                continue
            offset = start
            for rb in pf.iter_batches(batch_size=_batch_rows(meta, g, batch_rows), row_groups=[g], columns=columns):
                table = pa.Table.from_batches([rb])
                mask = pc.is_in(table.column("id").cast(wanted.type), value_set=wanted).fill_null(False)
                where = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
                if len(where):
                    yield table.take(pa.array(where)), offset + where
                offset += table.num_rows


def read_rows(spec: PoolSpec, ids, columns: list[str]) -> pa.Table:
    """Every row of a parquet pool whose id is among ``ids`` (all rows of a repeated id),
    in pool order: ``id`` (the pool's type), ``columns`` (those a file lacks are left
    out), ``file`` (index into ``spec.files``) and ``row`` (position in the file)."""
    wanted = id_utils.from_user(list(ids), spec.id_type, spec.uri)
    parts = []
    for file, (uri, _) in enumerate(spec.files):
        for table, rows in rows_with_ids(uri, wanted, columns):
            table = table.set_column(0, "id", table.column("id").cast(spec.id_type))
            parts.append(table.append_column("file", pa.array(np.full(len(rows), file, np.int32)))
                         .append_column("row", pa.array(rows.astype(np.int64))))
    if not parts:
        return pa.table({"id": pa.array([], spec.id_type), "file": pa.array([], pa.int32()),
                         "row": pa.array([], pa.int64())})
    return pa.concat_tables(parts, promote_options="permissive")


def encode_positions(files, rows) -> np.ndarray:
    """One sortable int64 per row: its file, then its row within the file."""
    return (np.asarray(files).astype(np.int64) << ROW_BITS) | np.asarray(rows).astype(np.int64)


def decode_positions(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``encode_positions`` undone: (files, rows)."""
    positions = np.asarray(positions, dtype=np.int64)
    return positions >> ROW_BITS, positions & ((1 << ROW_BITS) - 1)


def positions(table: pa.Table) -> np.ndarray:
    """The positions of the rows of a ``read_rows`` table."""
    return encode_positions(table.column("file").to_numpy(), table.column("row").to_numpy())


def decodable(table: pa.Table, spec: PoolSpec, input_shape) -> np.ndarray:
    """Which rows of a table holding ``id`` and the data column decode to ``input_shape``."""
    good, _ = decode_batch(table, spec, input_shape)
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[good["row"]] = True
    return mask


def winning_rows(table: pa.Table, spec: PoolSpec, input_shape=None) -> pa.Table:
    """One row per id of a ``read_rows`` table: the earliest decodable row (DESIGN §2).
    Only rows of ids that occur more than once are decoded; an id none of whose rows
    decodes keeps its earliest row (callers that need the data decode it and reject it)."""
    if table.num_rows == 0:
        return table
    ids = id_utils.to_numpy(table.column("id"), spec.id_type)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    good = np.ones(len(ids), dtype=bool)
    repeated = counts[inverse] > 1
    if repeated.any() and spec.column in table.column_names:
        good[repeated] = decodable(table.filter(pa.array(repeated)), spec, input_shape or input_shape_for(spec))
        has_good = np.bincount(inverse, weights=good, minlength=len(counts)) > 0
        good |= ~has_good[inverse]
    return table.take(pa.array(id_utils.earliest_rows(ids, positions(table), good)))


def in_given_order(table: pa.Table, spec: PoolSpec, ids) -> pa.Table:
    """The rows of ``table`` (one per id) in the order of ``ids``; BadInput naming the
    first id that is not there."""
    wanted = id_utils.to_numpy(id_utils.from_user(list(ids), spec.id_type, spec.uri), spec.id_type)
    return table.take(pa.array(id_utils.find(id_utils.to_numpy(table.column("id"), spec.id_type), wanted, spec.uri)))


def pool_has_ids(uri: str, candidates) -> set[str]:
    """Which of ``candidates`` (as strings) are ids in the pool; reads the ids only."""
    spec = describe_pool(uri)
    candidates = [str(c) for c in candidates]
    if spec.format == "files":
        return {c for c, ok in zip(candidates, image_keys_present(spec, candidates)) if ok}
    found = read_rows(spec, id_utils.parse_keys(candidates, spec.id_type).to_pylist(), [])
    present = {str(v) for v in found.column("id").to_pylist()}
    return {c for c in candidates if id_utils.as_text(c, spec.id_type) in present}


def read_selected(spec: PoolSpec, ids, columns: list[str], input_shape=None) -> pa.Table:
    """The winning row of each of ``ids`` from a parquet pool, ``columns`` only (plus
    ``id``, ``file``, ``row``), in pool order."""
    data = [spec.column] if spec.column not in columns else []
    table = winning_rows(read_rows(spec, ids, [*columns, *data]), spec, input_shape)
    return table.drop_columns(data) if data else table


def labels_of(spec: PoolSpec, ids, input_shape=None, positions: pa.Table | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)`` for ``ids`` in the order given, from the winning row of each id
    (the earliest decodable, as scoring decides). ``positions`` (``id, file, row_group,
    row``, e.g. a selection's): the ids it holds are read there, their row groups' ``id``
    and ``label`` only (a selected position is the winning row by construction); other
    ids by id. BadInput when an id is not in the pool (or not at its position) or its
    row has no label."""
    if spec.format == "files" or not spec.has_label:
        raise BadInput(f"the oracle needs a 'label' column in the pool {spec.uri}")
    table = in_given_order(rows_of(spec, ids, ["label"], positions, input_shape), spec, ids)
    labels = table.column("label").cast(pa.int64())
    if labels.null_count:
        first = int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise BadInput(f"the pool {spec.uri} has no label for id {table.column('id')[first].as_py()!r}")
    return id_utils.to_numpy(table.column("id"), spec.id_type), labels.to_numpy()


def rows_of(spec: PoolSpec, ids, columns: list[str], positions: pa.Table | None = None, input_shape=None) -> pa.Table:
    """``id`` and ``columns`` of the winning row of each of ``ids``: at its position where
    ``positions`` holds it, else found by id (``read_selected``)."""
    def as_ids(values):
        return id_utils.to_numpy(id_utils.from_user(list(values), spec.id_type, spec.uri), spec.id_type)

    wanted = as_ids(ids)
    parts, placed = [], np.zeros(len(wanted), bool)
    if positions is not None and positions.num_rows:
        listed = as_ids(positions.column("id").to_pylist())
        known = positions.filter(pa.array(id_utils.is_member(np.unique(wanted), listed)))
        placed = id_utils.is_member(np.unique(as_ids(known.column("id").to_pylist())), wanted)
        if known.num_rows:
            parts.append(rows_at_positions(spec, *(known.column(c).to_numpy() for c in POSITION_COLUMNS), columns))
    if not placed.all():
        parts.append(read_selected(spec, wanted[~placed].tolist(), columns, input_shape))
    keep = ["id", *columns]
    return pa.concat_tables([t.select([c for c in keep if c in t.column_names]) for t in parts],
                            promote_options="permissive") if parts else pa.table({"id": pa.array([], spec.id_type)})


def _file_row_counts(spec: PoolSpec) -> np.ndarray:
    return np.array([sum(groups) for groups in spec.row_groups], dtype=np.int64)


def rows_at(uri: str, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows at sorted ``positions`` of one parquet file (``columns`` only), reading just
    the row groups that hold them, a batch at a time (``_group_parts``)."""
    fs, path = storage.resolve(uri)
    parts = []
    with fs.open_input_file(path) as f:
        pf = _open_parquet(f)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            stop = start + pf.metadata.row_group(g).num_rows
            inside = positions[(positions >= start) & (positions < stop)]
            if len(inside):
                parts += _group_parts(pf, g, start, inside, columns)
            start = stop
    return pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(columns)


def rows_by_position(spec: PoolSpec, n: int, seed: int, columns: list[str],
                     required: tuple[str, ...] = ("id",)) -> pa.Table:
    """``n`` rows (at most the pool's) drawn uniformly by position with ``seed``
    (``default_rng(seed).choice(rows, n, replace=False)`` over the rows in pool order, from
    the parquet footers' row counts), ``columns`` only, reading just those rows.

    Rows with a null in a ``required`` column, and repeats of an id already drawn, are
    left out, so the table may hold fewer than ``n`` rows."""
    chosen = np.sort(np.random.default_rng(seed).choice(spec.rows, size=min(n, spec.rows), replace=False))
    ends = np.cumsum(_file_row_counts(spec))
    starts = np.concatenate([[0], ends[:-1]])
    parts = []
    for i, (uri, _) in enumerate(spec.files):
        inside = chosen[(chosen >= starts[i]) & (chosen < ends[i])]
        if len(inside) or (i == 0 and not len(chosen)):   # an empty draw keeps the columns' types
            table = rows_at(uri, inside - starts[i], columns)
            parts.append(table.set_column(table.schema.get_field_index("id"), "id",
                                          id_utils.cast(table.column("id"), spec.id_type, uri)))
    table = pa.concat_tables(parts, promote_options="permissive")
    # Filtered only when a row goes: a filter copies the table (a sample of encoded images).
    for name in required:
        if table.column(name).null_count:
            table = table.filter(pc.is_valid(table.column(name)))
    first = id_utils.SeenIds().first_seen(id_utils.to_numpy(table.column("id"), spec.id_type))
    return table if first.all() else table.filter(pa.array(first))


def image_ids_by_position(spec: PoolSpec, n: int, seed: int) -> list[str]:
    """``n`` ids (at most the pool's) of an image-file pool drawn uniformly by position
    with ``seed``, as ``rows_by_position`` draws rows: only the runs of the listing
    (``spec.ranges``) that hold a drawn position are listed again, as windows
    (``listing.windows``), a few at a time."""
    chosen = np.sort(np.random.default_rng(seed).choice(spec.rows, size=min(n, spec.rows), replace=False))
    run_of = np.searchsorted(np.array([first for _, _, first, _ in spec.ranges]), chosen, side="right") - 1

    def files_at(window) -> list[str]:
        after, last, first, count = window
        files = run_files(spec, after, last, count)
        return [files[i][0] for i in chosen[(chosen >= first) & (chosen < first + count)] - first]

    root = spec.root.rstrip("/") + "/"
    with ThreadPoolExecutor(max_workers=16) as pool:  # a listing page or a few per window on S3
        found = list(pool.map(files_at, windows(spec, np.unique(run_of).tolist())))
    return [storage.resolve(uri)[1][len(root):] for files in found for uri in files]


def sample_labels(spec: PoolSpec, n: int, seed: int) -> pa.Table:
    """The oracle's random initial draw: ``rows_by_position`` as ``id, label``."""
    if spec.format == "files" or not spec.has_label:
        raise BadInput(f"the oracle needs a 'label' column in the pool {spec.uri}")
    if n > spec.rows:
        raise BadInput(f"--initial-labels {n} is more than the pool's {spec.rows} rows")
    table = rows_by_position(spec, n, seed, ["id", "label"], required=("id", "label"))
    return table.set_column(1, "label", table.column("label").cast(pa.int64()))


# ---- by position ----------------------------------------------------------------------------

def row_group_of(row_groups, files, rows) -> np.ndarray:
    """The row group (index within its file) of each row at ``(files, rows)``, from
    ``PoolSpec.row_groups`` (per file, its row groups' row counts); -1 where the file
    has none (image files)."""
    files, rows = np.asarray(files, np.int64), np.asarray(rows, np.int64)
    out = np.full(len(rows), -1, np.int32)
    for f in np.unique(files):
        if 0 <= f < len(row_groups) and len(row_groups[f]):
            at = files == f
            out[at] = np.searchsorted(np.cumsum(row_groups[f]), rows[at], side="right")
    return out


def _group_parts(pf: pq.ParquetFile, row_group: int, start: int, rows: np.ndarray, columns: list[str],
                 batch_rows: int = 8192) -> list[pa.Table]:
    """The rows at sorted ``rows`` (within the file; the row group's first is ``start``) of
    one row group, read a bounded batch at a time (``_batch_rows``) and only up to the last
    of them: a row group of wide rows (encoded images) can be far larger than the rows
    taken from it."""
    parts = []
    if not len(rows):
        return parts
    for batch in pf.iter_batches(batch_size=_batch_rows(pf.metadata, row_group, batch_rows), row_groups=[row_group],
                                 columns=columns):
        if start > rows[-1]:
            break
        inside = rows[(rows >= start) & (rows < start + batch.num_rows)]
        if len(inside):
            parts.append(pa.Table.from_batches([batch]).take(pa.array(inside - start)))
        start += batch.num_rows
    return parts


def group_rows(uri: str, row_group: int, rows: np.ndarray, columns: list[str],
               batch_rows: int = 8192) -> pa.Table:
    """The rows at sorted ``rows`` (within the file) of one row group of one parquet
    file, ``columns`` only (those it has), in order. Only that row group is read, and
    only up to its last wanted row: the rest of it is never decoded."""
    fs, path = storage.resolve(uri)
    rows = np.asarray(rows, np.int64)
    with fs.open_input_file(path) as f:
        pf = _open_parquet(f)
        columns = [c for c in dict.fromkeys(columns) if c in pf.schema_arrow.names]
        start = sum(pf.metadata.row_group(g).num_rows for g in range(row_group))
        stop = start + pf.metadata.row_group(row_group).num_rows
        if len(rows) and (rows[0] < start or rows[-1] >= stop):
            raise BadInput(f"{uri}: no row {int(rows[0] if rows[0] < start else rows[-1])} in row group "
                           f"{row_group} (rows {start}..{stop - 1}): the pool changed since the positions were taken")
        parts = _group_parts(pf, row_group, start, rows, columns, batch_rows)
        return pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(columns)


def position_units(files, row_groups, rows) -> list[tuple[int, int, np.ndarray]]:
    """``(file, row_group, sorted rows)`` for each row group holding some of the rows,
    in pool order."""
    files, row_groups, rows = (np.asarray(a, np.int64) for a in (files, row_groups, rows))
    order = np.lexsort((rows, row_groups, files))
    files, row_groups, rows = files[order], row_groups[order], rows[order]
    cuts = np.flatnonzero((np.diff(files) != 0) | (np.diff(row_groups) != 0)) + 1
    return [(int(files[s[0]]), int(row_groups[s[0]]), rows[s])
            for s in np.split(np.arange(len(rows)), cuts) if len(s)]


def rows_at_positions(spec: PoolSpec, file, row_group, row, columns: list[str]) -> pa.Table:
    """The parquet pool's rows at the given positions (``file``: index into
    ``spec.files``; ``row_group``; ``row`` within the file), reading only the row groups
    that hold them: ``id``, ``columns`` (those the files have), ``file``, ``row_group``
    and ``row``, in pool order. No duplicate rule applies: a position names one row."""
    parts = []
    for f, g, rows in position_units(file, row_group, row):
        if not 0 <= f < len(spec.files):
            raise BadInput(f"{spec.uri}: no file number {f} (the pool has {len(spec.files)}): "
                           f"the pool changed since the positions were taken")
        table = group_rows(spec.files[f][0], g, rows, ["id", *columns])
        table = table.set_column(0, "id", id_utils.cast(table.column("id"), spec.id_type, spec.files[f][0]))
        parts.append(table.append_column("file", pa.array(np.full(len(rows), f, np.int32)))
                     .append_column("row_group", pa.array(np.full(len(rows), g, np.int32)))
                     .append_column("row", pa.array(rows)))
    if not parts:
        return pa.table({"id": pa.array([], spec.id_type), "file": pa.array([], pa.int32()),
                         "row_group": pa.array([], pa.int32()), "row": pa.array([], pa.int64())})
    return pa.concat_tables(parts, promote_options="permissive")


def winning_positions(spec: PoolSpec, ids) -> pa.Table:
    """``id, file, row_group, row``: where the row of each of ``ids`` lives, looked up
    once by id (the ``id`` columns only). Ids with more than one row (whose winner is
    decided by decoding, at read time) and ids not in the pool are left out: they are
    read by id."""
    if spec.format == "files":
        return pa.table({"id": pa.array([], spec.id_type), **_no_positions()})
    found = read_rows(spec, ids, [])
    found_ids = id_utils.to_numpy(found.column("id"), spec.id_type)
    _, inverse, counts = np.unique(found_ids, return_inverse=True, return_counts=True)
    once = found.filter(pa.array(counts[inverse] == 1))
    files, rows = once.column("file").to_numpy(), once.column("row").to_numpy()
    return pa.table({"id": once.column("id"), "file": pa.array(files, pa.int32()),
                     "row_group": pa.array(row_group_of(spec.row_groups, files, rows), pa.int32()),
                     "row": pa.array(rows, pa.int64())})


def _no_positions() -> dict:
    return {"file": pa.array([], pa.int32()), "row_group": pa.array([], pa.int32()), "row": pa.array([], pa.int64())}
