"""Whole-pool scoring on a real local Ray (2 CPUs) reading from the real loopback S3 server:
exact top-k, exclusions, repeatability, rejects and row accounting, image prefixes, bad input."""
import io
import platform
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from tidal_ray.data import storage
from tidal_ray.train.checkpoint import save_checkpoint
from tidal_ray.cli import main
from tidal_ray.data.make_pool import make_pool, synthetic_rows
from tidal_ray.data.decode import NOT_FINITE, NULL_ID, UNDECODABLE, WRONG_LENGTH
from tidal_ray.data.ids import SeenIds
from tidal_ray.data.pool import SHAPE_KEY
from tidal_ray.method.uncertainty import DEFAULT_STRATEGY
from tidal_ray.score.pipeline import score_pool
from tidal_ray.score.scorer import BatchScorer
from tidal_ray.train.config import TrainConfig
from tidal_ray.train.loop import train_in_process

SHAPE = (1, 8, 8)


def train_checkpoint(path, input_shape=SHAPE, num_classes=10, backbone="small_cnn", epochs=2, rows=1500):
    ids = np.arange(rows)
    pixels, labels = synthetic_rows(ids, input_shape if len(input_shape) == 3 else (1, 8, 8), num_classes, seed=99)
    x = pixels if len(input_shape) == 3 else pixels.reshape(rows, -1).astype(np.float32) / 255.0
    config = TrainConfig(num_classes=num_classes, input_shape=input_shape, backbone=backbone, epochs=epochs,
                         batch_size=64)
    _, _, session = train_in_process(config, ids, x, labels)
    return save_checkpoint(session.last_state, str(path)).rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("ck") / "small_cnn")


def read(uri) -> pa.Table:
    return storage.read_parquet(uri)


def read_scores(out) -> pa.Table:
    return pa.concat_tables([read(f) for f, _ in storage.list_files(f"{out}/scores")])


def plain_topk(scores: pa.Table, strategy: str, k: int) -> list:
    ids = scores.column("id").to_numpy()
    values = scores.column(strategy).to_numpy()
    order = sorted(range(len(ids)), key=lambda i: (-values[i], ids[i]))[:k]
    return [int(ids[i]) for i in order]


