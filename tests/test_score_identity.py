"""The same selection, bit for bit, whatever order rows arrive in: duplicates are decided
by position (file order, then row order within the file), never by arrival.

- the driver's reduction fed the same batches in every order;
- the in-process pipeline reading its units last first (the test-only
  ``TIDAL_RAY_TEST_UNIT_ORDER=reverse``) against pool order;
- Ray Data without ``preserve_order`` (1 and 2 actors, twice) against in-process, on a
  pool whose first file decodes slowly (PNG, several row groups) and whose last, small
  file repeats earlier ids with other pixels.
"""
import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import DUPLICATE_ID, UNDECODABLE
from tidal_ray.data.make_pool import synthetic_rows
from tidal_ray.score.reduce import Reduction
from tidal_ray.score.pipeline import score_pool

from test_score_pipeline import SHAPE, train_checkpoint


def scorer_batch(ids, files, rows, scores, reasons=None):
    n = len(ids)
    return {"id": np.asarray(ids, np.int64), "file": np.asarray(files, np.int32), "row": np.asarray(rows, np.int64),
            "reason": np.asarray(reasons if reasons is not None else [""] * n, dtype=str),
            "predicted_class": np.zeros(n, np.int64), "entropy": np.asarray(scores, np.float64)}


def reduce_in(order, batches, repeated):
    reduction = Reduction(4, "entropy", 3, pa.int64(), np.array([9]), lambda f, i: f"file-{f}", repeated=repeated)
    for i in order:
        reduction.add(batches[i])
    reduction.finish()
    rejects = sorted(reduction.rejects_table().to_pylist(), key=lambda r: (r["file"], str(r["id"]), r["reason"]))
    return reduction.selection_table(), rejects, reduction.accounting()


def test_reduction_is_the_same_in_every_arrival_order():
    # Id 5: file 0 row 3 (undecodable), file 1 row 0 (wins: the earliest decodable), file 2
    # row 1 (scores highest but comes last). Id 7: twice in file 1; the later row scores higher.
    batches = [
        scorer_batch([1, 2, 3, 5], [0] * 4, [0, 1, 2, 3], [0.1, 0.2, 0.3, 0.0], ["", "", "", UNDECODABLE]),
        scorer_batch([5, 7, 8, 7], [1] * 4, [0, 1, 2, 3], [0.4, 0.5, 0.6, 0.95]),
        scorer_batch([9, 5], [2] * 2, [0, 1], [0.99, 0.9]),
    ]
    repeated = id_utils.repeated_ids([b["id"] for b in batches], pa.int64())
    assert repeated.tolist() == [5, 7]
    results = [reduce_in(order, batches, repeated) for order in itertools.permutations(range(3))]
    selection, rejects, accounting = results[0]
    for other in results[1:]:
        assert other[0].equals(selection) and other[1:] == (rejects, accounting)
    assert selection.column("id").to_pylist() == [8, 7, 5, 3]
    assert selection.column("score").to_pylist() == [0.6, 0.5, 0.4, 0.3]
    assert rejects == [{"id": 5, "file": "file-0", "reason": UNDECODABLE},
                       {"id": 7, "file": "file-1", "reason": DUPLICATE_ID},
                       {"id": 5, "file": "file-2", "reason": DUPLICATE_ID}]
    assert accounting == {"rows_read": 10, "rows_scored": 6, "rows_rejected": 3, "rows_excluded": 1,
                          "rejects_by_reason": {DUPLICATE_ID: 2, UNDECODABLE: 1}}


def test_earliest_rows_and_repeated_ids_for_string_ids():
    chunks = [np.array(["b/1.png", "a", "c"]), pa.array(["a", None, "d", "b/1.png"]), np.array(["a"])]
    repeated = id_utils.repeated_ids(chunks, pa.string())
    assert repeated.tolist() == ["a", "b/1.png"]
    earliest = id_utils.EarliestRows(repeated)
    assert earliest.candidates(np.array(["a", "c", "b/1.png"])).tolist() == [True, False, True]
    assert earliest.offer("a", (2, 0), "third") is None
    assert earliest.offer("a", (0, 1), "first") == "third"
    assert earliest.offer("a", (1, 0), "second") == "second"
    assert earliest.winners() == ["first"]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[0]).save(buf, format="PNG")
    return buf.getvalue()


