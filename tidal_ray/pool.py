"""Pools (DESIGN §2): format detection and schema checks before any work, and decoding
as pure functions over one batch, so Ray Data tasks and in-process code share them.

A pool is a prefix (``s3://...`` or a local directory) or a single file holding one of:
- parquet ``id`` + ``pixels``: raw uint8 bytes, the shape in the schema metadata
  under ``tidal_ray.shape`` (e.g. ``3x32x32``);
- parquet ``id`` + ``image``: PNG/JPEG bytes;
- parquet ``id`` + ``features``: a (fixed-size) list of floats;
- image files ``*.png|*.jpg|*.jpeg``; the id is the key relative to the prefix.
An optional ``label`` column feeds the simulated oracle; scoring never reads it.
"""
from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage

SHAPE_KEY = b"tidal_ray.shape"
CLASSES_KEY = b"tidal_ray.num_classes"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PARQUET_SUFFIX = ".parquet"
DATA_COLUMNS = ("pixels", "image", "features")
FORMATS = ("pixels", "image", "features", "files")

# Reject reasons. Details may follow after ": " (grouping uses the part before it).
NULL_ID = "null id"
DUPLICATE_ID = "duplicate id"
UNDECODABLE = "undecodable image"
WRONG_LENGTH = "wrong tensor length"
NOT_FINITE = "NaN/inf features"
WRONG_SIZE = "wrong image size"


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def format_shape(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise ValueError(f"bad shape {text!r}; expected e.g. 3x32x32")
    return shape


# ---- detection and validation -------------------------------------------------------------


@dataclass(frozen=True)
class PoolSpec:
    uri: str
    format: str                         # one of FORMATS
    files: tuple[tuple[str, int], ...]  # (uri, size), sorted by uri
    id_type: pa.DataType                # int64 or string
    rows: int                           # from parquet footers (image files: one row each)
    shape: tuple[int, ...] | None       # pixels: from the metadata; features: (D,) for fixed-size lists
    root: str = ""                      # filesystem path that image-file ids are relative to
    has_label: bool = False
    num_classes: int | None = None      # declared in the schema metadata, if any
    max_label: int | None = None        # from parquet statistics, if every row group has them

    @property
    def column(self) -> str:
        """The data column as read: ``bytes`` for image files (Ray's read_binary_files)."""
        return "bytes" if self.format == "files" else self.format

    def slim(self) -> PoolSpec:
        """What decode tasks need: everything but the file list, which can be very long."""
        return replace(self, files=())

    def key_uri(self, key: str) -> str:
        """The URI of an image file from its id."""
        return ("s3://" if storage.is_s3(self.uri) else "") + self.root.rstrip("/") + "/" + key

    def fs_paths(self) -> list[str]:
        return [storage.resolve(uri)[1] for uri, _ in self.files]

    def file_index(self) -> dict[str, int]:
        """Filesystem path (as Ray's ``include_paths`` gives it) -> index into ``files``.
        Empty for image files, whose id names the file."""
        if self.format == "files":
            return {}
        return {path: i for i, path in enumerate(self.fs_paths())}

    def file_name(self, index: int, sample_id) -> str:
        if self.format == "files" and sample_id is not None:
            return self.key_uri(str(sample_id))
        return self.files[index][0] if 0 <= index < len(self.files) else self.uri


def _kind_of_file(uri: str) -> str:
    lower = uri.lower()
    if lower.endswith(PARQUET_SUFFIX):
        return "parquet"
    if lower.endswith(IMAGE_SUFFIXES):
        return "image"
    raise ValueError(f"{uri}: unknown file type in pool (expected *.parquet, or *.png|*.jpg|*.jpeg image files)")


def list_pool_files(uri: str) -> list[tuple[str, int]]:
    try:
        files = storage.list_files(uri)
    except (FileNotFoundError, OSError):
        files = []
    if not files:
        raise ValueError(f"no pool at {uri}: the prefix does not exist or holds no files")
    return files


def is_image_prefix(uri: str) -> bool:
    """True when the pool is image files under a prefix (ids are keys relative to it)."""
    return all(_kind_of_file(f) == "image" for f, _ in list_pool_files(uri))


def _id_kind(t: pa.DataType) -> str | None:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


def _check_parquet_file(uri: str, schema: pa.Schema) -> dict:
    """This file's format facts, or a ValueError naming the file and the problem."""
    names = schema.names
    if "id" not in names:
        raise ValueError(f"{uri}: no 'id' column (columns: {', '.join(names)})")
    id_kind = _id_kind(schema.field("id").type)
    if id_kind is None:
        raise ValueError(f"{uri}: column 'id' is {schema.field('id').type}; expected an integer or a string")
    present = [c for c in DATA_COLUMNS if c in names]
    if not present:
        raise ValueError(f"{uri}: unknown format: no 'pixels', 'image' or 'features' column (columns: {', '.join(names)})")
    if len(present) > 1:
        raise ValueError(f"{uri}: mixed formats in one file: columns {' and '.join(present)}")
    fmt, t = present[0], schema.field(present[0]).type
    shape = None
    if fmt in ("pixels", "image") and not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                           or pa.types.is_fixed_size_binary(t)):
        raise ValueError(f"{uri}: column '{fmt}' is {t}; expected binary")
    if fmt == "pixels":
        raw = (schema.metadata or {}).get(SHAPE_KEY)
        if raw is None:
            raise ValueError(f"{uri}: 'pixels' without the {SHAPE_KEY.decode()} schema metadata (e.g. 3x32x32)")
        shape = parse_shape(raw.decode())
    if fmt == "features":
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                or not pa.types.is_floating(t.value_type):
            raise ValueError(f"{uri}: column 'features' is {t}; expected a list of float32")
        if pa.types.is_fixed_size_list(t):
            shape = (t.list_size,)
    label = "label" in names
    if label and not pa.types.is_integer(schema.field("label").type):
        raise ValueError(f"{uri}: column 'label' is {schema.field('label').type}; expected integers")
    classes = (schema.metadata or {}).get(CLASSES_KEY)
    return {"format": fmt, "id_kind": id_kind, "shape": shape, "label": label,
            "num_classes": int(classes) if classes else None}


