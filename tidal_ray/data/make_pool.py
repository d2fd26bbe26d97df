"""Write pools for tests, benchmarks and users: the real scikit-learn digits, the
60,000 Fashion-MNIST training images, or class-conditional synthetic data of any size, in any pool format (DESIGN §2)."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from tidal_ray.data import storage
from tidal_ray.data.decode import format_shape, parse_shape
from tidal_ray.errors import BadInput
from tidal_ray.data.pool import CLASSES_KEY, FORMATS, SHAPE_KEY

SOURCES = ("digits", "fashion-mnist", "synthetic")
REAL_SOURCES = ("digits", "fashion-mnist")
DEFAULT_SYNTHETIC_ROWS = 10_000


def _real(source: str, rows: int | None, data_dir: str | None):
    """``(ids, pixels, labels, shape, num_classes)`` of a real data set, the first ``rows``."""
    from tidal_ray.data import datasets

    if source == "digits":
        (ids, pixels, labels), shape, classes = datasets.load_digits(), datasets.DIGITS_SHAPE, datasets.DIGITS_CLASSES
    else:
        (ids, pixels, labels) = datasets.load_fashion_mnist("train", data_dir)
        shape, classes = datasets.FASHION_MNIST_SHAPE, datasets.FASHION_MNIST_CLASSES
    if rows is not None:
        if rows > len(ids):
            raise BadInput(f"--rows {rows}: the {source} source has only {len(ids)} rows")
        ids, pixels, labels = ids[:rows], pixels[:rows], labels[:rows]
    return ids, pixels, labels, shape, classes


def synthetic_rows(ids: np.ndarray, shape, num_classes: int, seed: int):
    """Class-conditional uint8 data: each class has a random prototype, each row is its
    class prototype blended with noise. Rows come from fixed blocks of ids, each with its
    own generator, so any sharding of the same ids gives the same rows."""
    block = 4096
    prototypes = np.random.default_rng([seed, 0]).integers(0, 256, size=(num_classes, *shape), dtype=np.uint8)
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.empty(len(ids), dtype=np.int64)
    pixels = np.empty((len(ids), *shape), dtype=np.uint8)
    for b in np.unique(ids // block):
        rng = np.random.default_rng([seed, 1, int(b)])
        block_labels = rng.integers(num_classes, size=block)
        block_noise = rng.integers(0, 256, size=(block, *shape), dtype=np.uint8)
        rows = np.flatnonzero(ids // block == b)
        offsets = ids[rows] - b * block
        labels[rows] = block_labels[offsets]
        pixels[rows] = prototypes[labels[rows]] // 2 + block_noise[offsets] // 2
    return pixels, labels


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    channels = image.shape[0]
    if channels not in (1, 3):
        raise BadInput(f"PNG images need 1 or 3 channels, got shape {format_shape(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image[0] if channels == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def pool_table(fmt: str, ids, pixels, labels, shape, num_classes: int, source: str) -> pa.Table:
    if fmt == "pixels":
        data = pa.array([row.tobytes() for row in pixels], pa.binary())
    elif fmt == "image":
        data = pa.array([_png(row) for row in pixels], pa.binary())
    else:  # features: the pixels flattened and scaled to [0, 1]
        flat = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
        data = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), flat.shape[1])
    metadata = {CLASSES_KEY: str(num_classes).encode(), b"tidal_ray.source": source.encode()}
    if fmt == "pixels":
        metadata[SHAPE_KEY] = format_shape(shape).encode()
    return pa.table({"id": pa.array(ids, pa.int64()), fmt: data, "label": pa.array(labels, pa.int64())}) \
        .replace_schema_metadata(metadata)


def make_pool(out_uri: str, source: str = "digits", rows: int | None = None, fmt: str = "pixels",
              shards: int = 1, seed: int = 0, shape=(3, 32, 32), num_classes: int = 10,
              data_dir: str | None = None) -> list[str]:
    """Write a pool under ``out_uri`` (local dir or ``s3://``); returns the written files.

    ``fmt``: ``pixels`` | ``image`` | ``features`` (parquet ``part-00000.parquet`` ...
    with ``id``, the data column and ``label``) or ``files`` (one PNG per row, the id
    being the key under the prefix; such pools carry no labels). ``digits`` is the real
    scikit-learn digits (1x8x8, 10 classes; ``shape`` and ``num_classes`` are ignored);
    ``fashion-mnist`` the 60,000 training images (1x28x28, 10 classes) read from
    ``data_dir`` (default: see ``datasets.load_fashion_mnist``)."""
    if source not in SOURCES:
        raise BadInput(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if shards < 1 or (rows is not None and rows < 1):
        raise BadInput(f"need rows >= 1 and shards >= 1, got rows={rows} shards={shards}")
    if storage.exists(out_uri) and storage.list_files(out_uri):
        raise BadInput(f"{out_uri} already holds files; write a pool to an empty prefix")

    if source in REAL_SOURCES:
        ids, pixels, labels, shape, num_classes = _real(source, rows, data_dir)
        total = len(ids)
    else:
        shape = parse_shape(shape) if isinstance(shape, str) else tuple(int(d) for d in shape)
        if num_classes < 2:
            raise BadInput(f"num_classes must be at least 2, got {num_classes}")
        total = rows if rows is not None else DEFAULT_SYNTHETIC_ROWS
    bounds = np.linspace(0, total, min(shards, total) + 1).astype(int)

    written: list[str] = []
    for shard, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        shard_ids = np.arange(start, stop, dtype=np.int64)
        if source in REAL_SOURCES:
            shard_pixels, shard_labels = pixels[start:stop], labels[start:stop]
        else:
            shard_pixels, shard_labels = synthetic_rows(shard_ids, shape, num_classes, seed)
        if fmt == "files":
            written += _write_pngs(out_uri, shard if shards > 1 else None, shard_ids, shard_pixels)
            continue
        uri = storage.join(out_uri, f"part-{shard:05d}.parquet")
        storage.write_parquet(uri, pool_table(fmt, shard_ids, shard_pixels, shard_labels, shape, num_classes, source))
        written.append(uri)
    return written


def _write_pngs(out_uri: str, shard: int | None, ids, pixels) -> list[str]:
    folder = out_uri if shard is None else storage.join(out_uri, f"part-{shard:05d}")
    uris = [storage.join(folder, f"{int(i):08d}.png") for i in ids]
    with ThreadPoolExecutor(max_workers=16) as pool:  # many small PUTs on S3
        list(pool.map(lambda item: storage.write_bytes(item[0], _png(item[1])), zip(uris, pixels)))
    return uris