def write_image_file(uri, ids, pixels, row_group_size):
    table = pa.table({"id": pa.array(ids, pa.int64()), "image": pa.array([png(p) for p in pixels], pa.binary())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    storage.write_bytes(uri, buf.getvalue())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("ck-identity") / "small_cnn", epochs=1, rows=600)


def make_duplicate_pool(root) -> str:
    """A slow first file (PNG, 1,200 rows in 6 row groups), a middle file, and a small last
    file that repeats ids of both with other pixels: the rows that must lose."""
    pool = f"{root}/pool"
    pixels, _ = synthetic_rows(np.arange(1_700), SHAPE, 10, seed=5)
    write_image_file(f"{pool}/part-00000.parquet", np.arange(1_200), pixels[:1_200], row_group_size=200)
    write_image_file(f"{pool}/part-00001.parquet", np.arange(1_200, 1_680), pixels[1_200:1_680], row_group_size=240)
    repeats = [3, 17, 450, 1_199, 1_250, 1_679, 1_250]   # 1_250 twice in the last file too
    write_image_file(f"{pool}/part-00002.parquet", repeats + [1_680 + i for i in range(13)], pixels[1_680:1_700],
                     row_group_size=20)
    return pool


def outputs(out) -> tuple:
    selection = storage.read_parquet(f"{out}/selection.parquet")
    rejects = sorted(storage.read_parquet(f"{out}/rejects.parquet").to_pylist(), key=lambda r: (r["file"], r["id"]))
    scores = storage.read_parquet(f"{out}/scores/part-00000.parquet").sort_by("id")
    summary = storage.read_json(f"{out}/selection.json")
    accounting = {k: summary[k] for k in ("rows_read", "rows_scored", "rows_rejected", "rows_excluded")}
    return selection, rejects, scores, accounting


def test_in_process_pipeline_gives_the_same_selection_reading_its_units_backwards(tmp_path, checkpoint,
                                                                                    monkeypatch):
    pool = make_duplicate_pool(tmp_path)
    common = dict(save_scores=True, use_ray=False, progress=False, exclude_ids=[17])
    score_pool(checkpoint, pool, 50, str(tmp_path / "forward"), **common)
    monkeypatch.setenv("TIDAL_RAY_TEST_UNIT_ORDER", "reverse")
    score_pool(checkpoint, pool, 50, str(tmp_path / "backward"), **common)
    forward, backward = outputs(tmp_path / "forward"), outputs(tmp_path / "backward")
    assert forward[0].equals(backward[0]) and forward[2].equals(backward[2])
    assert forward[1] == backward[1] and forward[3] == backward[3]
    assert forward[3] == {"rows_read": 1_700, "rows_scored": 1_692, "rows_rejected": 7,
                          "rows_excluded": 1}
    assert [(r["id"], r["reason"]) for r in forward[1]] == [(i, DUPLICATE_ID) for i in [3, 17, 450, 1_199, 1_250,
                                                                                          1_250, 1_679]]
    assert {r["file"] for r in forward[1]} == {f"{pool}/part-00002.parquet"}


@pytest.mark.slow
def test_ray_without_preserve_order_matches_in_process_bit_for_bit(ray_local, s3_bucket, checkpoint):
    pool = make_duplicate_pool(s3_bucket)
    common = dict(save_scores=True, progress=False, exclude_ids=[17])
    score_pool(checkpoint, pool, 50, f"{s3_bucket}/local", use_ray=False, **common)
    expected = outputs(f"{s3_bucket}/local")
    for name, actors in [("one", (1, 1)), ("two", (2, 2)), ("again", (1, 2))]:
        summary = score_pool(checkpoint, pool, 50, f"{s3_bucket}/{name}", actors=actors, **common)
        got = outputs(f"{s3_bucket}/{name}")
        assert got[0].equals(expected[0]), name
        assert got[2].equals(expected[2]), name
        assert got[1:2] + got[3:] == expected[1:2] + expected[3:], name
        assert summary["repeated_ids"] == 6 and summary["timing"]["first_row_seconds"] > 0


def test_a_rows_scores_do_not_depend_on_its_batch_bald_included(checkpoint):
    from tidal_ray.score.scorer import BatchScorer

    pixels, _ = synthetic_rows(np.arange(300), SHAPE, 10, seed=3)
    ids = np.arange(1_000, 1_300)
    scorer = BatchScorer(checkpoint, seed=4, mc_samples=8, pad_to=64)
    whole = scorer({"id": ids, "x": pixels})
    order = np.random.default_rng(0).permutation(300)[:170]
    part = scorer({"id": ids[order], "x": pixels[order]})
    for name in ("bald", "tidal-entropy", "random", "predicted_class"):
        np.testing.assert_array_equal(part[name], whole[name][order], err_msg=name)
    assert np.isfinite(whole["bald"]).all() and whole["bald"].max() > 0  # the passes really differ
    other_seed = BatchScorer(checkpoint, seed=5, mc_samples=8, pad_to=64)({"id": ids, "x": pixels})
    assert not np.array_equal(other_seed["bald"], whole["bald"])


def test_bf16_precision_scores_close_to_fp32(checkpoint):
    from tidal_ray.score.scorer import BatchScorer

    pixels, _ = synthetic_rows(np.arange(128), SHAPE, 10, seed=3)
    batch = {"id": np.arange(128), "x": pixels}
    fp32 = BatchScorer(checkpoint, strategies=["entropy"], pad_to=64)(batch)
    bf16 = BatchScorer(checkpoint, strategies=["entropy"], pad_to=64, precision="bf16")(batch)
    assert set(fp32) == set(bf16) and "tidal-entropy" not in fp32  # only the strategies asked for
    np.testing.assert_allclose(bf16["entropy"], fp32["entropy"], atol=0.05)


def test_read_units_give_every_row_once_with_its_position_in_bounded_blocks(tmp_path):
    from tidal_ray.data.pool import describe_pool
    from tidal_ray.data.read import read_unit, read_units

    blobs = [bytes([i]) * 1_000 for i in range(30)]
    for name, ids in [("a", range(30)), ("b", range(100, 130))]:
        table = pa.table({"id": pa.array(list(ids), pa.int64()), "image": pa.array(blobs, pa.binary())})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=10)
        storage.write_bytes(str(tmp_path / "pool" / f"{name}.parquet"), buf.getvalue())
    spec = describe_pool(str(tmp_path / "pool"))
    units = read_units(spec)
    assert [(u["file"], u["row_group"]) for u in units] == [(f, g) for f in range(2) for g in range(3)]
    seen = []
    for unit in units[::-1]:
        for table in read_unit(unit, spec.slim(), block_rows=4, max_bytes=2_500):
            assert table.num_rows <= 2 and table.column_names == ["id", "image", "file", "row"]
            seen += zip(table.column("file").to_pylist(), table.column("row").to_pylist(), table.column("id").to_pylist())
    assert sorted(seen) == [(0, r, r) for r in range(30)] + [(1, r, 100 + r) for r in range(30)]