def _max_label(metadata: pq.FileMetaData) -> int | None:
    names = metadata.schema.names
    if "label" not in names or metadata.num_rows == 0:
        return None
    col = names.index("label")
    best = None
    for g in range(metadata.num_row_groups):
        stats = metadata.row_group(g).column(col).statistics
        if stats is None or not stats.has_min_max:
            return None
        best = stats.max if best is None else max(best, stats.max)
    return None if best is None else int(best)


def _read_footer(uri: str):
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{uri}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def describe_pool(uri: str) -> PoolSpec:
    """Detect the pool's format and check every file's schema; reads footers only."""
    files = list_pool_files(uri)
    kinds = [_kind_of_file(f) for f, _ in files]
    if len(set(kinds)) > 1:
        first_image = files[kinds.index("image")][0]
        raise ValueError(f"{first_image}: mixed formats under {uri}: image files next to parquet files")
    if kinds[0] == "image":
        _, root = storage.resolve(uri)
        if len(files) == 1 and storage.resolve(files[0][0])[1] == root:
            root = os.path.dirname(root)  # the pool is one file
        return PoolSpec(uri, "files", tuple(files), pa.string(), len(files), None, root=root)

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(_read_footer, [f for f, _ in files]))
    facts = [_check_parquet_file(f, schema) for (f, _), (schema, _) in zip(files, footers)]
    first, first_uri = facts[0], files[0][0]
    for (f, _), fact in zip(files, facts):
        if fact["format"] != first["format"]:
            raise ValueError(f"{f}: mixed formats: '{fact['format']}' here, '{first['format']}' in {first_uri}")
        if fact["id_kind"] != first["id_kind"]:
            raise ValueError(f"{f}: mixed id types: {fact['id_kind']} ids here, {first['id_kind']} ids in {first_uri}")
        if fact["shape"] != first["shape"]:
            raise ValueError(f"{f}: mixed shapes: {format_shape(fact['shape'] or ())} here, "
                             f"{format_shape(first['shape'] or ())} in {first_uri}")
    declared = {fact["num_classes"] for fact in facts} - {None}
    maxima = [_max_label(meta) for _, meta in footers]
    max_label = None if any(m is None for m, fact in zip(maxima, facts) if fact["label"]) \
        else max((m for m in maxima if m is not None), default=None)
    return PoolSpec(
        uri=uri, format=first["format"], files=tuple(files),
        id_type=pa.int64() if first["id_kind"] == "int" else pa.string(),
        rows=sum(meta.num_rows for _, meta in footers), shape=first["shape"],
        has_label=any(fact["label"] for fact in facts),
        num_classes=max(declared) if declared else None, max_label=max_label,
    )


