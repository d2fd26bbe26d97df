"""Per-row randomness from ids: a vectorised 64-bit id hash and uniforms derived from it.

A row's random number depends only on its id, the seed and a stream number, never on the
batch or shard it lands in: that is what makes the random strategy, MC dropout masks and
power sampling give the same selection on any number of actors and in any arrival order.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX[0]
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX[1]
    return x ^ (x >> np.uint64(31))


def hash64(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 64-bit hash of each id with ``seed``, vectorised (no per-row Python): integer
    ids through splitmix64; string ids word by word over their UCS-4 code points, each
    word folded in only while the string lasts, so a string hashes alike in any batch."""
    ids = np.asarray(ids)
    key = _mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
    if ids.dtype.kind in "iub":
        return _mix64(ids.astype(np.int64).view(np.uint64) * _GOLDEN + key)
    ids = np.ascontiguousarray(ids.astype(str))
    width = ids.dtype.itemsize // 4
    lengths = np.char.str_len(ids) if len(ids) else np.zeros(0, dtype=np.int64)
    h = _mix64(lengths.astype(np.uint64) + key)
    if width == 0 or len(ids) == 0:
        return h
    points = ids.view(np.uint32).reshape(len(ids), width)
    if width % 2:
        points = np.concatenate([points, np.zeros((len(ids), 1), dtype=np.uint32)], axis=1)
    # One copy into word-major order, so each fold step reads a contiguous row.
    words = np.ascontiguousarray(points.view(np.uint64).T)
    for j, word in enumerate(words):
        h = np.where(lengths > 2 * j, _mix64(h ^ word), h)
    return h


def row_uniforms(keys: np.ndarray, stream: int, width: int) -> np.ndarray:
    """``(len(keys), width)`` float32 uniforms in [0, 1), each a function of its row's key
    (a ``hash64``), ``stream`` and its column alone: per-row randomness that does not
    depend on the batch a row lands in."""
    columns = _mix64(np.arange(stream * width, (stream + 1) * width, dtype=np.uint64) + _GOLDEN)
    mixed = _mix64(np.asarray(keys, dtype=np.uint64)[:, None] ^ columns[None, :])
    return (mixed >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
