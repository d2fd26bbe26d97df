"""Streaming top-k equals a plain sort of everything, whatever the batching; exclusion
is checked through the driver's reduction, the one place that applies it."""
import math

import numpy as np
import pyarrow as pa
import pytest

from tidal_ray.score.reduce import Reduction
from tidal_ray.method.topk import StreamingTopK


def sort_topk(ids, scores, classes, k, exclude=(), quota=None):
    keep = ~np.isin(ids, np.asarray(list(exclude), dtype=ids.dtype)) if len(exclude) else np.ones(len(ids), bool)
    rows = sorted(zip(-scores[keep], ids[keep], classes[keep]))
    if quota is not None:  # the top k of each class's best `quota`, then the best rows left up to k
        per_class, kept = {}, []
        for row in rows:
            if per_class.get(row[2], 0) < quota:
                per_class[row[2]] = per_class.get(row[2], 0) + 1
                kept.append(row)
        kept = kept[:k]
        rows = sorted(kept + [row for row in rows if row not in kept][: k - len(kept)])
    rows = rows[:k]
    return [r[1] for r in rows], [-r[0] for r in rows]


def stream(ids, scores, classes, k, rng, exclude=(), per_class_quota=False, num_classes=None):
    """Every row through a Reduction in random batches, as scoring feeds it."""
    exclude = np.unique(np.asarray(list(exclude), dtype=np.int64))
    reduction = Reduction(k, "random", num_classes or 10, pa.int64(), exclude, lambda f, i: "pool",
                          per_class_quota=per_class_quota)
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=rng.integers(1, 30), replace=False))
    for part in np.split(np.arange(len(ids)), cuts):
        reduction.add({"id": ids[part], "random": scores[part], "predicted_class": classes[part],
                       "reason": np.full(len(part), ""), "file": np.zeros(len(part), np.int32),
                       "row": part.astype(np.int64)})
    return reduction