def check_compatible(spec: PoolSpec, input_shape, num_classes: int, checkpoint_uri: str = "the checkpoint") -> None:
    """Fail early when a checkpoint cannot score this pool (shape or class count)."""
    input_shape = tuple(int(d) for d in input_shape)
    expects = f"{checkpoint_uri} expects {format_shape(input_shape)} inputs"
    if spec.format == "pixels" and spec.shape != input_shape:
        raise ValueError(f"{spec.uri}: pool rows are {format_shape(spec.shape)} pixels but {expects}")
    if spec.format == "features":
        if len(input_shape) != 1:
            raise ValueError(f"{spec.uri}: pool rows are feature vectors but {expects}")
        if spec.shape is not None and spec.shape != input_shape:
            raise ValueError(f"{spec.uri}: pool rows are {spec.shape[0]} features but {expects}")
    if spec.format in ("image", "files"):
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise ValueError(f"{spec.uri}: pool rows are images but {expects}")
        sampled = _sample_image_shapes(spec, input_shape[0])
        if sampled and input_shape not in sampled:
            raise ValueError(f"{spec.uri}: pool images are {format_shape(sampled[0])} but {expects}")
    if spec.num_classes is not None and spec.num_classes != num_classes:
        raise ValueError(f"{spec.uri}: the pool declares {spec.num_classes} classes, "
                         f"{checkpoint_uri} has {num_classes}")
    if spec.max_label is not None and spec.max_label >= num_classes:
        raise ValueError(f"{spec.uri}: the pool has label {spec.max_label}, "
                         f"{checkpoint_uri} has only {num_classes} classes")


def _sample_image_shapes(spec: PoolSpec, channels: int, n: int = 8) -> list[tuple[int, ...]]:
    """Shapes of the first few decodable images: a pool whose images are all another size
    is a mismatch to report up front, not a pool of bad rows."""
    if spec.format == "files":
        blobs = [storage.read_bytes(f) for f, _ in spec.files[:n]]
    else:
        fs, path = storage.resolve(spec.files[0][0])
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_row_groups == 0:
                return []
            blobs = pf.read_row_group(0, columns=["image"]).column("image").to_pylist()[:n]
    shapes = []
    for blob in blobs:
        try:
            shapes.append(decode_image(blob, channels).shape)
        except ValueError:
            pass
    return shapes


# ---- decoding ------------------------------------------------------------------------------


