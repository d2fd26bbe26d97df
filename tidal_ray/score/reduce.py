"""The reduction of a scored pool: ``BlockFilter`` on the scorer actors (each block
loses the rows that cannot be selected), then ``Reduction`` on the driver (row
accounting, rejects, duplicates, exclusions and the selection by batch mode, DESIGN
§8), plus the ``--save-scores`` writer and the progress line.

Driver memory: O(k) for the selection (``cluster``: O(M) candidates), O(bins) for the
score histogram, O(rejects) for the rejects table, and the repeated ids (found before
scoring by ``ids.repeated_ids``) with one held row each; what it reads is about k rows
per block (``BlockFilter``), not the pool.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import DUPLICATE_ID, NULL_ID, is_decoded, numpy_column, reason_kind
from tidal_ray.data.ids import is_member
from tidal_ray.data.lookup import decode_positions, encode_positions, row_group_of
from tidal_ray.method import batch as batch_modes
from tidal_ray.method.topk import StreamingTopK

PROGRESS_SECONDS = 5.0
SCORES_ROWS_PER_PART = 1_000_000
NONFINITE_SCORE = "non-finite score"
HISTOGRAM_BINS = 50
POSITION = "position"        # a kept row's lookup.encode_positions, carried through the selection
# BlockFilter's tally of the rows it dropped: per block, on one row of what it keeps.
DROPPED_SCORED, DROPPED_EXCLUDED, DROPPED_HISTOGRAM = "dropped_scored", "dropped_excluded", "dropped_histogram"


def score_range(strategy: str, num_classes: int) -> tuple[float, float]:
    """The values a strategy's score can take (method/uncertainty.py): fixed histogram bins."""
    log_c = float(np.log(num_classes))
    return {"tidal-entropy": (0.0, log_c), "entropy": (0.0, log_c), "bald": (0.0, log_c),
            "margin": (-1.0, 0.0), "tidal-margin": (-1.0, 1.0),
            "least-confidence": (0.0, 1.0 - 1.0 / num_classes), "random": (0.0, 1.0)}[strategy]


class ScoreHistogram:
    """The scored rows' scores in fixed bins, filled as batches stream by: O(bins)."""

    def __init__(self, low: float, high: float, bins: int = HISTOGRAM_BINS):
        self.low, self.high = low, high
        self.counts = np.zeros(bins, dtype=np.int64)

    def bin_of(self, scores: np.ndarray) -> np.ndarray:
        bins = len(self.counts)
        position = np.floor((np.asarray(scores, np.float64) - self.low) / (self.high - self.low) * bins)
        return np.clip(position, 0, bins - 1).astype(np.int64)  # rounding past either end

    def add(self, scores: np.ndarray) -> None:
        self.counts += np.bincount(self.bin_of(scores), minlength=len(self.counts))

    def summary(self, selected_scores: np.ndarray) -> dict:
        """For selection.json: the bins' range, the pool's counts and the selection's."""
        selected = np.bincount(self.bin_of(selected_scores), minlength=len(self.counts))
        return {"low": self.low, "high": self.high, "bins": len(self.counts),
                "counts": self.counts.tolist(), "selected": selected.tolist()}


def selection_keys(batch: batch_modes.BatchParams, strategy: str, score: np.ndarray, ids: np.ndarray,
                   seed: int, cycle: int) -> np.ndarray:
    """What the selection ranks rows by (higher first, ties by id): the power keys, or
    the score itself (``topk``, and ``cluster``'s candidates)."""
    if batch.mode == "power":
        return batch_modes.power_keys(strategy, score, ids, batch.beta, seed, cycle)
    return score


