"""Batch modes (DESIGN §8): power sampling follows the Plackett-Luce law, cluster mode
spreads a batch over planted clusters, and bad batch-mode flags are refused.

The identity of both modes across actor counts and arrival orders is in
``test_score_identity.py``.
"""
import itertools

import numpy as np
import pyarrow as pa
import pytest

from tidal_ray.cli import main
from tidal_ray.data import storage
from tidal_ray.data.make_pool import make_pool
from tidal_ray.method import batch as batch_modes
from tidal_ray.score.pipeline import score_pool
from tidal_ray.score.reduce import Reduction

from test_score_pipeline import train_checkpoint


def plackett_luce_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """Exact P(row i is among k drawn without replacement, each draw proportional to weight)."""
    inclusion = np.zeros(len(weights))
    for seq in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, weights.sum()
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        inclusion[list(seq)] += p
    return inclusion


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_power_sampling_matches_the_exact_plackett_luce_inclusion_probabilities(beta):
    # Margin scores -(p1 - p2) of 8 rows: s = 1 + margin, drawn with probability s**beta.
    s = np.array([0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0])
    ids, k, seeds = np.arange(100, 108), 3, 4000
    expected = plackett_luce_inclusion(s.astype(np.float32).astype(np.float64) ** beta, k)
    counts = np.zeros(len(ids))
    for seed in range(seeds):
        reduction = Reduction(k, "margin", 2, pa.int64(), np.array([], np.int64), lambda f, i: "",
                              batch=batch_modes.BatchParams("power", beta=beta), seed=seed, cycle=7)
        order = np.random.default_rng(seed).permutation(len(ids))  # any arrival order
        for part in np.array_split(order, 3):
            reduction.add({"id": ids[part], "file": np.zeros(len(part), np.int32), "row": part,
                           "reason": np.full(len(part), ""), "predicted_class": np.zeros(len(part), np.int64),
                           "margin": s[part] - 1.0})
        selection = reduction.selection_table()
        picked = selection.column("id").to_numpy()
        # The same k as the keys computed directly, and the strategy's score kept beside them.
        keys = batch_modes.power_keys("margin", s - 1.0, ids, beta, seed, 7)
        assert sorted(picked.tolist()) == sorted(ids[np.argsort(-keys)[:k]].tolist())
        np.testing.assert_array_equal(selection.column("score").to_numpy(), s[picked - 100] - 1.0)
        counts[picked - 100] += 1
    # 4,000 draws: the standard error of a frequency is at most 0.0079; 0.035 is 4.4 of them.
    np.testing.assert_allclose(counts / seeds, expected, atol=0.035)
    assert counts[-1] > counts[0]  # and the law is not flat


def test_power_keys_depend_on_the_cycle_and_seed_but_not_the_batch():
    ids, scores = np.arange(1_000), np.linspace(-1, 0, 1_000)
    whole = batch_modes.power_keys("margin", scores, ids, 2.0, 0, 1)
    np.testing.assert_array_equal(batch_modes.power_keys("margin", scores[500:], ids[500:], 2.0, 0, 1), whole[500:])
    assert not np.array_equal(batch_modes.power_keys("margin", scores, ids, 2.0, 0, 2), whole)
    assert not np.array_equal(batch_modes.power_keys("margin", scores, ids, 2.0, 1, 1), whole)


# ---- cluster: planted clusters -------------------------------------------------------------------


def planted_pool(path, rng) -> tuple[str, np.ndarray]:
    """Four tight, well-separated blobs in the embedding; the 10 rows of blob 3 are the
    most uncertain (margin near 0), blobs 0-2 (60 rows each) confidently predicted with
    margins spread over rows. Returns the pool and each id's blob."""
    from planted_net import EMBED

    blob = np.repeat([0, 1, 2, 3], [60, 60, 60, 10])
    embedding = np.eye(EMBED)[blob] + rng.normal(0, 0.03, (len(blob), EMBED))
    logits = np.zeros((len(blob), 3))
    logits[blob < 3, 0] = rng.uniform(1, 4, (blob < 3).sum())
    logits[blob == 3, 1] = np.linspace(0.001, 0.02, 10)
    rows = np.concatenate([embedding, logits], axis=1).astype(np.float32)
    table = pa.table({"id": pa.array(np.arange(len(blob)) * 3 + 1, pa.int64()),
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), rows.shape[1])})
    storage.write_parquet(f"{path}/part-00000.parquet", table)
    return f"{path}", blob, table


def planted_checkpoint(path) -> str:
    """The planted model, trained for an epoch (its outputs do not change: only the TD module learns)."""
    from planted_net import EMBED
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    rng = np.random.default_rng(1)
    config = TrainConfig(num_classes=3, input_shape=(EMBED + 3,), backbone="planted_net:factory",
                         feature_layers=("embed",), epochs=1, batch_size=16)
    _, _, session = train_in_process(config, np.arange(48), rng.random((48, EMBED + 3), dtype=np.float32),
                                     rng.integers(0, 3, 48))
    return save_checkpoint(session.last_state, str(path)).rsplit("/", 1)[0]