def _image_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def decode_image(blob, channels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 ``(C, H, W)``; ValueError when undecodable."""
    from PIL import Image

    if blob is None:
        raise ValueError(UNDECODABLE)
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert(_image_mode(channels))
            arr = np.asarray(img, dtype=np.uint8)
    except Exception:  # Pillow raises many types for corrupt data
        raise ValueError(UNDECODABLE) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _table(batch) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    return pa.table({k: pa.array(v) if not isinstance(v, (pa.Array, pa.ChunkedArray)) else v
                     for k, v in batch.items()})


def _array(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _contiguous_bytes(arr: pa.Array, row_bytes: int) -> np.ndarray:
    """The values of a binary array whose rows all hold ``row_bytes`` bytes, zero-copy."""
    if len(arr) == 0:
        return np.empty(0, dtype=np.uint8)
    if pa.types.is_fixed_size_binary(arr.type):
        arr = arr.cast(pa.binary())
    offsets_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, dtype=offsets_type)[arr.offset: arr.offset + len(arr) + 1]
    return np.frombuffer(data, dtype=np.uint8)[offsets[0]: offsets[-1]]


def _ids_of(table: pa.Table, spec: PoolSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, null)``; null ids are filled (0 or "") and flagged."""
    if spec.format == "files":
        root = spec.root.rstrip("/") + "/"
        paths = _array(table, "path").to_pylist()
        return np.array([p[len(root):] if p.startswith(root) else os.path.basename(p) for p in paths], dtype=str), \
            np.zeros(len(paths), dtype=bool)
    ids = _array(table, "id")
    null = ids.is_null().to_numpy(zero_copy_only=False)
    if spec.id_type == pa.string():
        return ids.cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False).astype(str), null
    return ids.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), null


def _file_indices(table: pa.Table, spec: PoolSpec, file_index: dict[str, int] | None) -> np.ndarray:
    if "path" not in table.column_names or table.num_rows == 0 or spec.format == "files":
        return np.full(table.num_rows, -1, dtype=np.int32)
    index = file_index if file_index is not None else spec.file_index()
    paths = _array(table, "path")
    uniq = pc.unique(paths).to_pylist()
    codes = pc.index_in(paths, value_set=pa.array(uniq, paths.type)).to_numpy(zero_copy_only=False)
    return np.array([index.get(p, -1) for p in uniq], dtype=np.int32)[codes]


def decode_batch(batch, spec: PoolSpec, input_shape, file_index: dict[str, int] | None = None) -> tuple[dict, dict]:
    """Decode one batch of pool rows.

    ``batch``: a pyarrow table (or dict of columns) with ``id`` and the data column
    (image files: ``bytes``), and ``path`` when known. ``input_shape`` is what the model
    takes. Returns ``(good, rejects)``: good ``{"id", "x", "file", "row"}`` and rejects
    ``{"id", "file", "reason"}``, where ``file`` indexes ``spec.files`` (-1 if unknown),
    ``row`` is the row's position in ``batch`` and a null id is ``None``. Pure: no I/O."""
    table = _table(batch)
    input_shape = tuple(int(d) for d in input_shape)
    ids, null_id = _ids_of(table, spec)
    files = _file_indices(table, spec, file_index)
    reasons = np.where(null_id, NULL_ID, "").astype(object)
    data = _array(table, spec.column)

    if spec.format == "pixels":
        row_bytes = int(np.prod(input_shape))
        lengths = pc.binary_length(data).fill_null(-1).to_numpy(zero_copy_only=False)
        wrong = (reasons == "") & (lengths != row_bytes)
        reasons[wrong] = [f"{WRONG_LENGTH}: {n_} bytes, expected {row_bytes}" for n_ in lengths[wrong]]
        good = reasons == ""
        x = _contiguous_bytes(data.filter(pa.array(good)), row_bytes).reshape(-1, *input_shape)
    elif spec.format == "features":
        dim = input_shape[0]
        lengths = pc.list_value_length(data).fill_null(-1).to_numpy(zero_copy_only=False)
        wrong = (reasons == "") & (lengths != dim)
        reasons[wrong] = [f"{WRONG_LENGTH}: {n_} features, expected {dim}" for n_ in lengths[wrong]]
        candidates = np.flatnonzero(reasons == "")
        values = data.filter(pa.array(reasons == "")).flatten()
        x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        finite = np.isfinite(x).all(axis=1)
        reasons[candidates[~finite]] = NOT_FINITE
        x = x[finite] if not finite.all() else x
        good = reasons == ""
    else:  # PNG/JPEG bytes, in parquet or as files
        blobs = data.to_pylist()
        decoded = []
        for i in np.flatnonzero(reasons == ""):
            try:
                img = decode_image(blobs[i], input_shape[0])
            except ValueError as e:
                reasons[i] = str(e)
                continue
            if img.shape != input_shape:
                reasons[i] = f"{WRONG_SIZE}: {format_shape(img.shape[1:])}, expected {format_shape(input_shape[1:])}"
                continue
            decoded.append(img)
        good = reasons == ""
        x = np.stack(decoded) if decoded else np.empty((0, *input_shape), dtype=np.uint8)

    bad = ~good
    reject_ids = ids[bad].astype(object)
    reject_ids[null_id[bad]] = None
    return ({"id": ids[good], "x": x, "file": files[good], "row": np.flatnonzero(good)},
            {"id": reject_ids, "file": files[bad], "reason": reasons[bad].astype(str)})


