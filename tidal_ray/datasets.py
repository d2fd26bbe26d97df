"""Real data shipped with scikit-learn: the 8x8 handwritten digits (1,797 samples, 10 classes)."""
from __future__ import annotations

import numpy as np

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