def test_topk_is_exact_excludes_and_is_identical_across_runs_and_actor_counts(ray_local, s3_bucket, checkpoint):
    pool = f"{s3_bucket}/pool"
    make_pool(pool, "synthetic", rows=20_000, fmt="pixels", shards=4, shape=SHAPE, seed=1)
    # A fifth shard repeats the content of rows 0..199 under new ids: equal scores, ties by id.
    pixels, labels = synthetic_rows(np.arange(200), SHAPE, 10, seed=1)
    storage.write_parquet(f"{pool}/part-00004.parquet", pa.table({
        "id": pa.array(np.arange(20_000, 20_200), pa.int64()),
        "pixels": pa.array([row.tobytes() for row in pixels], pa.binary()),
        "label": pa.array(labels, pa.int64())}).replace_schema_metadata({SHAPE_KEY: b"1x8x8"}))

    # In-process first, without exclusions: which ids would be picked.
    first = score_pool(checkpoint, pool, 500, f"{s3_bucket}/plain", use_ray=False, progress=False)
    picked = read(f"{s3_bucket}/plain/selection.parquet").column("id").to_pylist()
    assert first["rows_read"] == 20_200 and len(picked) == 500

    # Exclude 100 of them (labeled: parquet; pending: csv) and 5 more given directly.
    labeled, pending, direct = picked[0:100:2], picked[1:100:2], picked[100:105]
    storage.write_parquet(f"{s3_bucket}/labeled.parquet", pa.table({"id": pa.array(labeled, pa.int64()),
                                                                    "label": pa.array([0] * 50, pa.int64())}))
    buf = io.BytesIO()
    pacsv.write_csv(pa.table({"id": pending}), buf)
    storage.write_bytes(f"{s3_bucket}/pending/cycle-1.csv", buf.getvalue())
    excluded = set(labeled) | set(pending) | set(direct)
    common = dict(exclude_uris=[f"{s3_bucket}/labeled.parquet", f"{s3_bucket}/pending"], exclude_ids=direct,
                  progress=False)

    runs = {}
    for name, actors, save in [("a", (1, 1), True), ("b", (1, 1), False), ("c", (2, 2), False)]:
        runs[name] = score_pool(checkpoint, pool, 500, f"{s3_bucket}/out-{name}", actors=actors, save_scores=save,
                                **common)
    selection = read(f"{s3_bucket}/out-a/selection.parquet")
    for name in "bc":
        assert read(f"{s3_bucket}/out-{name}/selection.parquet").equals(selection), name
        # Without --save-scores the scorers drop what cannot be selected; the counts stay whole.
        for key in ("rows_read", "rows_scored", "rows_excluded", "rows_rejected", "score_histogram"):
            assert runs[name][key] == runs["a"][key], (name, key)
        assert runs[name]["rows_at_driver"] < 20_200 // 2, name
    assert runs["a"]["rows_at_driver"] == 20_200

    summary = runs["a"]
    assert summary["rows_read"] == 20_200 and summary["rows_excluded"] == 105 and summary["rows_rejected"] == 0
    assert summary["rows_scored"] == 20_200 - 105
    assert summary["ray"] is True and summary["selected"] == 500
    assert [f["uri"] for f in summary["pool"]["files"]] == [f"{pool}/part-0000{i}.parquet" for i in range(5)]
    assert storage.read_json(f"{s3_bucket}/out-a/selection.json") == summary
    assert read(f"{s3_bucket}/out-a/rejects.parquet").num_rows == 0

    ids = selection.column("id").to_pylist()
    assert not excluded & set(ids)
    assert selection.column("rank").to_pylist() == list(range(1, 501))
    assert set(selection.column("strategy").to_pylist()) == {DEFAULT_STRATEGY} == {"margin"}
    # The exact top-k: a plain sort of every saved score (score desc, ties by id).
    scores = read_scores(f"{s3_bucket}/out-a")
    assert scores.num_rows == 20_200 and sorted(scores.column("id").to_pylist()) == list(range(20_200))
    assert {i for i, e in zip(scores.column("id").to_pylist(), scores.column("excluded").to_pylist()) if e} == excluded
    kept = scores.filter(pa.compute.invert(scores.column("excluded")))
    assert ids == plain_topk(kept, DEFAULT_STRATEGY, 500)
    np.testing.assert_array_equal(selection.column("score").to_numpy(),
                                  np.sort(kept.column(DEFAULT_STRATEGY).to_numpy())[::-1][:500])
    # Ties really occur (copied rows) and the smaller id wins them.
    by_id = dict(zip(scores.column("id").to_pylist(), scores.column(DEFAULT_STRATEGY).to_pylist()))
    assert all(by_id[i] == by_id[20_000 + i] for i in range(200))
    # Ray and the in-process path score identically: the unexcluded picks come first, in order.
    assert ids[:395] == [i for i in picked if i not in excluded]


def pixel_rows(ids, seed=0):
    pixels, _ = synthetic_rows(np.arange(len(ids)), SHAPE, 10, seed)
    return [p.tobytes() for p in pixels]


