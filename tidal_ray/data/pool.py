"""A pool's spec (DESIGN §2): listing, format detection and validation before any work.

A pool is a prefix (``s3://...`` or a local directory) or a single file holding one of:
- parquet ``id`` + ``pixels``: raw uint8 bytes, the shape in the schema metadata
  under ``tidal_ray.shape`` (e.g. ``3x32x32``);
- parquet ``id`` + ``image``: PNG/JPEG bytes;
- parquet ``id`` + ``features``: a (fixed-size) list of floats;
- image files ``*.png|*.jpg|*.jpeg|*.webp`` (any case); the id is the key relative
  to the prefix.
An optional ``label`` column feeds the simulated oracle; scoring never reads it.
Marker and hidden files (``_SUCCESS``, ``.DS_Store``, any name starting with ``_`` or
``.``) in any pool, and keys that are not images under an image prefix (README.txt,
manifests), are skipped and counted in ``PoolSpec.skipped_count``; only a pool with nothing
left is an error. ``describe_pool`` reads the listing and the parquet footers only,
never the rows; ``input_shape_for`` samples a few images to settle the input size.
An image prefix may hold millions of keys: its listing is walked once, a page at a
time, and kept as counts, a sample and the boundaries of runs of it (``ranges``),
which read tasks list again for themselves, so no process holds the whole listing.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import decode_image, format_shape, parse_shape
from tidal_ray.data.listing import SAMPLED_IMAGES, list_pool
from tidal_ray.errors import BadInput

SAMPLED_FEATURE_ROWS = 1000  # rows whose lengths give a list<float> pool its dimension

SHAPE_KEY = b"tidal_ray.shape"
CLASSES_KEY = b"tidal_ray.num_classes"
IMAGE_CHANNELS = 3   # the default for image pools: any mode becomes RGB
MIN_IMAGE_SIZE = 8
DATA_COLUMNS = ("pixels", "image", "features")
FORMATS = ("pixels", "image", "features", "files")


@dataclass(frozen=True)
class PoolSpec:
    uri: str
    format: str                         # one of FORMATS
    files: tuple[tuple[str, int], ...]  # parquet: (uri, size), sorted by uri; image files: () (see ranges)
    id_type: pa.DataType                # int64 or string
    rows: int                           # from parquet footers (image files: one row each)
    shape: tuple[int, ...] | None       # pixels: from the metadata; features: (D,), inferred for list<float>
    root: str = ""                      # filesystem path that image-file ids are relative to
    has_label: bool = False
    num_classes: int | None = None      # declared in the schema metadata, if any
    max_label: int | None = None        # from parquet statistics, if every row group has them
    row_groups: tuple[tuple[int, ...], ...] = ()  # per parquet file, its row groups' row counts
    skipped: tuple[str, ...] = ()       # the first skipped files: markers, hidden, non-images beside images
    skipped_count: int = 0              # every skipped file
    bytes: int = 0                      # the used files' total size
    # Image files: runs of the listing as (after uri or "", last uri, first file index,
    # files), in uri order, and the first few files (for the input size).
    ranges: tuple[tuple[str, str, int, int], ...] = ()
    sample: tuple[str, ...] = ()

    @property
    def column(self) -> str:
        """The data column as read: ``bytes`` for image files (Ray's read_binary_files)."""
        return "bytes" if self.format == "files" else self.format

    def slim(self) -> PoolSpec:
        """What decode tasks need: everything but the file lists, which can be long."""
        return replace(self, files=(), row_groups=(), skipped=(), ranges=(), sample=())

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


def _check_parquet_file(uri: str, schema: pa.Schema) -> dict:
    """This file's format facts, or a BadInput naming the file and the problem."""
    names = schema.names
    if "id" not in names:
        raise BadInput(f"{uri}: no 'id' column (columns: {', '.join(names)})")
    id_kind = id_utils.kind_of(schema.field("id").type)
    if id_kind is None:
        raise BadInput(f"{uri}: column 'id' is {schema.field('id').type}; expected an integer or a string")
    present = [c for c in DATA_COLUMNS if c in names]
    if not present:
        raise BadInput(f"{uri}: unknown format: no 'pixels', 'image' or 'features' column (columns: {', '.join(names)})")
    if len(present) > 1:
        raise BadInput(f"{uri}: mixed formats in one file: columns {' and '.join(present)}")
    fmt, t = present[0], schema.field(present[0]).type
    shape = None
    if fmt in ("pixels", "image") and not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                           or pa.types.is_fixed_size_binary(t)):
        raise BadInput(f"{uri}: column '{fmt}' is {t}; expected binary")
    if fmt == "pixels":
        raw = (schema.metadata or {}).get(SHAPE_KEY)
        if raw is None:
            raise BadInput(f"{uri}: 'pixels' without the {SHAPE_KEY.decode()} schema metadata (e.g. 3x32x32)")
        shape = parse_shape(raw.decode())
    if fmt == "features":
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                or not pa.types.is_floating(t.value_type):
            raise BadInput(f"{uri}: column 'features' is {t}; expected a list of float32")
        if pa.types.is_fixed_size_list(t):
            shape = (t.list_size,)
    label = "label" in names
    if label and not pa.types.is_integer(schema.field("label").type):
        raise BadInput(f"{uri}: column 'label' is {schema.field('label').type}; expected integers")
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
        raise BadInput(storage.access_problem(e, uri)
                       or f"{uri}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def describe_pool(uri: str) -> PoolSpec:
    """Detect the pool's format and check every file's schema; reads footers only."""
    kind, listing = list_pool(uri)
    if kind == "image":
        _, root = storage.resolve(uri)
        if listing.images.count == 1 and storage.resolve(listing.sample[0])[1] == root:
            root = os.path.dirname(root)  # the pool is one file
        return PoolSpec(uri, "files", (), pa.string(), listing.images.count, None, root=root,
                        skipped=tuple(listing.unused), skipped_count=listing.hidden_count + listing.other_count,
                        bytes=listing.image_bytes, ranges=listing.images.ranges(), sample=tuple(listing.sample))

    files = listing.parquet
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(_read_footer, [f for f, _ in files]))
    facts = [_check_parquet_file(f, schema) for (f, _), (schema, _) in zip(files, footers)]
    first, first_uri = facts[0], files[0][0]
    for (f, _), fact in zip(files, facts):
        if fact["format"] != first["format"]:
            raise BadInput(f"{f}: mixed formats: '{fact['format']}' here, '{first['format']}' in {first_uri}")
        if fact["id_kind"] != first["id_kind"]:
            raise BadInput(f"{f}: mixed id types: {fact['id_kind']} ids here, {first['id_kind']} ids in {first_uri}")
        if fact["shape"] != first["shape"]:
            raise BadInput(f"{f}: mixed shapes: {format_shape(fact['shape'] or ())} here, "
                             f"{format_shape(first['shape'] or ())} in {first_uri}")
    declared = {fact["num_classes"] for fact in facts} - {None}
    maxima = [_max_label(meta) for _, meta in footers]
    max_label = None if any(m is None for m, fact in zip(maxima, facts) if fact["label"]) \
        else max((m for m in maxima if m is not None), default=None)
    return PoolSpec(
        uri=uri, format=first["format"], files=tuple(files),
        id_type=pa.int64() if first["id_kind"] == "int" else pa.string(),
        rows=sum(meta.num_rows for _, meta in footers),
        shape=_feature_length(files) if first["format"] == "features" and first["shape"] is None else first["shape"],
        has_label=any(fact["label"] for fact in facts),
        num_classes=max(declared) if declared else None, max_label=max_label,
        skipped=tuple(listing.hidden), skipped_count=listing.hidden_count, bytes=sum(size for _, size in files),
        row_groups=tuple(tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
                         for _, meta in footers),
    )


