"""The driver's side of scoring: row accounting, rejects, duplicates, exclusions and
the exact top-k, plus the ``--save-scores`` writer and the progress line.

Memory: O(k) for the selection, O(rejects) for the rejects table, and the repeated
ids (found before scoring by ``ids.repeated_ids``) with one held row each.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import DUPLICATE_ID, NULL_ID, is_decoded, numpy_column, reason_kind
from tidal_ray.data.ids import is_member
from tidal_ray.data.lookup import ROW_BITS, row_group_of
from tidal_ray.method.topk import StreamingTopK

PROGRESS_SECONDS = 5.0
SCORES_ROWS_PER_PART = 1_000_000
NONFINITE_SCORE = "non-finite score"
POSITION = "position"        # a kept row's file << ROW_BITS | row, carried through the top-k


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
        stale = [uri for uri, _ in storage.list_files(self.prefix)
                 if uri not in self.written and not storage.is_hidden(uri)] \
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
    ``id_type``), ``repeated`` (the ids that occur more than once in the pool, sorted
    unique: ``ids.repeated_ids``), ``file_name(file_index, id)`` to name a reject's file,
    and ``scores`` (a ``ScoresWriter``) for ``--save-scores``.

    Batches carry ``id``, ``file`` and ``row`` (the row's position: index into the pool's
    files, row within the file), ``reason`` ("" = decoded), ``predicted_class`` and the
    score columns. A decoded row of a repeated id is held until every row has arrived;
    the one at the earliest position wins (``ids.EarliestRows``), so the result does not
    depend on the order batches arrive in. ``finish`` settles them.

    Each kept row carries its position, so the selection says where each picked row
    lives (``file``, ``row_group``, ``row``: ``row_groups`` is the pool's per-file row
    group row counts, ``PoolSpec.row_groups``; image files have none: row group -1)."""

    def __init__(self, k: int, strategy: str, num_classes: int, id_type: pa.DataType, exclude: np.ndarray,
                 file_name, *, repeated: np.ndarray | None = None, per_class_quota: bool = False,
                 scores: ScoresWriter | None = None, row_groups=()):
        self.strategy, self.id_type, self.exclude, self.file_name = strategy, id_type, exclude, file_name
        self.row_groups = row_groups
        self.topk = StreamingTopK(k, per_class_quota=per_class_quota, num_classes=num_classes)
        self.earliest = id_utils.EarliestRows(id_utils.empty(id_type) if repeated is None else repeated)
        self.scores = scores
        self.columns = ("predicted_class", strategy) + tuple(s for s in (scores.strategies if scores else ())
                                                               if s != strategy)
        self.rows_read = self.rows_scored = self.rows_excluded = 0
        self.reject_ids, self.reject_files, self.reject_reasons = [], [], []
        self.rejects_by_reason: Counter = Counter()
        self.finished = False

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejects_by_reason.values())

    def add(self, batch) -> None:
        """One scorer output batch: an Arrow table (the pipeline's) or a dict of columns."""
        if self.finished:
            raise RuntimeError("Reduction.add after finish")
        ids = id_utils.to_numpy(batch["id"], self.id_type)
        files = numpy_column(batch, "file")
        self.rows_read += len(ids)
        decoded = is_decoded(batch["reason"])
        if not decoded.all():
            self._reject(ids[~decoded], files[~decoded], numpy_column(batch, "reason")[~decoded])
        columns = {name: numpy_column(batch, name) for name in self.columns}
        rows = numpy_column(batch, "row").astype(np.int64)
        columns[POSITION] = (files.astype(np.int64) << ROW_BITS) | rows
        repeated = decoded & self.earliest.candidates(ids)
        if repeated.any():
            for i in np.flatnonzero(repeated):
                payload = (ids[i], files[i], {name: values[i] for name, values in columns.items()})
                lost = self.earliest.offer(ids[i].item(), (int(files[i]), int(rows[i])), payload)
                if lost is not None:
                    self._reject(np.array([lost[0]]), np.array([lost[1]]), np.array([DUPLICATE_ID]))
            decoded &= ~repeated
        if decoded.all():
            self._admit(ids, files, columns)
        else:
            self._admit(ids[decoded], files[decoded], {name: v[decoded] for name, v in columns.items()})

    def finish(self) -> None:
        """Admit the winning row of each repeated id (after the last ``add``)."""
        if self.finished:
            return
        self.finished = True
        winners = self.earliest.winners()
        if winners:
            ids = np.array([w[0] for w in winners])
            files = np.array([w[1] for w in winners])
            self._admit(ids, files, {name: np.array([w[2][name] for w in winners])
                                     for name in (*self.columns, POSITION)})

    def _admit(self, ids, files, columns) -> None:
        """Decoded rows, each the only row of its id: non-finite scores are rejected,
        the excluded counted, the rest go to the top-k (and the scores writer)."""
        score = columns[self.strategy]
        finite = np.isfinite(score)  # e.g. features that overflow the model
        if not finite.all():
            self._reject(ids[~finite], files[~finite], np.full((~finite).sum(), NONFINITE_SCORE))
            ids, files = ids[finite], files[finite]
            columns = {name: v[finite] for name, v in columns.items()}
            score = columns[self.strategy]
        excluded = is_member(self.exclude, ids)
        keep = ~excluded
        self.rows_excluded += int(excluded.sum())
        self.rows_scored += int(keep.sum())
        predicted = columns["predicted_class"]
        position = {POSITION: columns[POSITION]}
        if keep.all():
            self.topk.add(ids, score, predicted, position)
        else:
            self.topk.add(ids[keep], score[keep], predicted[keep], {POSITION: position[POSITION][keep]})
        if self.scores is not None:
            self.scores.add({"id": ids, "predicted_class": predicted, "excluded": excluded,
                             **{s: columns[s] for s in self.scores.strategies}})

    def _reject(self, ids, files, reasons) -> None:
        for i, f, r in zip(ids.tolist(), files.tolist(), reasons.tolist()):
            sample_id = None if r == NULL_ID else i
            self.reject_ids.append(sample_id)
            self.reject_files.append(self.file_name(f, sample_id))
            self.reject_reasons.append(r)
            self.rejects_by_reason[reason_kind(r)] += 1

    def accounting(self) -> dict:
        self.finish()
        return {"rows_read": self.rows_read, "rows_scored": self.rows_scored,
                "rows_rejected": self.rows_rejected, "rows_excluded": self.rows_excluded,
                "rejects_by_reason": dict(sorted(self.rejects_by_reason.items()))}

    def selection_table(self) -> pa.Table:
        """``rank``, ``id``, ``score``, ``strategy``, ``predicted_class`` and where the row
        lives: ``file`` (index into the pool's files, as selection.json lists them; image
        files: into the listing), ``row_group`` and ``row`` (within the file)."""
        self.finish()
        ids, scores, classes, extra = self.topk.result_with_extra()
        position = extra.get(POSITION, np.zeros(0, np.int64))
        files, rows = position >> ROW_BITS, position & ((1 << ROW_BITS) - 1)
        return pa.table({
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int64()),
            "id": pa.array(ids.tolist(), self.id_type),
            "score": pa.array(scores, pa.float64()),
            "strategy": pa.array([self.strategy] * len(ids), pa.string()),
            "predicted_class": pa.array(classes, pa.int64()),
            "file": pa.array(files, pa.int32()),
            "row_group": pa.array(row_group_of(self.row_groups, files, rows), pa.int32()),
            "row": pa.array(rows, pa.int64()),
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