@pytest.mark.parametrize("seed", range(25))
def test_streaming_equals_sort(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    ids = rng.permutation(n * 3)[:n].astype(np.int64)
    scores = rng.integers(0, 20, n).astype(np.float64) / 7   # many tied scores
    classes = rng.choice(5, n, p=[0.5, 0.3, 0.15, 0.04, 0.01])  # a quota often falls short
    k = int(rng.integers(1, n + 50))
    exclude = rng.choice(ids, size=rng.integers(0, n // 2), replace=False) if seed % 2 else ()
    quota = bool(seed % 3 == 0)

    reduction = stream(ids, scores, classes, k, rng, exclude=exclude, per_class_quota=quota, num_classes=5)
    got_ids, got_scores, got_classes = reduction.topk.result()
    want_ids, want_scores = sort_topk(ids, scores, classes, k, exclude, math.ceil(k / 5) if quota else None)
    assert got_ids.tolist() == want_ids
    np.testing.assert_array_equal(got_scores, want_scores)
    assert reduction.rows_read == n and reduction.rows_excluded == len(exclude)
    assert reduction.topk.rows_in == n - len(exclude)
    assert not set(got_ids.tolist()) & set(np.asarray(exclude).tolist())


def test_string_ids_tie_break_by_id():
    topk = StreamingTopK(3)
    topk.add(np.array(["img/b.png", "img/a.png"]), np.array([0.5, 0.5]))
    topk.add(np.array(["img/c.png", "img/0.png"]), np.array([0.9, 0.5]))
    assert topk.result()[0].tolist() == ["img/c.png", "img/0.png", "img/a.png"]


def test_a_quota_fills_the_batch_with_the_best_rows_left_when_few_classes_are_predicted():
    # k = 10 over 5 classes: 2 a class; only classes 0 and 3 are predicted, so the quota
    # gives 0, 1, 30, 31 and the six best rows left (2-7, all class 0) fill the batch.
    topk = StreamingTopK(10, per_class_quota=True, num_classes=5)
    for part in np.array_split(np.arange(40)[::-1], 3):  # the best rows arrive last
        topk.add(part, 1 - part / 40, np.where(part < 30, 0, 3))
    ids, _, classes = topk.result()
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 30, 31]
    assert np.bincount(classes).tolist() == [8, 0, 0, 2]
    # Within quota the batch is as before: class 3 keeps 2 rows although 7 beat 30.
    few = StreamingTopK(4, per_class_quota=True, num_classes=2)
    few.add(np.arange(40), 1 - np.arange(40) / 40, np.where(np.arange(40) < 30, 0, 1))
    assert few.result()[0].tolist() == [0, 1, 30, 31]


def test_memory_stays_bounded():
    rng = np.random.default_rng(0)
    topk = StreamingTopK(100)
    for start in range(0, 200_000, 5000):
        topk.add(np.arange(start, start + 5000), rng.random(5000), extra={"row": np.arange(5000)})
        assert len(topk.held()["row"]) <= 100


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        StreamingTopK(k)


def test_nan_score_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        StreamingTopK(2).add(np.array([1, 2]), np.array([0.1, np.nan]))


def test_exclusion_ids_of_another_type_are_an_error_not_ignored():
    from tidal_ray.errors import BadInput
    from tidal_ray.data.ids import from_user

    with pytest.raises(BadInput, match="ids must be integers to match the pool"):
        from_user(np.array(["img/1.png", "img/2.png"]), pa.int64(), "exclude_ids")


@pytest.mark.parametrize("seed", range(12))
def test_block_filter_drops_rows_on_the_scorers_without_changing_the_selection_or_the_counts(seed):
    """The same blocks through a Reduction as they are and through BlockFilter first (as
    the scorers send them): the same selection, accounting, rejects and histogram, in
    every batch mode, with exclusions, repeated ids, rejects, non-finite scores and ties."""
    from tidal_ray.method.batch import BatchParams
    from tidal_ray.score.reduce import BlockFilter

    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(300, 2000)), int(rng.integers(1, 40))
    ids = rng.permutation(n * 2)[:n].astype(np.int64)
    ids[rng.choice(n, 10, replace=False)] = ids[:10]  # repeated ids (some rows repeat themselves: harmless)
    scores = -rng.integers(0, 30, n).astype(np.float64) / 30   # margins, many ties
    scores[rng.choice(n, 3, replace=False)] = np.inf
    reasons = np.where(rng.random(n) < 0.02, "undecodable image", "")
    scores[reasons != ""] = np.nan
    classes = np.where(rng.random(n) < 0.01, 3, rng.integers(0, 3, n))  # class 3 short of a quota
    batch = [BatchParams("topk"), BatchParams("power", beta=2.0),
             BatchParams("cluster", clusters=3, candidates=3 * k)][seed % 3]
    quota = seed % 2 == 1
    exclude = np.unique(rng.choice(ids, n // 5, replace=False))
    values, counts = np.unique(ids, return_counts=True)
    repeated = values[counts > 1]
    kept = batch.candidates if batch.mode == "cluster" else k
    block_filter = BlockFilter(kept, "margin", 4, pa.int64(), exclude, repeated, quota, batch, seed, 3)

    def reduce(filtered: bool) -> Reduction:
        reduction = Reduction(k, "margin", 4, pa.int64(), exclude, lambda f, i: "pool", repeated=repeated,
                              per_class_quota=quota, batch=batch, seed=seed, cycle=3)
        for part in np.array_split(rng.permutation(n) if filtered else np.arange(n), 7):
            block = {"id": ids[part], "file": np.zeros(len(part), np.int32), "row": part.astype(np.int64),
                     "reason": reasons[part], "predicted_class": np.where(reasons[part] == "", classes[part], -1),
                     "margin": scores[part], "cluster": classes[part] % 3}
            block = pa.table(block) if filtered and seed % 4 == 0 else block
            reduction.add(block_filter(block) if filtered else block)
        return reduction

    plain, filtered = reduce(False), reduce(True)
    assert filtered.selection_table().equals(plain.selection_table())
    assert filtered.accounting() == plain.accounting() and plain.rows_read == n
    assert filtered.score_histogram() == plain.score_histogram()
    assert sorted(filtered.reject_reasons) == sorted(plain.reject_reasons)
    # Each of the 7 blocks sends at most what its StreamingTopK of `kept` holds (with a
    # quota, each class's best ceil(kept / 4) as well), plus the rows the driver settles.
    held = kept + (4 * -(-kept // 4) if quota else 0)
    settled = int((~np.isfinite(scores) | np.isin(ids, repeated)).sum())
    assert plain.rows_at_driver == n and filtered.rows_at_driver <= 7 * held + settled
