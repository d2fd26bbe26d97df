"""The labeled rows of a pool as a Ray Dataset for training, read and decoded on Ray
tasks, never through the driver (DESIGN §1).

    labeled ids -> read tasks, a few per CPU, over units (ids whose position is known,
    e.g. from a selection: a row group holding some, reading just those rows; other ids:
    a parquet file, id filter on each row group that can hold a labeled id; image files:
    exactly the labeled keys)
    -> decode_batch (CPU tasks) -> materialize (object store) -> id, index, label, x

A cycle's training thus reads the row groups that hold its labels, not the pool; a
labeled set without positions (``train --labeled``) is found by id.

The driver holds the labeled ids and labels (O(labels)) and, after the read, each
labeled row's id, file and row position (no data), from which it decides which row
stands for each id (the earliest good one, by file then row, as in scoring) and each
id's ``index``: its position in the labeled-id list, i.e. its row in the TD table.

A labeled id that is not in the pool at all is bad input (the pool changed under the
labels). A labeled id whose rows are all undecodable (bad bytes, NaN features, wrong
length) is left out of training, counted in ``LabeledRows.rejected`` with the first
one named, and warned about on stderr, as scoring rejects bad rows.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import decode_batch
from tidal_ray.errors import BadInput
from tidal_ray.data.lookup import POSITION_COLUMNS, encode_positions, group_rows, position_units, rows_with_ids
from tidal_ray.data.listing import image_keys_present
from tidal_ray.data.read import TASKS_PER_CPU
from tidal_ray.data.pool import PoolSpec, describe_pool

READ_CPUS = 0.25      # read + decode tasks, fractional so training workers keep room


@dataclass
class LabeledRows:
    ids: np.ndarray            # the training order: ids[i] is row i of the TD table
    labels: np.ndarray         # int64, aligned with ids
    input_shape: tuple[int, ...]
    dataset: object            # ray.data.Dataset of {id, index, label, x}
    rejected: int              # labeled ids left out: every row of theirs undecodable
    first_rejected: str | None  # "id: reason" of the first of them


def _decoded(table: pa.Table, rows: np.ndarray, file: int, spec: PoolSpec, input_shape) -> dict:
    """Good rows and rejects of one read table: ``id, x, position, reason`` ("" when good)."""
    good, rejects = decode_batch(table, spec, input_shape, {})
    bad = len(rejects["id"])
    string = id_utils.is_string(spec.id_type)
    bad_ids = np.array([("" if string else 0) if i is None else i for i in rejects["id"]],
                       dtype=str if string else np.int64)
    x = np.concatenate([good["x"], np.zeros((bad, *input_shape), good["x"].dtype)]) if bad else good["x"]
    good_positions = encode_positions(file, rows[good["row"]])
    return {"id": np.concatenate([good["id"], bad_ids]), "x": x,
            "position": np.concatenate([good_positions, np.full(bad, -1, np.int64)]),
            "reason": np.concatenate([np.full(len(good["id"]), "", dtype=object),
                                      rejects["reason"].astype(object)]).astype(str)}


def _read_parquet_units(batch: pa.Table, wanted: pa.Array, unplaced: pa.Array, spec: PoolSpec, input_shape):
    """One read task: each unit's labeled rows, decoded. A unit is a row group and the
    rows of it to read (``row_group`` >= 0; rows not holding a labeled id, as in a pool
    changed since, are dropped), or a whole file searched for the ``unplaced`` ids."""
    for unit in batch.to_pylist():
        file, uri = unit["file"], unit["uri"]
        if unit["row_group"] < 0:
            for table, rows in rows_with_ids(uri, unplaced, ["id", spec.column]):
                yield _decoded(table, rows, file, spec, input_shape)
            continue
        rows = np.asarray(unit["rows"], np.int64)
        table = group_rows(uri, unit["row_group"], rows, ["id", spec.column])
        ours = pc.is_in(table.column("id").cast(wanted.type), value_set=wanted).fill_null(False).to_numpy(
            zero_copy_only=False)
        if ours.any():
            yield _decoded(table.filter(pa.array(ours)), rows[ours], file, spec, input_shape)


def _decode_files(table: pa.Table, numbers: dict[str, int], spec: PoolSpec, input_shape) -> dict:
    """Image files, decoded; a file's number (by path, in ``numbers``) stands for its row."""
    files = np.array([numbers[p] for p in table.column("path").to_pylist()], np.int64)
    return _decoded(table, files, 0, spec, input_shape)