def _feature_length(files, n: int = SAMPLED_FEATURE_ROWS) -> tuple[int]:
    """``(D,)`` of a pool whose ``features`` are variable-length lists (what pandas and
    ``pa.array(list_of_lists)`` write): the most common length among the first ``n``
    rows. Rows of another length are rejects when decoded (a reason each), as with
    fixed-size lists of the wrong length."""
    lengths = np.empty(0, np.int64)
    for uri, _ in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=n, columns=["features"]):
                found = pc.list_value_length(batch.column("features")).drop_null().to_numpy()
                lengths = np.concatenate([lengths, found[found > 0]])[:n]
                if len(lengths) >= n:
                    break
        if len(lengths) >= n:
            break
    if not len(lengths):
        raise BadInput(f"{files[0][0]}: every 'features' list in the pool's first rows is empty or null; "
                       f"cannot tell the dimension")
    values, counts = np.unique(lengths, return_counts=True)
    return (int(values[np.argmax(counts)]),)


def _is_image_shape(shape) -> bool:
    return shape is not None and len(shape) == 3 and shape[0] in (1, 3)


def check_compatible(spec: PoolSpec, input_shape, num_classes: int, checkpoint_uri: str = "the checkpoint") -> None:
    """Fail early when a checkpoint cannot score this pool (shape or class count).
    Images of any size and mode, and 1- or 3-channel stored pixels, are brought to the
    checkpoint's input by decoding; images need only be decodable."""
    input_shape = tuple(int(d) for d in input_shape)
    expects = f"{checkpoint_uri} expects {format_shape(input_shape)} inputs"
    if spec.format == "pixels" and spec.shape != input_shape \
            and not (_is_image_shape(spec.shape) and _is_image_shape(input_shape)):
        raise BadInput(f"{spec.uri}: pool rows are {format_shape(spec.shape)} pixels but {expects}")
    if spec.format == "features":
        if len(input_shape) != 1:
            raise BadInput(f"{spec.uri}: pool rows are feature vectors but {expects}")
        if spec.shape is not None and spec.shape != input_shape:
            raise BadInput(f"{spec.uri}: pool rows are {spec.shape[0]} features but {expects}")
    if spec.format in ("image", "files"):
        if not _is_image_shape(input_shape):
            raise BadInput(f"{spec.uri}: pool rows are images but {expects}")
        _sampled_image_sizes(spec)
    if spec.num_classes is not None and spec.num_classes != num_classes:
        raise BadInput(f"{spec.uri}: the pool declares {spec.num_classes} classes, "
                         f"{checkpoint_uri} has {num_classes}")
    if spec.max_label is not None and spec.max_label >= num_classes:
        raise BadInput(f"{spec.uri}: the pool has label {spec.max_label}, "
                         f"{checkpoint_uri} has only {num_classes} classes")


