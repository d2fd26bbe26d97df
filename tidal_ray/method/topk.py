"""Streaming exact top-k: the driver's reduction of a whole pool's scores.

Order: higher score first, ties by smaller id. Memory stays O(k) (plus one batch)
however many rows stream through. With a per-class quota, each predicted class
gives at most ceil(k / C) rows, the top k of their union; when some class is predicted
for fewer rows than that, the best rows left fill the selection to k (a batch the user
pays for is never short while the pool has rows).
"""
from __future__ import annotations

import math

import numpy as np

from tidal_ray.errors import BadInput


def rank_order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices that sort rows by score descending, then id ascending."""
    return np.lexsort((ids, -scores))


class _Best:
    """The best ``capacity`` rows seen so far, each with its ``extra`` columns."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ids = self.scores = self.classes = None
        self.extra: dict[str, np.ndarray] = {}

    def add(self, ids: np.ndarray, scores: np.ndarray, classes: np.ndarray, extra: dict) -> None:
        if self.ids is not None and len(self.ids) == self.capacity:
            # Rows strictly below the current worst can never enter.
            keep = scores >= self.scores[-1]
            ids, scores, classes = ids[keep], scores[keep], classes[keep]
            extra = {name: v[keep] for name, v in extra.items()}
            if len(ids) == 0:
                return
        if self.ids is not None:
            ids = np.concatenate([self.ids, ids])
            scores = np.concatenate([self.scores, scores])
            classes = np.concatenate([self.classes, classes])
            extra = {name: np.concatenate([self.extra[name], v]) for name, v in extra.items()}
        order = rank_order(ids, scores)[: self.capacity]
        self.ids, self.scores, self.classes = ids[order], scores[order], classes[order]
        self.extra = {name: v[order] for name, v in extra.items()}


class StreamingTopK:
    """The exact top k of every row added (ids, scores, predicted classes), in O(k).
    Rows that must not be selected (labeled, pending) are left out by the caller
    (``reduce.Reduction``)."""

    def __init__(self, k: int, per_class_quota: bool = False, num_classes: int | None = None):
        if int(k) <= 0:
            raise BadInput(f"k must be a positive integer, got {k}")
        self.k = int(k)
        self.quota = None
        if per_class_quota:
            if not num_classes:
                raise BadInput("a per-class quota needs the number of classes")
            self.quota = math.ceil(self.k / num_classes)
        self._best = _Best(self.k)  # the fill of a quota's shortfall is always among these
        self._by_class: dict[int, _Best] = {}
        self.rows_in = 0

    def add(self, ids, scores, classes=None, extra: dict | None = None) -> None:
        """``extra``: more columns kept alongside the rows that stay (e.g. the
        strategy's score when ``scores`` are power keys), the same names every call."""
        ids, scores = np.asarray(ids), np.asarray(scores, dtype=np.float64)
        classes = np.zeros(len(ids), np.int64) if classes is None else np.asarray(classes, dtype=np.int64)
        extra = {name: np.asarray(v) for name, v in (extra or {}).items()}
        if np.isnan(scores).any():
            raise ValueError("NaN score reached the top-k; the scorer must reject such rows first")
        self.rows_in += len(ids)
        self._best.add(ids, scores, classes, extra)
        if self.quota is None:
            return
        for c in np.unique(classes):
            mask = classes == c
            self._by_class.setdefault(int(c), _Best(self.quota)).add(
                ids[mask], scores[mask], classes[mask], {name: v[mask] for name, v in extra.items()})

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, scores, classes)`` of the selection, best first (at most k rows)."""
        return self.result_with_extra()[:3]

    def result_with_extra(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """``(ids, scores, classes, extra)``, best first (at most k rows)."""
        if self._best.ids is None:
            return np.array([]), np.array([], dtype=np.float64), np.array([], dtype=np.int64), {}
        if self.quota is None:
            return _rows(self._best)
        union = _concat([_rows(b) for b in self._by_class.values()])
        picks = _take(union, rank_order(union[0], union[1])[: self.k])
        short = self.k - len(picks[0])
        if short > 0:  # some class has fewer rows than its quota: the best rows left fill up
            left = np.flatnonzero(~np.isin(self._best.ids, picks[0]))[:short]
            picks = _concat([picks, _rows(self._best, left)])
        return _take(picks, rank_order(picks[0], picks[1]))

    def held(self) -> dict:
        """The ``extra`` columns of every row held, picked or not: a superset of this
        stream's part in the selection of any stream it is part of (``reduce.BlockFilter``)."""
        if self._best.ids is None:
            return {}
        return _concat([_rows(b) for b in (self._best, *self._by_class.values())])[3]


# A bucket's rows as (ids, scores, classes, extra).

def _take(rows: tuple, index) -> tuple:
    ids, scores, classes, extra = rows
    return ids[index], scores[index], classes[index], {name: v[index] for name, v in extra.items()}


def _rows(bucket: _Best, index=slice(None)) -> tuple:
    return _take((bucket.ids, bucket.scores, bucket.classes, bucket.extra), index)


def _concat(parts: list[tuple]) -> tuple:
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
            {name: np.concatenate([p[3][name] for p in parts]) for name in parts[0][3]})
