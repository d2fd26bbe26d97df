"""Decoding pool rows: pure functions of one batch, shared by scoring, training and
the in-memory loader, so Ray Data tasks and in-process code decode alike.

A batch is a pyarrow table (or a dict of columns) with ``id``, the pool's data column
(``pixels``, ``image``, ``features``; ``bytes`` for image files) and ``path`` when
known. Rows that cannot be decoded are not errors: they come back as rejects with a
reason, so a job never crashes on a bad row and never loses one silently.
"""
from __future__ import annotations

import io
import os
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidal_ray.data import ids as id_utils
from tidal_ray.errors import BadInput

# Reject reasons. Details may follow after ": " (grouping uses the part before it).
NULL_ID = "null id"
DUPLICATE_ID = "duplicate id"
UNDECODABLE = "undecodable image"
WRONG_LENGTH = "wrong tensor length"
NOT_FINITE = "NaN/inf features"


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def is_decoded(reasons) -> np.ndarray:
    """The rows whose ``reason`` is "" (decoded), of an Arrow or NumPy column, as a mask."""
    if isinstance(reasons, (pa.Array, pa.ChunkedArray)):
        return pc.equal(reasons, "").to_numpy(zero_copy_only=False)
    return np.asarray(reasons) == ""


def numpy_column(batch, name: str) -> np.ndarray:
    """A column of an Arrow table or of a dict of columns, as NumPy."""
    values = batch[name]
    return values.to_numpy(zero_copy_only=False) if isinstance(values, (pa.Array, pa.ChunkedArray)) \
        else np.asarray(values)