def stream_batch(good: dict, rejects: dict, input_shape, dtype) -> dict:
    """Good rows and rejects as one batch (for Ray Data): ``reason`` is "" for good rows,
    rejects carry zero inputs and a filled id (0 or "") when theirs was null."""
    n_bad = len(rejects["id"])
    ids = good["id"]
    if n_bad:
        fill = "" if ids.dtype.kind in "US" else 0
        bad_ids = np.array([fill if i is None else i for i in rejects["id"]],
                           dtype=ids.dtype if ids.dtype.kind not in "US" else str)
        ids = np.concatenate([ids, bad_ids]) if len(ids) else bad_ids
    x = good["x"]
    if n_bad:
        x = np.concatenate([x, np.zeros((n_bad, *input_shape), dtype=x.dtype if len(x) else dtype)])
    return {
        "id": ids,
        "x": x,
        "file": np.concatenate([good["file"], rejects["file"]]).astype(np.int32),
        "reason": np.concatenate([np.full(len(good["id"]), "", dtype=object), rejects["reason"].astype(object)]).astype(str),
    }


def input_dtype(spec: PoolSpec):
    return np.float32 if spec.format == "features" else np.uint8


# ---- reading whole (small) pools into memory -----------------------------------------------


def iter_tables(spec: PoolSpec, columns: list[str] | None = None, batch_rows: int = 65536):
    """The pool as tables in pool order, reading only ``columns`` (plus ``path``)."""
    if spec.format == "files":
        for start in range(0, len(spec.files), batch_rows):
            chunk = spec.files[start:start + batch_rows]
            paths = [storage.resolve(f)[1] for f, _ in chunk]
            yield pa.table({"bytes": [storage.read_bytes(f) for f, _ in chunk], "path": paths})
        return
    for uri, _ in spec.files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
                table = pa.Table.from_batches([rb])
                yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


def _natural_shape(spec: PoolSpec) -> tuple[int, ...]:
    if spec.shape is not None:
        return spec.shape
    if spec.format == "features":
        for table in iter_tables(spec, ["features"]):
            lengths = pc.list_value_length(_array(table, "features")).drop_null()
            if len(lengths):
                return (int(lengths[0].as_py()),)
        raise ValueError(f"{spec.uri}: no feature vector found")
    for table in iter_tables(spec, ["image"] if spec.format == "image" else None, batch_rows=64):
        for blob in _array(table, spec.column).to_pylist():
            try:
                from PIL import Image

                with Image.open(io.BytesIO(blob)) as img:
                    channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
                return decode_image(blob, channels).shape
            except Exception:
                continue
    raise ValueError(f"{spec.uri}: no decodable image found")


def _as_id_array(ids, id_type: pa.DataType, uri: str) -> pa.Array:
    values = list(ids)
    try:
        if id_type == pa.string():
            return pa.array([str(v) for v in values], pa.string())
        return pa.array([int(v) for v in values], pa.int64())
    except (TypeError, ValueError):
        raise ValueError(f"ids must be {'strings' if id_type == pa.string() else 'integers'} "
                         f"to match the pool {uri}") from None