def test_cluster_mode_covers_every_planted_cluster_where_topk_takes_one(tmp_path, monkeypatch):
    from planted_net import EMBED

    from tidal_ray.score.scorer import BatchScorer

    pool, blob, table = planted_pool(tmp_path / "pool", np.random.default_rng(0))
    checkpoint = planted_checkpoint(tmp_path / "planted")
    blob_of = lambda ids: blob[(np.asarray(ids) - 1) // 3]
    common = dict(strategy="margin", use_ray=False, progress=False)
    score_pool(checkpoint, pool, 8, str(tmp_path / "topk"), **common)
    summary = score_pool(checkpoint, pool, 8, str(tmp_path / "cluster"), batch_mode="cluster", clusters=4,
                         candidates=80, **common)
    topk = storage.read_parquet(str(tmp_path / "topk/selection.parquet"))
    cluster = storage.read_parquet(str(tmp_path / "cluster/selection.parquet"))
    ids = table.column("id").to_numpy()
    x = table.column("features").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    margin = BatchScorer(checkpoint, strategies=["margin"])({"id": ids, "x": x})["margin"]
    # The setting: the top k all in blob 3, the top M in every blob.
    top_m = ids[np.lexsort((ids, -margin))[:80]]
    assert set(blob_of(top_m)) == {0, 1, 2, 3}
    assert set(blob_of(topk.column("id").to_pylist())) == {3}
    picked_blobs = blob_of(cluster.column("id").to_pylist())
    assert set(picked_blobs) == {0, 1, 2, 3} and np.bincount(picked_blobs).tolist() == [2, 2, 2, 2]
    # One k-means cluster per blob; blob 3 (10 candidates, the fewest) comes first.
    assert len(set(zip(picked_blobs, cluster.column("cluster").to_pylist()))) == 4
    assert picked_blobs[0] == 3
    # Best first within a cluster: each pick is its cluster's best remaining candidate.
    top = dict(zip(ids.tolist(), margin.tolist()))
    assert cluster.column("score").to_pylist() == [top[i] for i in cluster.column("id").to_pylist()]
    assert (summary["batch_mode"], summary["clusters"], summary["candidates"]) == ("cluster", 4, 80)
    assert summary["sampled_rows"] == 190 and summary["sample_rows"] == batch_modes.SAMPLE_ROWS
    assert summary["kmeans_steps"] == batch_modes.KMEANS_STEPS and summary["embedding_dim"] == EMBED


def test_cluster_pick_honours_the_per_class_quota():
    ids = np.arange(12)
    scores = np.linspace(1, 0, 12)
    clusters = np.array([0, 1, 2] * 4)
    classes = np.array([0] * 8 + [1] * 4)
    picked = batch_modes.cluster_pick(ids, scores, clusters, classes, 6, quota=3)
    assert np.bincount(classes[picked]).tolist() == [3, 3]
    assert batch_modes.cluster_pick(ids, scores, clusters, classes, 6).tolist() == [0, 1, 2, 3, 4, 5]
    # k = 10 asks for more than the quota of 5 a class can give class 1 (4 rows): the
    # class 0 rows passed over fill the batch, in the round-robin's order.
    filled = batch_modes.cluster_pick(ids, scores, clusters, classes, 10, quota=5)
    assert len(filled) == 10 and np.bincount(classes[filled]).tolist() == [6, 4]
    order = batch_modes.round_robin(ids, scores, clusters, 12).tolist()
    assert filled.tolist()[-1] == [i for i in order if classes[i] == 0][5]


# ---- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-bad")
    pool = str(root / "pool")
    make_pool(pool, "digits", rows=120)
    storage.write_parquet(str(root / "labeled.parquet"), pa.table({"id": pa.array(range(100), pa.int64())}))
    return {"checkpoint": train_checkpoint(root / "ck", epochs=1, rows=200), "pool": pool,
            "labeled": str(root / "labeled.parquet")}


@pytest.mark.parametrize("extra, message", [
    (["--batch-mode", "power", "--beta", "0"], "--beta 0: must be > 0"),
    (["--batch-mode", "power", "--beta", "-2"], "--beta -2: must be > 0"),
    (["--batch-mode", "power", "--beta", "abc"], "--beta abc: not a number"),
    (["--batch-mode", "power", "--beta", "nan"], "--beta nan: not a finite number"),
    (["--batch-mode", "cluster", "--clusters", "0"], "--clusters 0: must be between 1 and 1000"),
    (["--batch-mode", "cluster", "--clusters", "1001"], "--clusters 1001: must be between 1 and 1000"),
    (["--batch-mode", "cluster", "--clusters", "two"], "--clusters two: not an integer"),
    (["--batch-mode", "cluster", "--clusters", "500"], "--clusters 500: more than the pool's 120 rows"),
    (["--batch-mode", "cluster", "--clusters", "30", "--in-process"], "--clusters 30: more than the 20 unlabeled"),
    (["--batch-mode", "cluster", "--candidates", "4"], "--candidates 4: must be at least k (5)"),
    (["--beta", "2"], "--beta 2: applies to --batch-mode power only, not topk"),
    (["--batch-mode", "power", "--clusters", "3"], "--clusters 3: applies to --batch-mode cluster only, not power"),
    (["--batch-mode", "power", "--candidates", "50"], "--candidates 50: applies to --batch-mode cluster only"),
    (["--batch-mode", "diverse"], "--batch-mode diverse: choose one of topk, power, cluster"),
])
def test_bad_batch_mode_flags_exit_2_with_one_line_and_write_nothing(tmp_path, small, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["score", "--checkpoint", small["checkpoint"], "--pool", small["pool"], "--k", "5", "--out", str(out),
            "--exclude", small["labeled"], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


def test_campaign_init_stores_the_batch_mode_and_refuses_bad_flags(tmp_path, capsys):
    from tidal_ray.campaign.state import config_of, load_state

    pool = str(tmp_path / "pool")
    make_pool(pool, "digits", rows=120)
    base = ["campaign", "init", None, "--pool", pool, "--num-classes", "10", "--k", "10", "--cycles", "2",
            "--oracle", "--initial-labels", "20", "--trainer", "local"]
    at = lambda name: [a if a is not None else str(tmp_path / name) for a in base]
    assert main(at("power") + ["--batch-mode", "power", "--beta", "2.5"]) == 0
    config = config_of(load_state(str(tmp_path / "power")))
    assert (config.batch_mode, config.beta, config.clusters, config.candidates) == ("power", 2.5, None, None)
    assert config.initial_draw == "random"  # the default: the typical draw gained nothing established
    assert main(at("cluster") + ["--batch-mode", "cluster"]) == 0
    config = config_of(load_state(str(tmp_path / "cluster")))
    assert (config.batch_mode, config.beta, config.clusters, config.candidates) == ("cluster", None, 10, 100)
    capsys.readouterr()
    for extra, message in [(["--batch-mode", "power", "--beta", "0"], "--beta 0: must be > 0"),
                           (["--batch-mode", "cluster", "--clusters", "101"], "--clusters 101: more than the 100 unlabeled rows"),
                           (["--batch-mode", "cluster", "--candidates", "9"], "--candidates 9: must be at least k (10)"),
                           (["--clusters", "3"], "--clusters 3: applies to --batch-mode cluster only, not topk")]:
        assert main(at("bad") + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not (tmp_path / "bad").exists()


def test_the_centroids_sample_is_the_smallest_hashes_earliest_rows_in_any_order():
    from tidal_ray.data.ids import earliest_rows
    from tidal_ray.score.centroids import SampleRows

    rng = np.random.default_rng(3)
    ids = np.concatenate([np.arange(600), rng.choice(600, 100, replace=False)])  # 100 ids twice
    files, rows = np.repeat([0, 1], [600, 100]), np.concatenate([np.arange(600), np.arange(100)])
    x = rng.normal(size=(len(ids), 5)).astype(np.float32)
    exclude = np.arange(0, 600, 7)

    def sample(order):
        rows_kept = SampleRows(40, exclude, pa.int64(), seed=2, cycle=1)  # trims every 80 rows held
        for part in np.array_split(order, 35):
            rows_kept.add({"id": ids[part], "file": files[part], "row": rows[part], "embedding": x[part]})
        return rows_kept.result()

    got_ids, got_x = sample(np.arange(len(ids)))
    for seed in range(3):
        other_ids, other_x = sample(np.random.default_rng(seed).permutation(len(ids)))
        np.testing.assert_array_equal(other_ids, got_ids)
        np.testing.assert_array_equal(other_x, got_x)
    winners = earliest_rows(ids, files * 1000 + rows)
    winners = winners[~np.isin(ids[winners], exclude)]
    expected = winners[np.lexsort((ids[winners], batch_modes.sample_hashes(ids[winners], 2, 1)))[:40]]
    np.testing.assert_array_equal(got_ids, ids[expected])
    np.testing.assert_array_equal(got_x, x[expected])


@pytest.mark.slow
def test_a_campaign_cycle_selects_by_its_batch_mode_with_the_cycle_number(ray_local, tmp_path):
    from tidal_ray.campaign import cycle as campaign

    pool, root = str(tmp_path / "pool"), str(tmp_path / "campaign")
    make_pool(pool, "digits", rows=200)
    config = campaign.CampaignConfig(pool=pool, num_classes=10, k=10, cycles=2, strategy="margin", oracle=True,
                                     initial_labels=20, trainer="local", epochs=2, batch_mode="power", beta=2.0)
    campaign.init(root, config)
    assert campaign.run(root)["status"] == "done"
    for cycle in (0, 1):
        summary = storage.read_json(f"{root}/cycles/{cycle:03d}/selection.json")
        assert (summary["batch_mode"], summary["beta"], summary["cycle"]) == ("power", 2.0, cycle)
        selection = storage.read_parquet(f"{root}/cycles/{cycle:03d}/selection.parquet")
        assert selection.num_rows == 10 and "key" in selection.column_names
