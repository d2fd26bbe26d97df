"""Real data: scikit-learn's 8x8 handwritten digits (1,797 samples, 10 classes) and
Fashion-MNIST (60,000 train + 10,000 test 28x28 images, 10 classes) as Debian's
``dataset-fashion-mnist`` package installs it: the original idx files under
``/usr/share/datasets/fashion-mnist``. ``load_fashion_mnist`` reads another directory when
given one, else ``$TIDAL_RAY_FASHION_MNIST_DIR`` when that is set, else the Debian path."""
from __future__ import annotations

import gzip
import os

import numpy as np

from tidal_ray.errors import BadInput

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, pixels, labels)``: int64 ids 0..1796, uint8 pixels (N, 1, 8, 8) scaled to 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    pixels = np.clip(data.images * 16, 0, 255).astype(np.uint8).reshape(-1, *DIGITS_SHAPE)
    return np.arange(len(pixels), dtype=np.int64), pixels, data.target.astype(np.int64)


def split_pool_test(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split into pool and test row indices."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    pool, test = train_test_split(rows, test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(pool), np.sort(test)


def imbalance(rows: np.ndarray, labels: np.ndarray, factor: float) -> np.ndarray:
    """Keep floor(n_c * factor^(-c/(C-1))) rows of class c (the first ones, in row order)."""
    classes = np.unique(labels[rows])
    last = max(len(classes) - 1, 1)
    kept = []
    for c in classes:
        of_class = rows[labels[rows] == c]
        kept.append(of_class[: int(len(of_class) * factor ** (-c / last))])
    return np.sort(np.concatenate(kept))


def initial_labels(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` rows drawn uniformly at random (the usual AL protocol's initial set)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=n, replace=False))


# ---- Fashion-MNIST ---------------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TIDAL_RAY_FASHION_MNIST_DIR"
FASHION_MNIST_SHAPE = (1, 28, 28)
FASHION_MNIST_CLASSES = 10
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist (or: make fashion-mnist)"
# idx magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """An idx file (gzip or plain) of unsigned bytes as an ndarray of its declared dims."""
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as f:
        raw = f.read()
    return parse_idx(raw, path)


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise BadInput(f"{name}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != _IDX_UBYTE:
        raise BadInput(f"{name}: idx element type 0x{raw[2]:02x}, only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise BadInput(f"{name}: idx header declares {ndim} dims but the file has only {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise BadInput(f"{name}: idx dims {dims} need {expected} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist_dir(directory: str | None = None) -> str:
    return directory or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {directory}; "
                            f"install it with: {FASHION_MNIST_INSTALL}")


def load_fashion_mnist(split: str = "train", directory: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, pixels, labels)`` of one split (``train`` or ``test``): int64 ids 0..N-1,
    uint8 pixels (N, 1, 28, 28), int64 labels 0..9."""
    if split not in FASHION_MNIST_FILES:
        raise BadInput(f"unknown split {split!r}; choose train or test")
    directory = fashion_mnist_dir(directory)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path, label_path = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != FASHION_MNIST_SHAPE[1:]:
        raise BadInput(f"{image_path}: expected images of dims (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise BadInput(f"{label_path}: expected {len(images)} labels (one per image), got dims {labels.shape}")
    if labels.max(initial=0) >= FASHION_MNIST_CLASSES:
        raise BadInput(f"{label_path}: label {labels.max()} is outside 0..{FASHION_MNIST_CLASSES - 1}")
    pixels = images.reshape(-1, *FASHION_MNIST_SHAPE).copy()
    return np.arange(len(pixels), dtype=np.int64), pixels, labels.astype(np.int64)