def test_bad_rows_are_rejected_with_reasons_and_accounted_exactly(ray_local, s3_bucket, tmp_path, checkpoint):
    # pixels on S3: a short row, a null id, duplicates within a file and across files.
    pool = f"{s3_bucket}/bad"
    blobs = pixel_rows(range(300))
    first_ids = list(range(200))
    first_ids[50] = None
    blobs[60] = blobs[60][:10]
    first_ids[70] = 3  # duplicate of id 3, later in the same file
    table = pa.table({"id": pa.array(first_ids, pa.int64()), "pixels": pa.array(blobs[:200], pa.binary())})
    storage.write_parquet(f"{pool}/part-00000.parquet", table.replace_schema_metadata({SHAPE_KEY: b"1x8x8"}))
    second_ids = list(range(200, 300))
    second_ids[5] = 10  # duplicate of id 10 from the first file
    table = pa.table({"id": pa.array(second_ids, pa.int64()), "pixels": pa.array(blobs[200:], pa.binary())})
    storage.write_parquet(f"{pool}/part-00001.parquet", table.replace_schema_metadata({SHAPE_KEY: b"1x8x8"}))

    summary = score_pool(checkpoint, pool, 20, f"{s3_bucket}/bad-out", exclude_ids=[0, 1], save_scores=True,
                         actors=(1, 2), progress=False)
    rejects = read(f"{s3_bucket}/bad-out/rejects.parquet").to_pylist()
    assert sorted(rejects, key=lambda r: (r["file"], str(r["id"]))) == [
        {"id": 3, "file": f"{pool}/part-00000.parquet", "reason": "duplicate id"},
        {"id": 60, "file": f"{pool}/part-00000.parquet", "reason": f"{WRONG_LENGTH}: 10 bytes, expected 64"},
        {"id": None, "file": f"{pool}/part-00000.parquet", "reason": NULL_ID},
        {"id": 10, "file": f"{pool}/part-00001.parquet", "reason": "duplicate id"},
    ]
    assert summary["rows_read"] == 300 and summary["rows_rejected"] == 4 and summary["rows_excluded"] == 2
    assert summary["rows_read"] == summary["rows_scored"] + summary["rows_rejected"] + summary["rows_excluded"]
    assert summary["rejects_by_reason"] == {"duplicate id": 2, NULL_ID: 1, WRONG_LENGTH: 1}
    # The first of a duplicate id wins: id 3 and id 10 carry the first row's score.
    scores = read_scores(f"{s3_bucket}/bad-out")
    by_id = dict(zip(scores.column("id").to_pylist(), scores.column("entropy").to_pylist()))
    scorer = BatchScorer(checkpoint, pad_to=256)
    x = np.frombuffer(b"".join([blobs[3], blobs[10]]), np.uint8).reshape(2, *SHAPE)
    expected = scorer({"id": np.array([3, 10]), "x": x})["entropy"]
    assert [by_id[3], by_id[10]] == expected.tolist()

    # features: NaN, inf, wrong length, null id (local dir, an MLP checkpoint)
    mlp = train_checkpoint(tmp_path / "mlp", input_shape=(64,), backbone="mlp", epochs=1, rows=500)
    feats = [np.full(64, 0.5, np.float32).tolist() for _ in range(40)]
    feats[1][3], feats[2][0], feats[3] = float("nan"), float("inf"), feats[3][:60]
    ids = list(range(40))
    ids[4] = None
    storage.write_parquet(str(tmp_path / "feat" / "a.parquet"),
                          pa.table({"id": pa.array(ids, pa.int64()), "features": pa.array(feats, pa.list_(pa.float32()))}))
    summary = score_pool(mlp, str(tmp_path / "feat"), 5, str(tmp_path / "feat-out"), progress=False)
    reasons = read(str(tmp_path / "feat-out" / "rejects.parquet")).column("reason").to_pylist()
    assert sorted(reasons) == sorted([NOT_FINITE, NOT_FINITE, f"{WRONG_LENGTH}: 60 features, expected 64", NULL_ID])
    assert (summary["rows_read"], summary["rows_scored"], summary["rows_rejected"]) == (40, 36, 4)

    # PNG bytes in parquet: corrupt bytes, another size (resized to the input)
    images = []
    for i in range(30):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16) if i == 2 else (8, 8), i, np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    images[1] = images[1][:20]
    storage.write_parquet(str(tmp_path / "img" / "a.parquet"),
                          pa.table({"id": pa.array([f"img-{i}" for i in range(30)]), "image": pa.array(images)}))
    summary = score_pool(checkpoint, str(tmp_path / "img"), 5, str(tmp_path / "img-out"), progress=False)
    rejects = read(str(tmp_path / "img-out" / "rejects.parquet")).to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [("img-1", UNDECODABLE)]
    assert (summary["rows_read"], summary["rows_scored"], summary["rows_rejected"]) == (30, 29, 1)


