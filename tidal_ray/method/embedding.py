"""A label-free embedding of raw rows, for when no model is there yet (a typical initial
draw before any training): images become an 8x8 grayscale thumbnail, feature vectors
stay as they are; both are standardised per dimension over the rows given and
projected to ``dims`` dimensions by a seeded Gaussian random projection.

Why this one: at a cold start there is no model to embed with, and what a typical
set needs is that near-duplicates land close together and that distinct looks
(silhouettes, brightness layouts) land apart. A thumbnail keeps the layout and drops
pixel-level noise and small shifts; standardising stops a few bright pixels from
dominating; a random projection keeps pairwise distances within a small factor
(Johnson-Lindenstrauss) at a fixed, order-free cost, where PCA would depend on which
rows were sampled. Pure NumPy, deterministic for a seed.
"""
from __future__ import annotations

import numpy as np

THUMBNAIL = 8
DIMS = 32


def _bins(size: int, parts: int) -> np.ndarray:
    return (np.arange(parts) * size) // parts


def thumbnail(x: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """``(N, C, H, W)`` images -> ``(N, side * side)`` float32 grayscale area means."""
    x = np.asarray(x, dtype=np.float32).mean(axis=1)                        # grayscale
    n, height, width = x.shape
    side_h, side_w = min(side, height), min(side, width)
    rows, cols = _bins(height, side_h), _bins(width, side_w)
    sums = np.add.reduceat(np.add.reduceat(x, rows, axis=1), cols, axis=2)
    counts = np.outer(np.diff(np.append(rows, height)), np.diff(np.append(cols, width)))
    return (sums / counts).reshape(n, -1).astype(np.float32)


def label_free_embedding(x: np.ndarray, seed: int = 0, dims: int = DIMS) -> np.ndarray:
    """``(N, dims)`` float32: thumbnail (images) or the vectors (features), standardised,
    then a seeded random projection (skipped when there are at most ``dims`` dimensions)."""
    x = np.asarray(x)
    if x.ndim == 4:
        flat = thumbnail(x)
    elif x.ndim == 2:
        flat = x.astype(np.float32)
    else:
        raise ValueError(f"an embedding needs (N, C, H, W) images or (N, D) vectors, got shape {x.shape}")
    if len(flat) == 0 or not np.isfinite(flat).all():
        raise ValueError("an embedding needs at least one row and finite values")
    flat = (flat - flat.mean(axis=0)) / np.maximum(flat.std(axis=0), 1e-6)
    if flat.shape[1] <= dims:
        return flat.astype(np.float32)
    projection = np.random.default_rng([int(seed), 0xE3B]).standard_normal((flat.shape[1], dims))
    return (flat @ (projection / np.sqrt(dims))).astype(np.float32)