def load_rows(uri: str, ids=None):
    """A small pool or labeled set in memory, decoded: ``(ids, x, labels or None, input_shape)``.

    With ``ids``, only those rows, in the order given (ValueError if one is missing).
    Rows that cannot be decoded are skipped with a one-line warning on stderr; for
    duplicate ids the first row wins."""
    spec = describe_pool(uri)
    wanted = None if ids is None else _as_id_array(ids, spec.id_type, uri)
    if wanted is not None and spec.format == "files":
        root = spec.root.rstrip("/") + "/"
        keys = set(wanted.to_pylist())
        spec = replace(spec, files=tuple(f for f in spec.files if storage.resolve(f[0])[1][len(root):] in keys))
    input_shape = _natural_shape(spec) if spec.files else (0,)
    columns = None if spec.format == "files" else ["id", spec.column] + (["label"] if spec.has_label else [])
    file_index = spec.file_index()
    parts_ids, parts_x, parts_labels, skipped = [], [], [], []
    for table in iter_tables(spec, columns):
        if wanted is not None and spec.format != "files":
            table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        good, rejects = decode_batch(table, spec, input_shape, file_index)
        skipped += [(spec.file_name(f, i), r) for f, i, r in zip(rejects["file"], rejects["id"], rejects["reason"])]
        parts_ids.append(good["id"])
        parts_x.append(good["x"])
        if spec.has_label:
            labels = _array(table, "label").take(pa.array(good["row"]))
            parts_labels.append(labels.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False))
    if skipped:
        print(f"load_rows: skipped {len(skipped)} bad row(s) in {uri} (first: {skipped[0][0]}: {skipped[0][1]})",
              file=sys.stderr)
    empty_ids = np.array([], dtype=str if spec.id_type == pa.string() else np.int64)
    all_ids = np.concatenate(parts_ids) if parts_ids else empty_ids
    x = np.concatenate(parts_x) if parts_x else np.empty((0, *input_shape), dtype=input_dtype(spec))
    labels = np.concatenate(parts_labels) if spec.has_label and parts_labels else None

    _, first = np.unique(all_ids, return_index=True)  # duplicate ids: the first row wins
    first = np.sort(first)
    all_ids, x = all_ids[first], x[first]
    labels = None if labels is None else labels[first]
    if wanted is not None:
        position = {v: i for i, v in enumerate(all_ids.tolist())}
        requested = wanted.to_pylist()
        missing = [v for v in requested if v not in position]
        if missing:
            raise ValueError(f"{len(missing)} requested id(s) not found in {uri} (e.g. {missing[0]!r})")
        take = np.array([position[v] for v in requested], dtype=np.int64)
        all_ids, x = all_ids[take], x[take]
        labels = None if labels is None else labels[take]
    return all_ids, x, labels, tuple(input_shape)


def pool_has_ids(uri: str, candidates) -> set[str]:
    """Which of ``candidates`` (as strings) are ids in the pool; reads the ids only."""
    spec = describe_pool(uri)
    candidates = [str(c) for c in candidates]
    if spec.format == "files":
        root = spec.root.rstrip("/") + "/"
        keys = {storage.resolve(f)[1][len(root):] for f, _ in spec.files}
        return {c for c in candidates if c in keys}
    if spec.id_type == pa.string():
        value_set = pa.array(candidates, pa.string())
    else:
        value_set = pa.array([int(c) for c in candidates if _is_int(c)], pa.int64())
    found: set[str] = set()
    for table in iter_tables(spec, ["id"]):
        ids = _array(table, "id").cast(spec.id_type)
        found.update(str(v) for v in ids.filter(pc.is_in(ids, value_set=value_set)).to_pylist())
    return {c for c in candidates if c in found or (_is_int(c) and str(int(c)) in found)}


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