@dataclass(frozen=True)
class BlockFilter:
    """The reduction's first half, run by the scorer on each block it scores, so the
    driver reads about ``kept`` rows per block instead of every row: the object store's
    pages of every block the driver reads count in its RSS, which then grew with the pool.

    A decoded row with a finite score and an id the pool holds once (not in
    ``repeated``) is dropped when its id is in ``exclude`` or when it is outside the
    rows the block's own ``StreamingTopK`` of ``kept`` holds in the selection's order
    (``selection_keys``: its top, and with a quota each predicted class's top as well). A
    row of the pool's selection is among what its block holds, so the selection does not
    change. Every other row reaches the driver
    as it was: rejects, non-finite scores and repeated ids are settled there. The dropped
    rows are counted, and the scored ones' scores put in the histogram's bins, in three
    columns that the driver adds up (``Reduction.add``), held by the first kept row; one
    row always stays to hold them."""
    kept: int
    strategy: str
    num_classes: int
    id_type: pa.DataType
    exclude: np.ndarray
    repeated: np.ndarray
    per_class_quota: bool = False
    batch: batch_modes.BatchParams = batch_modes.BatchParams()
    seed: int = 0
    cycle: int = 0

    def __call__(self, block):
        """``block``: the scorer's output, an Arrow table or a dict of columns (the same kind back)."""
        ids = id_utils.to_numpy(block["id"], self.id_type)
        score = numpy_column(block, self.strategy)
        droppable = is_decoded(block["reason"]) & np.isfinite(score) & ~is_member(self.repeated, ids)
        excluded = droppable & is_member(self.exclude, ids)
        rows = np.flatnonzero(droppable & ~excluded)
        best = StreamingTopK(self.kept, per_class_quota=self.per_class_quota, num_classes=self.num_classes)
        keys = selection_keys(self.batch, self.strategy, score[rows], ids[rows], self.seed, self.cycle)
        best.add(ids[rows], keys, numpy_column(block, "predicted_class")[rows], {"row": rows})
        keep = ~droppable
        keep[best.held().get("row", np.array([], np.int64))] = True
        if len(keep) and not keep.any():
            keep[0] = True
        dropped = ~keep
        histogram = ScoreHistogram(*score_range(self.strategy, self.num_classes))
        histogram.add(score[dropped & ~excluded])
        first = np.arange(int(keep.sum())) == 0  # the kept row that holds the tally
        tally = {DROPPED_SCORED: first * int((dropped & ~excluded).sum()),
                 DROPPED_EXCLUDED: first * int((dropped & excluded).sum())}
        bins = [histogram.counts.tolist() if holds else None for holds in first]
        if isinstance(block, pa.Table):
            out = block.filter(pa.array(keep))
            for name, values in tally.items():
                out = out.append_column(name, pa.array(values, pa.int64()))
            return out.append_column(DROPPED_HISTOGRAM, pa.array(bins, pa.list_(pa.int64())))
        return {**{name: np.asarray(values)[keep] for name, values in block.items()}, **tally,
                DROPPED_HISTOGRAM: bins}


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

    ``batch`` (``method.batch.BatchParams``) picks the mode: ``topk`` keeps the k best
    scores; ``power`` the k largest keys ``power_keys(strategy, score, id, beta, seed,
    cycle)``; ``cluster`` the top M scores with their ``cluster`` column (batches must
    carry it), picked round-robin over clusters at the end.

    Each kept row carries its position, so the selection says where each picked row
    lives (``file``, ``row_group``, ``row``: ``row_groups`` is the pool's per-file row
    group row counts, ``PoolSpec.row_groups``; image files have none: row group -1)."""

    def __init__(self, k: int, strategy: str, num_classes: int, id_type: pa.DataType, exclude: np.ndarray,
                 file_name, *, repeated: np.ndarray | None = None, per_class_quota: bool = False,
                 scores: ScoresWriter | None = None, batch: batch_modes.BatchParams = batch_modes.BatchParams(),
                 seed: int = 0, cycle: int = 0, row_groups=()):
        self.strategy, self.id_type, self.exclude, self.file_name = strategy, id_type, exclude, file_name
        self.row_groups = row_groups
        self.k, self.batch, self.seed, self.cycle = int(k), batch, int(seed), int(cycle)
        self.quota = -(-self.k // num_classes) if per_class_quota else None
        kept = batch.candidates if batch.mode == "cluster" else k
        self.topk = StreamingTopK(kept, per_class_quota=per_class_quota, num_classes=num_classes)
        self.earliest = id_utils.EarliestRows(id_utils.empty(id_type) if repeated is None else repeated)
        self.scores = scores
        self.histogram = ScoreHistogram(*score_range(strategy, num_classes))
        self.columns = ("predicted_class", strategy) + tuple(s for s in (scores.strategies if scores else ())
                                                               if s != strategy)
        if batch.mode == "cluster":
            self.columns += ("cluster",)
        self.rows_read = self.rows_scored = self.rows_excluded = 0
        self.rows_at_driver = 0  # of rows_read: those that reached the driver (BlockFilter drops the rest)
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
        self.rows_at_driver += len(ids)
        if DROPPED_SCORED in (batch.column_names if isinstance(batch, pa.Table) else batch):
            self._count_dropped(batch)
        decoded = is_decoded(batch["reason"])
        if not decoded.all():
            self._reject(ids[~decoded], files[~decoded], numpy_column(batch, "reason")[~decoded])
        columns = {name: numpy_column(batch, name) for name in self.columns}
        rows = numpy_column(batch, "row").astype(np.int64)
        columns[POSITION] = encode_positions(files, rows)
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

    def _count_dropped(self, batch) -> None:
        """The rows a ``BlockFilter`` dropped from this batch's blocks: read, and scored
        or excluded."""
        scored = int(numpy_column(batch, DROPPED_SCORED).sum())
        excluded = int(numpy_column(batch, DROPPED_EXCLUDED).sum())
        self.rows_read += scored + excluded
        self.rows_scored += scored
        self.rows_excluded += excluded
        bins = batch[DROPPED_HISTOGRAM]
        for counts in (bins.to_pylist() if isinstance(bins, (pa.Array, pa.ChunkedArray)) else bins):
            if counts is not None:
                self.histogram.counts += np.asarray(counts, np.int64)

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
        finite = np.isfinite(columns[self.strategy])  # e.g. features that overflow the model
        if not finite.all():
            self._reject(ids[~finite], files[~finite], np.full((~finite).sum(), NONFINITE_SCORE))
            ids, files = ids[finite], files[finite]
            columns = {name: v[finite] for name, v in columns.items()}
        excluded = is_member(self.exclude, ids)
        keep = ~excluded
        self.rows_excluded += int(excluded.sum())
        self.rows_scored += int(keep.sum())
        rows = ids if keep.all() else ids[keep]
        kept = columns if keep.all() else {name: v[keep] for name, v in columns.items()}
        score, predicted = kept[self.strategy], kept["predicted_class"]
        self.histogram.add(score)
        keys = selection_keys(self.batch, self.strategy, score, rows, self.seed, self.cycle)
        extra = {POSITION: kept[POSITION]}
        if self.batch.mode == "power":
            extra["score"] = score
        elif self.batch.mode == "cluster":
            extra["cluster"] = kept["cluster"].astype(np.int64)
        self.topk.add(rows, keys, predicted, extra)
        if self.scores is not None:
            self.scores.add({"id": ids, "predicted_class": columns["predicted_class"], "excluded": excluded,
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

    def score_histogram(self) -> dict:
        """The scored rows' scores in ``HISTOGRAM_BINS`` fixed bins, and the selection's."""
        return self.histogram.summary(self.selection_table().column("score").to_numpy())

    def selection_table(self) -> pa.Table:
        """``rank``, ``id``, ``score`` (the strategy's), ``strategy``, ``predicted_class``,
        and where the row lives: ``file`` (index into the pool's files, as selection.json
        lists them; image files: into the listing), ``row_group`` and ``row`` (within the
        file); ``power`` adds ``key``, ``cluster`` adds ``cluster``. Rows in pick order."""
        self.finish()
        ids, ranked, classes, extra = self.topk.result_with_extra()
        position = extra.get(POSITION, np.zeros(len(ids), np.int64))
        mode_columns = {}
        if self.batch.mode == "power":
            scores = extra.get("score", ranked)
            mode_columns["key"] = pa.array(ranked, pa.float64())
        elif self.batch.mode == "cluster":
            clusters = extra.get("cluster", np.zeros(len(ids), np.int64))
            picked = batch_modes.cluster_pick(ids, ranked, clusters, classes, self.k, self.quota)
            ids, scores, classes, position = ids[picked], ranked[picked], classes[picked], position[picked]
            mode_columns["cluster"] = pa.array(clusters[picked], pa.int64())
        else:
            scores = ranked
        files, rows = decode_positions(position)
        return pa.table({
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int64()),
            "id": pa.array(ids.tolist(), self.id_type),
            "score": pa.array(scores, pa.float64()),
            "strategy": pa.array([self.strategy] * len(ids), pa.string()),
            "predicted_class": pa.array(classes, pa.int64()),
            "file": pa.array(files, pa.int32()),
            "row_group": pa.array(row_group_of(self.row_groups, files, rows), pa.int32()),
            "row": pa.array(rows, pa.int64()),
            **mode_columns,
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