def format_shape(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in str(text).lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise BadInput(f"bad shape {text!r}; expected e.g. 3x32x32")
    return shape


def _on_white(img):
    """Any mode with transparency, composited on white (a labeler sees the same)."""
    from PIL import Image

    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_channels(img, channels: int):
    """Any PIL mode -> ``L`` (1 channel) or ``RGB`` (3): alpha on white, palette and
    CMYK through RGB, 16/32-bit and float grayscale scaled to 0..255."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = _on_white(img)
    return img.convert("L" if channels == 1 else "RGB")


def _cover_and_crop(img, size: tuple[int, int]):
    """Resize so the image covers ``size`` (H, W) (the shorter side fits, for a square),
    then center-crop to it. Identity when the image already has that size."""
    from PIL import Image

    height, width = size
    if (img.height, img.width) == (height, width):
        return img
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_array(img, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PIL image -> uint8 ``(C, H, W)``: EXIF orientation applied, converted to
    ``channels``, resized and center-cropped to ``size`` when given."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    img = _to_channels(img, channels)
    if size is not None:
        img = _cover_and_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_image(blob, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 ``(C, H, W)`` (see ``to_array``); ValueError
    naming the reason when undecodable."""
    from PIL import Image

    if blob is None:
        raise ValueError(UNDECODABLE)
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if size is not None and img.format == "JPEG":
                side = max(size)  # before EXIF rotation, so either side may become the height
                img.draft(None, (side, side))  # JPEG's DCT scaling: big photos decode at 1/2..1/8
            return to_array(img, channels, size)
    except Exception:  # Pillow raises many types for corrupt data
        raise ValueError(UNDECODABLE) from None


def transform_pixels(x: np.ndarray, input_shape) -> np.ndarray:
    """Stored ``pixels`` rows ``(N, C, H, W)`` -> ``input_shape``: channels converted,
    resized and center-cropped, as image bytes would be. Identity when shapes agree."""
    from PIL import Image

    input_shape = tuple(int(d) for d in input_shape)
    if tuple(x.shape[1:]) == input_shape:
        return x
    if x.shape[1] not in (1, 3):
        raise BadInput(f"pixels of shape {format_shape(x.shape[1:])} cannot become {format_shape(input_shape)} "
                       f"(only 1- or 3-channel rows are converted)")
    out = np.empty((len(x), *input_shape), dtype=np.uint8)
    for i, row in enumerate(x):
        img = Image.fromarray(row[0] if row.shape[0] == 1 else row.transpose(1, 2, 0))
        out[i] = to_array(img, input_shape[0], input_shape[1:])
    return out


def augment_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training-only augmentation of uint8 images ``(N, C, H, W)``: a random crop of the
    image padded by an eighth of its size (zeros), and a horizontal flip with p = 1/2,
    as the reference code does on CIFAR. Feature vectors pass through unchanged."""
    if x.ndim != 4:
        return x
    n, _, height, width = x.shape
    pad = max(1, min(height, width) // 8)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    tops, lefts = rng.integers(0, 2 * pad + 1, size=n), rng.integers(0, 2 * pad + 1, size=n)
    flips = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, :, tops[i]:tops[i] + height, lefts[i]:lefts[i] + width]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def _table(batch) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    return pa.table({k: pa.array(v) if not isinstance(v, (pa.Array, pa.ChunkedArray)) else v
                     for k, v in batch.items()})


def column_array(table: pa.Table, name: str) -> pa.Array:
    """One column as a single Arrow array."""
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):  # one chunk: no copy (combine_chunks would make one)
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


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


def _ids_of(table: pa.Table, spec) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, null)``; null ids are filled (0 or "") and flagged."""
    if spec.format == "files":
        root = spec.root.rstrip("/") + "/"
        paths = column_array(table, "path").to_pylist()
        return np.array([p[len(root):] if p.startswith(root) else os.path.basename(p) for p in paths], dtype=str), \
            np.zeros(len(paths), dtype=bool)
    ids = column_array(table, "id")
    null = ids.is_null().to_numpy(zero_copy_only=False)
    return id_utils.to_numpy(ids.cast(spec.id_type).fill_null("" if id_utils.is_string(spec.id_type) else 0),
                             spec.id_type), null


def _file_indices(table: pa.Table, spec, file_index: dict[str, int] | None) -> np.ndarray:
    if "file" in table.column_names:  # read by position (read.py)
        return column_array(table, "file").to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    if "path" not in table.column_names or table.num_rows == 0 or spec.format == "files":
        return np.full(table.num_rows, -1, dtype=np.int32)
    index = file_index if file_index is not None else spec.file_index()
    paths = column_array(table, "path")
    uniq = pc.unique(paths).to_pylist()
    codes = pc.index_in(paths, value_set=pa.array(uniq, paths.type)).to_numpy(zero_copy_only=False)
    return np.array([index.get(p, -1) for p in uniq], dtype=np.int32)[codes]


def decode_batch(batch, spec, input_shape, file_index: dict[str, int] | None = None) -> tuple[dict, dict]:
    """Decode one batch of pool rows.

    ``batch``: a pyarrow table (or dict of columns) with ``id`` and the data column
    (image files: ``bytes``), and ``path`` when known. ``input_shape`` is what the model
    takes: images of any size and mode are brought to it (``decode_image``), stored
    pixels too when their shape differs (``transform_pixels``). Returns ``(good, rejects)``: good ``{"id", "x", "file", "row"}`` and rejects
    ``{"id", "file", "reason"}``, where ``file`` indexes ``spec.files`` (-1 if unknown),
    ``row`` is the row's position in ``batch`` and a null id is ``None``. Pure: no I/O."""
    table = _table(batch)
    input_shape = tuple(int(d) for d in input_shape)
    ids, null_id = _ids_of(table, spec)
    files = _file_indices(table, spec, file_index)
    # Reason strings are made for rejected rows only; ``ok`` tracks the rest.
    ok = ~null_id
    reasons = np.full(len(ids), "", dtype=object)
    reasons[null_id] = NULL_ID
    data = column_array(table, spec.column)

    if spec.format == "pixels":
        row_bytes = int(np.prod(spec.shape if spec.shape else input_shape))
        lengths = pc.binary_length(data).fill_null(-1).to_numpy(zero_copy_only=False)
        wrong = ok & (lengths != row_bytes)
        if wrong.any():
            reasons[wrong] = [f"{WRONG_LENGTH}: {n_} bytes, expected {row_bytes}" for n_ in lengths[wrong]]
            ok &= ~wrong
        stored = tuple(spec.shape) if spec.shape else input_shape
        x = _contiguous_bytes(data if ok.all() else data.filter(pa.array(ok)), row_bytes).reshape(-1, *stored)
        x = transform_pixels(x, input_shape)
    elif spec.format == "features":
        dim = input_shape[0]
        lengths = pc.list_value_length(data).fill_null(-1).to_numpy(zero_copy_only=False)
        wrong = ok & (lengths != dim)
        if wrong.any():
            reasons[wrong] = [f"{WRONG_LENGTH}: {n_} features, expected {dim}" for n_ in lengths[wrong]]
            ok &= ~wrong
        candidates = np.flatnonzero(ok)
        values = (data if ok.all() else data.filter(pa.array(ok))).flatten()
        x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            reasons[candidates[~finite]] = NOT_FINITE
            ok[candidates[~finite]] = False
            x = x[finite]
    else:  # PNG/JPEG bytes, in parquet or as files
        blobs = data.to_pylist()
        decoded = []
        for i in np.flatnonzero(ok):
            try:
                decoded.append(decode_image(blobs[i], input_shape[0], input_shape[1:]))
            except ValueError as e:
                reasons[i], ok[i] = str(e), False
        x = np.stack(decoded) if decoded else np.empty((0, *input_shape), dtype=np.uint8)

    good, bad = ok, ~ok
    reject_ids = ids[bad].astype(object)
    reject_ids[null_id[bad]] = None
    return ({"id": ids[good], "x": x, "file": files[good], "row": np.flatnonzero(good)},
            {"id": reject_ids, "file": files[bad], "reason": reasons[bad].astype(str)})


def tensor_column(x: np.ndarray) -> pa.FixedSizeListArray:
    """Rows of a tensor batch as one Arrow column, each row its values flattened."""
    x = np.ascontiguousarray(x)
    width = int(np.prod(x.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width)


def tensor_rows(column, shape) -> np.ndarray:
    """The inverse of ``tensor_column``: the values as an array of ``(rows, *shape)``,
    without a copy where Arrow allows one."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), *shape)


def stream_batch(good: dict, rejects: dict, input_shape, dtype) -> pa.Table:
    """Good rows and rejects as one Arrow table (for the scorer, in Ray Data or in
    process): ``id``, ``x`` (``tensor_column``), ``file`` and ``reason`` ("" for good
    rows); rejects carry zero inputs and a filled id (0 or "") when theirs was null.
    An Arrow table, not NumPy: Ray Data converts NumPy batches to Arrow with per-row
    Python work, which cost more than the model on a cheap one."""
    n_bad = len(rejects["id"])
    ids, x, files = good["id"], good["x"], good["file"].astype(np.int32, copy=False)
    reasons = pa.array(np.full(len(ids), "", dtype="U1"), pa.string())
    if n_bad:
        fill = "" if ids.dtype.kind in "US" else 0
        bad_ids = np.array([fill if i is None else i for i in rejects["id"]],
                           dtype=ids.dtype if ids.dtype.kind not in "US" else str)
        ids = np.concatenate([ids, bad_ids]) if len(ids) else bad_ids
        x = np.concatenate([x, np.zeros((n_bad, *input_shape), dtype=x.dtype if len(x) else dtype)])
        files = np.concatenate([files, rejects["file"]]).astype(np.int32)
        reasons = pa.concat_arrays([reasons, pa.array(rejects["reason"].astype(str), pa.string())])
    x = x.astype(dtype, copy=False).reshape(len(ids), *input_shape)
    return pa.table({"id": pa.array(ids), "x": tensor_column(x), "file": pa.array(files), "reason": reasons})


def input_dtype(spec):
    return np.float32 if spec.format == "features" else np.uint8


def decode_for_scoring(batch, spec, input_shape, file_index: dict[str, int]) -> pa.Table:
    """Decode one read batch into the scorer's input: good rows and rejects in one table
    (``stream_batch``). A batch read by position (``read.py``) keeps its ``row`` column
    (rejects: -1)."""
    table = _table(batch)
    good, rejects = decode_batch(table, spec, input_shape, file_index)
    out = stream_batch(good, rejects, input_shape, input_dtype(spec))
    if "row" in table.column_names:
        rows = column_array(table, "row").to_numpy(zero_copy_only=False)
        out = out.append_column("row", pa.array(
            np.concatenate([rows[good["row"]], np.full(len(rejects["id"]), -1, dtype=np.int64)])))
    return out