def test_image_prefix_on_s3_ids_are_keys(ray_local, s3_bucket, checkpoint):
    pool = f"{s3_bucket}/images"
    make_pool(pool, "digits", rows=120, fmt="files", shards=2)
    storage.write_bytes(f"{pool}/part-00001/broken.png", b"not a png")
    summary = score_pool(checkpoint, pool, 10, f"{s3_bucket}/images-out", strategy="margin", progress=False)
    assert summary["pool"]["format"] == "files" and summary["rows_read"] == 121 and summary["rows_rejected"] == 1
    rejects = read(f"{s3_bucket}/images-out/rejects.parquet").to_pylist()
    assert rejects == [{"id": "part-00001/broken.png", "file": f"{pool}/part-00001/broken.png",
                        "reason": UNDECODABLE}]
    selection = read(f"{s3_bucket}/images-out/selection.parquet")
    assert all(storage.exists(f"{pool}/{key}") for key in selection.column("id").to_pylist())
    # The in-process path (same decode, same scorer) picks the same rows.
    score_pool(checkpoint, pool, 10, f"{s3_bucket}/images-local", strategy="margin", use_ray=False, progress=False)
    assert read(f"{s3_bucket}/images-local/selection.parquet").equals(selection)


def test_cli_make_pool_then_score(ray_local, tmp_path, checkpoint, capsys):
    pool, out = str(tmp_path / "digits"), str(tmp_path / "out")
    assert main(["make-pool", pool, "--source", "digits", "--shards", "3"]) == 0
    assert main(["score", "--checkpoint", checkpoint, "--pool", pool, "--k", "25", "--out", out,
                 "--strategy", "least-confidence", "--per-class-quota", "--actors", "1,2"]) == 0
    summary = storage.read_json(f"{out}/selection.json")
    assert f"selected {summary['selected']} of 1,797 scored rows by least-confidence" in capsys.readouterr().out
    assert summary["k"] == 25 and summary["per_class_quota"] is True and summary["checkpoint"] == checkpoint
    assert summary["versions"]["ray"] and summary["versions"]["tidal_ray"] and summary["rows_per_s"] > 0
    # At most ceil(25 / 10) = 3 per predicted class, unless some class falls short and the
    # best rows left fill the batch to k.
    counts = np.bincount(read(f"{out}/selection.parquet").column("predicted_class").to_numpy(), minlength=10)
    assert counts.sum() == summary["selected"] == 25
    assert counts.max() <= 3 or (counts < 3).any()


@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    return {"five": train_checkpoint(root / "five", num_classes=5, epochs=1, rows=300),
            "features": train_checkpoint(root / "features", input_shape=(64,), backbone="mlp", epochs=1, rows=300)}


