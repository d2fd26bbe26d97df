"""Small pools and labeled sets read into memory, decoded.

For tests, benchmarks and the steps that need a small set in one process (the local
trainer's labeled rows); whole-pool work goes through Ray Data (``score/pipeline.py``).
Decoding is ``decode.py``'s. A whole pool is read in pool order and the first decodable
row of an id wins (``ids.SeenIds``); rows asked for by id are found by ``lookup`` (the
id filter in the read, never a scan) and the same rule picks among repeats.
"""
from __future__ import annotations

import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import column_array, decode_batch, input_dtype
from tidal_ray.data.listing import SAMPLED_IMAGES, image_files, image_keys_present
from tidal_ray.data.lookup import read_rows, winning_rows
from tidal_ray.data.pool import describe_pool, input_shape_for
from tidal_ray.data.read import READ_THREADS

BATCH_ROWS = 65536


def iter_tables(spec, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS):
    """The pool as tables in pool order, reading only ``columns`` (plus ``path``)."""
    if spec.format == "files":
        yield from image_tables((uri for uri, _ in image_files(spec)), batch_rows)
        return
    for uri, _ in spec.files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
                table = pa.Table.from_batches([rb])
                yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


def image_tables(uris, batch_rows: int = BATCH_ROWS):
    """Image files as tables of ``bytes`` and ``path``, ``batch_rows`` files each (fetched
    ``READ_THREADS`` at a time: on S3 each is a GET)."""
    uris = iter(uris)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        while chunk := list(itertools.islice(uris, batch_rows)):
            yield pa.table({"bytes": list(pool.map(storage.read_bytes, chunk)),
                            "path": [storage.resolve(u)[1] for u in chunk]})


def decode_tables(tables, spec, input_shape, uri: str):
    """Decode tables of pool rows in order: ``(ids, x, labels or None, input_shape)``, the
    first decodable row of each id kept; rows that cannot be decoded are skipped with one
    warning line on stderr."""
    if input_shape is None:
        input_shape = input_shape_for(spec) if spec.rows else (0,)
    input_shape = tuple(int(d) for d in input_shape)
    file_index = spec.file_index()
    parts_ids, parts_x, parts_labels, skipped = [], [], [], []
    for table in tables:
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
    ids = np.concatenate(parts_ids) if parts_ids else id_utils.empty(spec.id_type)
    x = np.concatenate(parts_x) if parts_x else np.empty((0, *input_shape), dtype=input_dtype(spec))
    labels = np.concatenate(parts_labels) if spec.has_label and parts_labels else None
    first = id_utils.SeenIds().first_seen(ids)
    return ids[first], x[first], None if labels is None else labels[first], input_shape


def load_rows(uri: str, ids=None, input_shape=None, skip_undecodable: bool = False):
    """A small pool or labeled set in memory, decoded: ``(ids, x, labels or None, input_shape)``.

    ``input_shape``: what to decode to (default: ``pool.input_shape_for`` the pool, the
    default recipe). With ``ids``, only those rows, in the order given, read by id:
    BadInput if one is not in the pool; an id none of whose rows decodes is BadInput too,
    or, with ``skip_undecodable``, left out (warned about on stderr), as the Ray trainer's
    ingest leaves it out."""
    spec = describe_pool(uri)
    if ids is None:
        columns = None if spec.format == "files" else ["id", spec.column] + (["label"] if spec.has_label else [])
        return decode_tables(iter_tables(spec, columns), spec, input_shape, uri)
    wanted = id_utils.to_numpy(id_utils.from_user(list(ids), spec.id_type, uri), spec.id_type)
    if spec.format == "files":  # the wanted files alone, asked for by key
        keys = wanted.tolist()
        present = list(image_keys_present(spec, keys))
        uris = [spec.key_uri(k) for k, ok in zip(keys, present) if ok]
        spec = replace(spec, rows=len(uris), sample=tuple(uris[:SAMPLED_IMAGES]))
        found = wanted[np.asarray(present, dtype=bool)]
        tables = image_tables(uris)
    else:
        if input_shape is None:
            input_shape = input_shape_for(spec)
        columns = [spec.column] + (["label"] if spec.has_label else [])
        tables = [winning_rows(read_rows(spec, wanted, columns), spec, input_shape)]
        found = id_utils.to_numpy(tables[0].column("id"), spec.id_type)
    got_ids, x, labels, input_shape = decode_tables(tables, spec, input_shape, uri)
    if skip_undecodable:
        id_utils.find(found, wanted, uri)  # an id not in the pool at all is still bad input
        wanted = wanted[np.isin(wanted, got_ids)]
    take = id_utils.find(got_ids, wanted, uri)
    return got_ids[take], x[take], None if labels is None else labels[take], input_shape
