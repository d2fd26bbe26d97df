"""The driver's side of scoring: row accounting, rejects, duplicates, exclusions and
the exact top-k, plus the ``--save-scores`` writer and the progress line.

Memory: O(k) for the selection, O(rejects) for the rejects table, and the duplicate
check (``ids.SeenIds``): a bit per id for dense integer ids, else 8-16 bytes per id.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from . import ids as id_utils
from . import storage
from .decode import DUPLICATE_ID, NULL_ID, reason_kind
from .topk import StreamingTopK, is_member

PROGRESS_SECONDS = 5.0
SCORES_ROWS_PER_PART = 1_000_000
NONFINITE_SCORE = "non-finite score"


class ScoresWriter:
    """``--save-scores``: every scored row's scores, as parquet parts of bounded size."""

    def __init__(self, out_uri: str, id_type: pa.DataType, strategies):
        self.prefix = storage.join(out_uri, "scores")
        self.id_type, self.strategies = id_type, strategies
        self.pending: list[dict] = []
        self.pending_rows = 0
        self.written: list[str] = []

    def add(self, columns: dict) -> None:
        if len(columns["id"]):
            self.pending.append(columns)
            self.pending_rows += len(columns["id"])
        if self.pending_rows >= SCORES_ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        cols = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        table = pa.table({"id": pa.array(cols.pop("id"), self.id_type), **cols})
        uri = storage.join(self.prefix, f"part-{len(self.written):05d}.parquet")
        storage.write_parquet(uri, table)
        self.written.append(uri)
        self.pending, self.pending_rows = [], 0

    def finish(self) -> None:
        self.flush()
        # Parts left by an earlier, larger run in the same place are not this run's scores.
        stale = [uri for uri, _ in storage.list_files(self.prefix) if uri not in self.written] \
            if storage.exists(self.prefix) else []
        self._delete(stale)

    def remove(self) -> None:
        self._delete(self.written)

    @staticmethod
    def _delete(uris) -> None:
        for uri in uris:
            try:
                fs, path = storage.resolve(uri)
                fs.delete_file(path)
            except OSError:
                pass


class Reduction:
    """Folds the scorer's output batches, in any order, into the selection and the
    accounting. It is handed what it needs: ``exclude`` (sorted unique ids of the pool's
    ``id_type``), ``file_name(file_index, id)`` to name a reject's file, and ``scores``
    (a ``ScoresWriter``) for ``--save-scores``."""

    def __init__(self, k: int, strategy: str, num_classes: int, id_type: pa.DataType, exclude: np.ndarray,
                 file_name, *, per_class_quota: bool = False, scores: ScoresWriter | None = None):
        self.strategy, self.id_type, self.exclude, self.file_name = strategy, id_type, exclude, file_name
        self.topk = StreamingTopK(k, per_class_quota=per_class_quota, num_classes=num_classes)
        self.seen = id_utils.SeenIds()
        self.scores = scores
        self.rows_read = self.rows_scored = self.rows_excluded = 0
        self.reject_ids, self.reject_files, self.reject_reasons = [], [], []
        self.rejects_by_reason: Counter = Counter()

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejects_by_reason.values())

    def add(self, batch: dict) -> None:
        ids = id_utils.to_numpy(batch["id"], self.id_type)
        reasons = np.asarray(batch["reason"]).astype(object)
        self.rows_read += len(ids)
        decoded = np.flatnonzero(reasons == "")
        # Duplicates: the first decodable row of an id, in pool order, wins.
        repeated = decoded[~self.seen.first_seen(ids[decoded])]
        reasons[repeated] = DUPLICATE_ID
        score = np.asarray(batch[self.strategy])
        reasons[(reasons == "") & ~np.isfinite(score)] = NONFINITE_SCORE  # e.g. features that overflow the model
        rejected = reasons != ""
        if rejected.any():
            self._reject(ids[rejected], np.asarray(batch["file"])[rejected], reasons[rejected])
        live = ~rejected
        excluded = live & is_member(self.exclude, ids)
        keep = live & ~excluded
        self.rows_excluded += int(excluded.sum())
        self.rows_scored += int(keep.sum())
        predicted = np.asarray(batch["predicted_class"])
        self.topk.add(ids[keep], score[keep], predicted[keep])
        if self.scores is not None:
            columns = {"id": ids[live], "predicted_class": predicted[live], "excluded": excluded[live]}
            columns.update({s: np.asarray(batch[s])[live] for s in self.scores.strategies})
            self.scores.add(columns)

    def _reject(self, ids, files, reasons) -> None:
        for i, f, r in zip(ids.tolist(), files.tolist(), reasons.tolist()):
            sample_id = None if r == NULL_ID else i
            self.reject_ids.append(sample_id)
            self.reject_files.append(self.file_name(f, sample_id))
            self.reject_reasons.append(r)
            self.rejects_by_reason[reason_kind(r)] += 1

    def accounting(self) -> dict:
        return {"rows_read": self.rows_read, "rows_scored": self.rows_scored,
                "rows_rejected": self.rows_rejected, "rows_excluded": self.rows_excluded,
                "rejects_by_reason": dict(sorted(self.rejects_by_reason.items()))}

    def selection_table(self) -> pa.Table:
        ids, scores, classes = self.topk.result()
        return pa.table({
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int64()),
            "id": pa.array(ids.tolist(), self.id_type),
            "score": pa.array(scores, pa.float64()),
            "strategy": pa.array([self.strategy] * len(ids), pa.string()),
            "predicted_class": pa.array(classes, pa.int64()),
        })

    def rejects_table(self) -> pa.Table:
        return pa.table({"id": pa.array(self.reject_ids, self.id_type),
                         "file": pa.array(self.reject_files, pa.string()),
                         "reason": pa.array(self.reject_reasons, pa.string())})


class Progress:
    """A line on stderr every few seconds, from a thread, so a stalled pipeline shows too."""

    def __init__(self, reduction: Reduction, total: int, enabled: bool, every: float = PROGRESS_SECONDS):
        self.reduction, self.total, self.every = reduction, total, every
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def line(self) -> str:
        r = self.reduction
        elapsed = time.perf_counter() - self.started
        return (f"score: {r.rows_read:,}/{self.total:,} rows ({r.rows_read / max(elapsed, 1e-9):,.0f} rows/s), "
                f"{r.rows_rejected:,} rejected, {r.rows_excluded:,} excluded, {elapsed:.0f}s")

    def _run(self):
        while not self._stop.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