def _read_dataset(spec: PoolSpec, wanted: pa.Array, input_shape, positions: pa.Table | None):
    import ray.data

    # At most one read task per CPU at a time: a task decodes on a whole core, and fractional
    # CPUs alone let Ray start four worker processes per core, whose start-up then costs
    # more than the reads (10M-row pool, 2 CPUs: 6-7 s against 3 s; 1,000 PNG files: 3.2 s
    # against 2.0 s; benchmarks/README). The tasks still ask for READ_CPUS each.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1.0)))
    if spec.format == "files":
        keys = wanted.to_pylist()  # asked for one by one: the prefix may hold millions more
        paths = sorted(storage.resolve(spec.key_uri(k))[1]
                       for k, ok in zip(keys, image_keys_present(spec, keys)) if ok)
        if not paths:
            return None
        filesystem = storage.s3_filesystem() if storage.is_s3(spec.uri) else None
        tasks = min(len(paths), TASKS_PER_CPU * cpus)  # fewer tasks than the cap: Ray warns
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem, num_cpus=READ_CPUS,
                                        override_num_blocks=tasks, concurrency=min(tasks, cpus))
        return ds.map_batches(_decode_files, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
                              concurrency=min(tasks, cpus),
                              fn_kwargs={"numbers": {p: i for i, p in enumerate(paths)}, "spec": spec.slim(),
                                         "input_shape": input_shape})
    placed = np.zeros(len(wanted), bool)
    units = []
    if positions is not None and positions.num_rows:
        have = id_utils.to_numpy(wanted, spec.id_type)
        known = positions.filter(pa.array(id_utils.is_member(
            np.sort(have), id_utils.to_numpy(positions.column("id").cast(spec.id_type), spec.id_type))))
        placed = id_utils.is_member(np.unique(id_utils.to_numpy(known.column("id").cast(spec.id_type), spec.id_type)),
                                    have)
        units = [{"uri": spec.files[f][0], "file": f, "row_group": g, "rows": rows.tolist()}
                 for f, g, rows in position_units(*(known.column(c).to_numpy() for c in POSITION_COLUMNS))]
    unplaced = wanted.filter(pa.array(~placed))
    if len(unplaced):
        units += [{"uri": uri, "file": i, "row_group": -1, "rows": []} for i, (uri, _) in enumerate(spec.files)]
    if not units:
        return None
    # Units share tasks (a task costs more than reading a unit's few rows): a few per CPU.
    tasks = min(len(units), TASKS_PER_CPU * cpus)
    ds = ray.data.from_items(units, override_num_blocks=tasks)
    return ds.map_batches(_read_parquet_units, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                          concurrency=min(tasks, cpus),
                          fn_kwargs={"wanted": wanted, "unplaced": unplaced, "spec": spec.slim(),
                                     "input_shape": input_shape})


def _attach_index_and_label(batch: dict, positions: np.ndarray, index: np.ndarray, labels: np.ndarray) -> dict:
    """Keep the rows that stand for their id (at ``positions``, sorted) and give them
    their TD index and label."""
    keep = (batch["reason"] == "") & id_utils.is_member(positions, batch["position"])
    at = np.searchsorted(positions, batch["position"][keep])
    return {"id": batch["id"][keep], "index": index[at], "label": labels[at], "x": batch["x"][keep]}