BATCH_MODES = {"power": dict(batch_mode="power", beta=2.0, cycle=3),
               "cluster": dict(batch_mode="cluster", clusters=6, candidates=120, per_class_quota=True, cycle=1)}


def mode_outputs(out) -> tuple:
    selection = storage.read_parquet(f"{out}/selection.parquet")
    rejects = sorted(storage.read_parquet(f"{out}/rejects.parquet").to_pylist(), key=lambda r: (r["file"], r["id"]))
    summary = storage.read_json(f"{out}/selection.json")
    kept = ("rows_read", "rows_scored", "rows_rejected", "rows_excluded", "batch_mode", "beta", "clusters",
            "candidates", "sampled_rows")
    return selection, rejects, {k: summary.get(k) for k in kept}


@pytest.mark.parametrize("mode", sorted(BATCH_MODES))
def test_batch_modes_in_process_are_the_same_reading_units_backwards(tmp_path, checkpoint, monkeypatch, mode):
    pool = make_duplicate_pool(tmp_path)
    common = dict(use_ray=False, progress=False, exclude_ids=[17], strategy="margin", **BATCH_MODES[mode])
    score_pool(checkpoint, pool, 40, str(tmp_path / "forward"), **common)
    monkeypatch.setenv("TIDAL_RAY_TEST_UNIT_ORDER", "reverse")
    score_pool(checkpoint, pool, 40, str(tmp_path / "backward"), **common)
    forward, backward = mode_outputs(tmp_path / "forward"), mode_outputs(tmp_path / "backward")
    assert forward[0].equals(backward[0]) and forward[1:] == backward[1:]
    selection = forward[0]
    assert forward[2]["batch_mode"] == mode
    if mode == "power":
        assert selection.num_rows == 40
        keys = selection.column("key").to_numpy()
        assert (np.diff(keys) <= 0).all()  # ranked by key, not by score
        assert not (np.diff(selection.column("score").to_numpy()) <= 0).all()
    else:
        # ceil(40 / 10) = 4 per predicted class: this small model predicts few classes, so the
        # quota's picks come first and the candidates passed over fill the batch to k.
        classes = selection.column("predicted_class").to_numpy()
        quota_picks = 4 * len(set(classes))
        assert selection.num_rows == 40 and quota_picks < 40
        assert set(np.bincount(classes[:quota_picks]).tolist()) <= {0, 4}
        assert len(set(selection.column("cluster").to_pylist())) >= 4
        assert forward[2]["sampled_rows"] == 1_692  # every unlabeled, decodable id once


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(BATCH_MODES))
def test_batch_modes_on_ray_match_in_process_on_any_actor_count(ray_local, s3_bucket, checkpoint, mode):
    pool = make_duplicate_pool(s3_bucket)
    common = dict(progress=False, exclude_ids=[17], strategy="margin", **BATCH_MODES[mode])
    score_pool(checkpoint, pool, 40, f"{s3_bucket}/local", use_ray=False, **common)
    expected = mode_outputs(f"{s3_bucket}/local")
    for name, actors in [("one", (1, 1)), ("two", (2, 2)), ("again", (1, 2))]:
        score_pool(checkpoint, pool, 40, f"{s3_bucket}/{name}", actors=actors, **common)
        got = mode_outputs(f"{s3_bucket}/{name}")
        assert got[0].equals(expected[0]), (name, got[0].to_pylist()[:5], expected[0].to_pylist()[:5])
        assert got[1:] == expected[1:], name