def _sampled_image_sizes(spec: PoolSpec, n: int = SAMPLED_IMAGES) -> list[tuple[int, int]]:
    """``(H, W)`` of the first few decodable images (EXIF orientation applied); a pool
    whose sampled images all fail to decode is reported up front, not as all rejects."""
    if spec.format == "files":
        with ThreadPoolExecutor(max_workers=8) as pool:
            blobs = list(pool.map(storage.read_bytes, spec.sample[:n]))
    else:
        blobs = []
        for uri, _ in spec.files:
            fs, path = storage.resolve(uri)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                for g in range(pf.metadata.num_row_groups):
                    blobs += pf.read_row_group(g, columns=["image"]).column("image").to_pylist()[:n - len(blobs)]
                    if len(blobs) >= n:
                        break
            if len(blobs) >= n:
                break
    sizes = []
    for blob in blobs:
        try:
            sizes.append(tuple(decode_image(blob, 1).shape[1:]))
        except ValueError:
            pass
    if blobs and not sizes:
        raise BadInput(f"{spec.uri}: none of the first {len(blobs)} images can be decoded")
    return sizes


def input_shape_for(spec: PoolSpec, image_size: int | None = None, channels: int | None = None) -> tuple[int, ...]:
    """The model's input for this pool under a recipe: images become
    ``(channels or 3, image_size, image_size)`` (without ``image_size``, the sampled
    images' common size; a one-line error when they vary); stored pixels keep their
    shape unless told; feature vectors are ``(D,)`` and take no image options."""
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < MIN_IMAGE_SIZE):
        raise BadInput(f"--image-size {image_size}: must be at least {MIN_IMAGE_SIZE}")
    if channels is not None and int(channels) not in (1, 3):
        raise BadInput(f"--channels {channels}: must be 1 or 3")
    if spec.format == "features":
        if image_size is not None or channels is not None:
            raise BadInput(f"{spec.uri}: --image-size and --channels apply to image pools, not feature vectors")
        return spec.shape
    if spec.format == "pixels":
        if not _is_image_shape(spec.shape) and (image_size is not None or channels is not None):
            raise BadInput(f"{spec.uri}: pixels of shape {format_shape(spec.shape)} cannot be resized or converted "
                           f"(only 1- or 3-channel images)")
        stored_c, *stored_hw = spec.shape
        return (int(channels or stored_c), *((int(image_size),) * 2 if image_size else stored_hw))
    channels = int(channels or IMAGE_CHANNELS)
    if image_size is not None:
        return channels, int(image_size), int(image_size)
    sizes = sorted(set(_sampled_image_sizes(spec)))
    if len(sizes) > 1:
        raise BadInput(f"{spec.uri}: the sampled images vary in size ({format_shape(sizes[0])} and "
                       f"{format_shape(sizes[-1])}); give --image-size N to resize and center-crop them")
    if not sizes:
        raise BadInput(f"{spec.uri}: no image to take the input size from")
    return (channels, *sizes[0])
