"""Small pools and labeled sets read whole into memory, decoded.

For tests, benchmarks and the steps that still need a whole (small) set in one
process; whole-pool work goes through Ray Data (``score.py``). Decoding is
``decode.py``'s, and the first of duplicate ids wins by ``ids.SeenIds``, as in scoring.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import ids as id_utils
from . import storage
from .decode import column_array, decode_batch, input_dtype
from .errors import BadInput
from .pool import SAMPLED_IMAGES, PoolSpec, describe_pool, image_files, image_keys_present, input_shape_for


BATCH_ROWS = 65536


def iter_tables(spec: PoolSpec, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS):
    """The pool as tables in pool order, reading only ``columns`` (plus ``path``)."""
    if spec.format == "files":
        yield from _image_tables((uri for uri, _ in image_files(spec)), batch_rows)
        return
    for uri, _ in spec.files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
                table = pa.Table.from_batches([rb])
                yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


def _image_tables(uris, batch_rows: int = BATCH_ROWS):
    """Image files as tables of ``bytes`` and ``path``, ``batch_rows`` files each."""
    uris = iter(uris)
    while chunk := list(itertools.islice(uris, batch_rows)):
        yield pa.table({"bytes": [storage.read_bytes(u) for u in chunk],
                        "path": [storage.resolve(u)[1] for u in chunk]})


def load_rows(uri: str, ids=None, input_shape=None):
    """A small pool or labeled set in memory, decoded: ``(ids, x, labels or None, input_shape)``.

    ``input_shape``: what to decode to (default: ``pool.input_shape_for`` the pool, the
    default recipe). With ``ids``, only those rows, in the order given (BadInput if one
    is missing).
    Rows that cannot be decoded are skipped with a one-line warning on stderr; for
    duplicate ids the first row wins."""
    spec = describe_pool(uri)
    wanted = None if ids is None else id_utils.from_user(ids, spec.id_type, uri)
    if wanted is not None and spec.format == "files":  # the wanted files alone (missing ones: below)
        keys = wanted.to_pylist()
        uris = [spec.key_uri(k) for k, ok in zip(keys, image_keys_present(spec, keys)) if ok]
        spec = replace(spec, rows=len(uris), sample=tuple(uris[:SAMPLED_IMAGES]))
        tables = _image_tables(uris)
    else:
        tables = iter_tables(spec, None if spec.format == "files" else
                             ["id", spec.column] + (["label"] if spec.has_label else []))
    if input_shape is None:
        input_shape = input_shape_for(spec) if spec.rows else (0,)
    input_shape = tuple(int(d) for d in input_shape)
    file_index = spec.file_index()
    parts_ids, parts_x, parts_labels, skipped = [], [], [], []
    for table in tables:
        if wanted is not None and spec.format != "files":
            table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        good, rejects = decode_batch(table, spec, input_shape, file_index)
        skipped += [(spec.file_name(f, i), r) for f, i, r in zip(rejects["file"], rejects["id"], rejects["reason"])]
        parts_ids.append(good["id"])
        parts_x.append(good["x"])
        if spec.has_label:
            labels = column_array(table, "label").take(pa.array(good["row"]))
            parts_labels.append(labels.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False))
    if skipped:
        print(f"load_rows: skipped {len(skipped)} bad row(s) in {uri} (first: {skipped[0][0]}: {skipped[0][1]})",
              file=sys.stderr)
    all_ids = np.concatenate(parts_ids) if parts_ids else id_utils.empty(spec.id_type)
    x = np.concatenate(parts_x) if parts_x else np.empty((0, *input_shape), dtype=input_dtype(spec))
    labels = np.concatenate(parts_labels) if spec.has_label and parts_labels else None

    first = id_utils.SeenIds().first_seen(all_ids)
    all_ids, x = all_ids[first], x[first]
    labels = None if labels is None else labels[first]
    if wanted is not None:
        position = {v: i for i, v in enumerate(all_ids.tolist())}
        requested = wanted.to_pylist()
        missing = [v for v in requested if v not in position]
        if missing:
            raise BadInput(f"{len(missing)} requested id(s) not found in {uri} (e.g. {missing[0]!r})")
        take = np.array([position[v] for v in requested], dtype=np.int64)
        all_ids, x = all_ids[take], x[take]
        labels = None if labels is None else labels[take]
    return all_ids, x, labels, tuple(input_shape)


def pool_has_ids(uri: str, candidates) -> set[str]:
    """Which of ``candidates`` (as strings) are ids in the pool; reads the ids only."""
    spec = describe_pool(uri)
    candidates = [str(c) for c in candidates]
    if spec.format == "files":
        return {c for c, ok in zip(candidates, image_keys_present(spec, candidates)) if ok}
    value_set = id_utils.parse_keys(candidates, spec.id_type)
    found: set[str] = set()
    for uri, _ in spec.files:  # the id filter goes into the read: row groups it rules out are skipped
        fs, path = storage.resolve(uri)
        ids = pq.read_table(path, filesystem=fs, columns=["id"], filters=pc.field("id").isin(value_set)).column("id")
        found.update(str(v) for v in ids.cast(spec.id_type).to_pylist())
    return {c for c in candidates if id_utils.key(c, spec.id_type) in found}


def read_selected(spec: PoolSpec, ids, columns: list[str]) -> pa.Table:
    """Only the rows of ``ids`` from a parquet pool, only ``columns`` (plus ``id``; those
    a file lacks are left out): the id filter goes into each file's read (row groups
    whose statistics rule it out are never read), so the pool is never read whole. The
    first of duplicate ids wins, as in scoring."""
    wanted = id_utils.from_user(list(ids), spec.id_type, spec.uri)
    parts = []
    for uri, _ in spec.files:
        fs, path = storage.resolve(uri)
        present = ["id", *[c for c in columns if c != "id" and c in pq.read_schema(path, filesystem=fs).names]]
        part = pq.read_table(path, filesystem=fs, columns=present, filters=pc.field("id").isin(wanted))
        parts.append(part.set_column(0, "id", part.column("id").cast(spec.id_type)))
    table = pa.concat_tables(parts, promote_options="permissive")
    first = id_utils.SeenIds().first_seen(id_utils.to_numpy(column_array(table, "id"), spec.id_type))
    return table.filter(pa.array(first))


def load_labeled(uri: str, input_shape=None):
    """A labeled set in memory, decoded to ``input_shape`` (default: the pool's default
    recipe): ``(ids, x, labels, input_shape, num_classes declared in its metadata or None)``."""
    if not storage.exists(uri):
        raise BadInput(f"labeled set not found: {uri}")
    ids, x, labels, input_shape = load_rows(uri, input_shape=input_shape)
    if labels is None:
        raise BadInput(f"labeled set {uri} has no label column")
    if len(ids) == 0:
        raise BadInput(f"labeled set {uri} has no rows")
    return ids, x, labels, input_shape, describe_pool(uri).num_classes
