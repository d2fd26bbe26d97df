"""Streaming exact top-k: the driver's reduction of a whole pool's scores.

Order: higher score first, ties by smaller id. Memory stays O(k) (plus one batch)
however many rows stream through. With a per-class quota, each predicted class
keeps at most ceil(k / C) rows and the selection is the top k of their union.
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
        self._buckets: dict[int, _Best] = {}
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
        if self.quota is None:
            self._buckets.setdefault(-1, _Best(self.k)).add(ids, scores, classes, extra)
            return
        for c in np.unique(classes):
            mask = classes == c
            self._buckets.setdefault(int(c), _Best(self.quota)).add(
                ids[mask], scores[mask], classes[mask], {name: v[mask] for name, v in extra.items()})

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, scores, classes)`` of the selection, best first (at most k rows)."""
        return self.result_with_extra()[:3]

    def result_with_extra(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """``(ids, scores, classes, extra)``, best first (at most k rows)."""
        full = [b for b in self._buckets.values() if b.ids is not None]
        if not full:
            return np.array([]), np.array([], dtype=np.float64), np.array([], dtype=np.int64), {}
        ids = np.concatenate([b.ids for b in full])
        scores = np.concatenate([b.scores for b in full])
        classes = np.concatenate([b.classes for b in full])
        extra = {name: np.concatenate([b.extra[name] for b in full]) for name in full[0].extra}
        order = rank_order(ids, scores)[: self.k]
        return ids[order], scores[order], classes[order], {name: v[order] for name, v in extra.items()}