def labeled_rows(pool_uri: str, ids, labels, input_shape=None, spec: PoolSpec | None = None,
                 positions: pa.Table | None = None) -> LabeledRows:
    """The rows of ``ids`` in the pool as a training dataset (``labels`` aligned with
    ``ids``; ``input_shape`` defaults to the pool's own). ``positions`` (``id, file,
    row_group, row``: where a selection or the initial draw found them) are read
    directly; ids without one are found by id."""
    from tidal_ray.data.pool import input_shape_for
    from tidal_ray.runtime import init_ray

    spec = spec or describe_pool(pool_uri)
    wanted = id_utils.from_user(ids, spec.id_type, pool_uri)
    ids = id_utils.to_numpy(wanted, spec.id_type)
    labels = np.asarray(labels, dtype=np.int64)
    id_utils.check_unique(ids, "the labeled set")
    input_shape = tuple(int(d) for d in (input_shape or input_shape_for(spec)))

    init_ray()
    read = _read_dataset(spec, wanted, input_shape, positions)
    read = read.materialize() if read is not None else None
    # What the driver sees of the read: ids, positions and reasons, no data.
    tables = [] if read is None or read.count() == 0 else \
        list(read.select_columns(["id", "position", "reason"]).iter_batches(batch_size=None, batch_format="pyarrow"))
    tables = [t for t in tables if t.num_rows]
    found = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], spec.id_type),
                                                              "position": pa.array([], pa.int64()),
                                                              "reason": pa.array([], pa.string())})
    found_ids = id_utils.to_numpy(found.column("id"), spec.id_type)
    position = found.column("position").to_numpy()
    reason = found.column("reason").to_numpy(zero_copy_only=False).astype(str)
    missing = ~np.isin(ids, found_ids)
    if missing.any():
        raise BadInput(f"{int(missing.sum())} labeled id(s) not found in {pool_uri} (e.g. {ids[missing].tolist()[0]!r})")

    winners = id_utils.earliest_rows(found_ids, position, reason == "")  # the earliest good row of each id
    kept = id_utils.is_member(np.sort(found_ids[winners]), ids)
    rejected = ids[~kept]
    first_rejected = None
    if len(rejected):
        i = int(np.flatnonzero(found_ids == rejected[0])[0])
        first_rejected = f"{rejected.tolist()[0]!r}: {reason[i]}"
        print(f"training: left out {len(rejected)} labeled id(s) whose rows in {pool_uri} cannot be decoded "
              f"(first: {first_rejected})", file=sys.stderr)
    ids, labels = ids[kept], labels[kept]
    if len(ids) == 0:
        raise BadInput(f"none of the labeled rows in {pool_uri} can be decoded (e.g. {first_rejected})")
    winner = position[winners][id_utils.find(found_ids[winners], ids, pool_uri)]  # aligned with ids
    by_position = np.argsort(winner)
    dataset = read.map_batches(_attach_index_and_label, batch_format="numpy", num_cpus=READ_CPUS,
                               fn_kwargs={"positions": winner[by_position], "index": by_position.astype(np.int64),
                                          "labels": labels[by_position]})
    return LabeledRows(ids, labels, input_shape, dataset, len(rejected), first_rejected)


def read_labeled_set(uri: str) -> tuple[np.ndarray, np.ndarray, PoolSpec]:
    """A labeled set's ``id`` and ``label`` columns only (for ``train --labeled``):
    ``(ids, labels, spec)``, the first row of a repeated id winning, a null label as -1
    (refused later as out of range); rows with a null id are left out."""
    from tidal_ray.data.loader import iter_tables

    if not storage.exists(uri):
        raise BadInput(f"labeled set not found: {uri}")
    spec = describe_pool(uri)
    if spec.format == "files" or not spec.has_label:
        raise BadInput(f"labeled set {uri} has no label column")
    parts_ids, parts_labels = [], []
    for table in iter_tables(spec, ["id", "label"]):
        table = table.filter(table.column("id").is_valid())
        parts_ids.append(id_utils.to_numpy(table.column("id").cast(spec.id_type), spec.id_type))
        parts_labels.append(table.column("label").cast(pa.int64()).fill_null(-1).to_numpy())
    ids = np.concatenate(parts_ids) if parts_ids else id_utils.empty(spec.id_type)
    labels = np.concatenate(parts_labels) if parts_labels else np.empty(0, np.int64)
    first = id_utils.SeenIds().first_seen(ids)
    if not first.any():
        raise BadInput(f"labeled set {uri} has no rows")
    return ids[first], labels[first], spec