@pytest.mark.parametrize("case, message", [
    ("missing-pool", "no pool at"),
    ("class-count", "declares 10 classes"),
    ("input-shape", "1x8x8 pixels but"),  # 1- or 3-channel pixels are converted; feature vectors are not
    ("k-zero", "--k 0: must be a positive integer"),
    ("k-negative", "--k -3: must be a positive integer"),
    ("strategy", "unknown strategy 'most-fun'"),
    ("missing-checkpoint", "no checkpoint at"),
    ("bad-exclude", "nothing there"),
    ("bad-actors", "--actors takes MIN,MAX"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, checkpoint, other_checkpoints, capsys,
                                                            case, message):
    pool = str(tmp_path / "pool")
    make_pool(pool, "digits", rows=100)
    out = tmp_path / "out"
    args = {"--checkpoint": checkpoint, "--pool": pool, "--k": "5", "--out": str(out)}
    extra = []
    if case == "missing-pool":
        args["--pool"] = str(tmp_path / "nope")
    elif case == "class-count":
        args["--checkpoint"] = other_checkpoints["five"]
    elif case == "input-shape":
        args["--checkpoint"] = other_checkpoints["features"]
    elif case == "k-zero":
        args["--k"] = "0"
    elif case == "k-negative":
        args["--k"] = "-3"
    elif case == "strategy":
        extra = ["--strategy", "most-fun"]
    elif case == "missing-checkpoint":
        args["--checkpoint"] = str(tmp_path / "no-checkpoint")
    elif case == "bad-exclude":
        extra = ["--exclude", str(tmp_path / "no-such-labels.parquet")]
    elif case == "bad-actors":
        extra = ["--actors", "2,1"]
    argv = ["score"] + [a for pair in args.items() for a in pair] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


def test_a_pool_without_a_valid_row_fails_and_writes_nothing(tmp_path, checkpoint):
    table = pa.table({"id": pa.array([1, 2], pa.int64()), "pixels": pa.array([b"x", b"y"])})
    storage.write_parquet(str(tmp_path / "pool" / "a.parquet"), table.replace_schema_metadata({SHAPE_KEY: b"1x8x8"}))
    with pytest.raises(ValueError, match="no row to select from"):
        score_pool(checkpoint, str(tmp_path / "pool"), 5, str(tmp_path / "out"), save_scores=True,
                   use_ray=False, progress=False)
    assert not (tmp_path / "out").exists()


def test_scores_are_saved_in_parts_and_stale_parts_go(tmp_path, checkpoint, monkeypatch):
    import tidal_ray.score.reduce as reduce

    pool, out = str(tmp_path / "pool"), tmp_path / "out"
    make_pool(pool, "digits", rows=1000, shards=2)
    (out / "scores").mkdir(parents=True)
    (out / "scores" / "part-00099.parquet").write_bytes(b"from an earlier run")
    monkeypatch.setattr(reduce, "SCORES_ROWS_PER_PART", 300)
    summary = score_pool(checkpoint, pool, 10, str(out), save_scores=True, exclude_ids=[5], use_ray=False,
                         progress=False)
    parts = sorted(p.name for p in (out / "scores").iterdir())
    assert parts == [f"part-0000{i}.parquet" for i in range(len(parts))] and len(parts) >= 2
    assert summary["outputs"]["scores"] == [str(out / "scores" / p) for p in parts]
    scores = read_scores(str(out))
    assert scores.num_rows == 1000 and set(scores.column_names) >= {"id", "predicted_class", "excluded", "bald",
                                                                    "random", "tidal-margin"}


def test_reduction_rejects_non_finite_scores():
    from tidal_ray.data.pool import PoolSpec
    from tidal_ray.score.reduce import NONFINITE_SCORE, Reduction

    spec = PoolSpec("mem://pool", "pixels", (("mem://pool/a.parquet", 1),), pa.int64(), 4, (1,))
    reduction = Reduction(2, "entropy", 3, pa.int64(), np.array([4]), spec.file_name)
    reduction.add({"id": np.array([1, 2, 3, 4]), "file": np.zeros(4, np.int32), "row": np.arange(4),
                   "reason": np.array(["", "", "", ""]),
                   "predicted_class": np.array([0, 1, 2, 0]), "entropy": np.array([0.5, np.nan, np.inf, 0.9])})
    assert reduction.accounting() == {"rows_read": 4, "rows_scored": 1, "rows_rejected": 2, "rows_excluded": 1,
                                      "rejects_by_reason": {NONFINITE_SCORE: 2}}
    assert reduction.rejects_table().column("file").to_pylist() == ["mem://pool/a.parquet"] * 2
    assert reduction.selection_table().column("id").to_pylist() == [1]


def test_seen_ids_flags_repeats_within_and_across_batches():
    seen = SeenIds()
    assert seen.first_seen(np.array([5, 3, 5, 9])).tolist() == [True, True, False, True]
    assert seen.first_seen(np.array([9, 1, 1])).tolist() == [False, True, False]
    for start in range(10, 5010, 100):
        assert seen.first_seen(np.arange(start, start + 100)).all()
    # Far-off and negative ids go to sorted runs instead of the bitmap; lookups stay exact.
    far = np.array([10**15, -7, 2**62, 10**15 + 1])
    assert seen.first_seen(far).all()
    for start in range(0, 3000, 100):
        assert seen.first_seen(10**12 + np.arange(start, start + 100) * 7919).all()
    assert seen.first_seen(np.array([4, 10, 5009, 5010, -7, 2**62, 10**12 + 7919, 10**12 + 3000 * 7919])).tolist() \
        == [True, False, False, True, False, False, False, True]
    assert len(seen) == 4 + 5000 + 4 + 3000 + 3 and len(seen._runs) < 10
    assert seen._bits.nbytes <= SeenIds.MIN_BITMAP_BYTES  # dense ids: bits, not 8 bytes each
    strings = SeenIds()
    assert strings.first_seen(np.array(["a/1.png", "b", "a/1.png"])).tolist() == [True, True, False]
    assert strings.first_seen(np.array(["b", "c"])).tolist() == [False, True]
    assert strings.nbytes == 3 * 16


def test_job_entrypoint_takes_the_cli_arguments():
    out = subprocess.run([sys.executable, "jobs/score.py", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--checkpoint" in out.stdout and "--exclude" in out.stdout


def test_blocks_are_whole_batches_bounded_in_bytes_and_a_small_pool_spreads_over_several(tmp_path, checkpoint,
                                                                                         monkeypatch):
    from tidal_ray.score import pipeline as score

    pool = str(tmp_path / "pool")
    make_pool(pool, "synthetic", rows=2_000, fmt="pixels", shape=SHAPE)  # one file, one row group
    plan = score.plan_scoring(checkpoint, pool, 10, batch_size=16)
    sizes = [len(batch) for batch in score.score_batches_in_process(plan)]
    assert sum(sizes) == 2_000 and len(sizes) >= score.MIN_BLOCKS
    assert all(n % 16 == 0 for n in sizes[:-1])                      # whole scorer batches
    # a byte budget of two rows' worth still gives whole batches, one batch a block
    monkeypatch.setattr(score, "BLOCK_BYTES", 2 * score._row_bytes(plan))
    assert {len(batch) for batch in score.score_batches_in_process(plan)} == {16}


FAULTS_PER_100_BATCHES = """
import resource, sys
import numpy as np, torch
from tidal_ray.train.checkpoint import save_checkpoint
from tidal_ray.models import build_model
from tidal_ray.score.scorer import BatchScorer
net = build_model("mlp", 10, (64,)).eval()
uri = save_checkpoint({"model": net.state_dict(),
                       "config": {"backbone": "mlp", "num_classes": 10, "input_shape": [64]}}, sys.argv[2])
batch = {"id": np.arange(1024), "x": np.random.default_rng(0).random((1024, 64), dtype=np.float32)}
if sys.argv[1] == "scorer":
    scorer = BatchScorer(uri, num_threads=1)
    run = lambda: scorer(batch)
else:
    torch.set_num_threads(1)
    run = lambda: net.predict(torch.from_numpy(batch["x"]))
for _ in range(5):
    run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_scorer_process_reuses_freed_memory_instead_of_faulting_it_in_every_batch(tmp_path):
    # A fresh process gave freed memory back to the OS after every batch (glibc's
    # defaults), so a cheap model's forward paid page faults and ran at half speed.
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_100_BATCHES, mode, str(tmp_path / mode)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    plain, scorer = faults("plain"), faults("scorer")
    assert scorer * 10 < plain, (plain, scorer)
