"""The batch modes' math (method/batch.py) against exact references: Plackett-Luce
inclusion probabilities for power sampling, Cluster-Margin's round-robin order, seeded
k-means and TypiClust's most typical row per blob."""
import numpy as np
import pytest

from tidal_ray.method import batch

from test_batch_modes import plackett_luce_inclusion


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_power_keys_sample_in_proportion_to_score_to_the_beta(beta):
    margins = np.array([-0.95, -0.9, -0.8, -0.6, -0.4, -0.1, -0.05, -0.5])  # -(p1 - p2)
    ids = np.arange(8) * 7 + 3
    k, draws = 3, 6000
    counts = np.zeros(8)
    for seed in range(draws):
        keys = batch.power_keys("margin", margins, ids, beta, seed, cycle=1)
        counts[np.lexsort((ids, -keys))[:k]] += 1
    exact = plackett_luce_inclusion((1.0 + margins) ** beta, k)
    # Binomial standard error is at most sqrt(0.25 / 6000) = 0.0065; 4.5 of them.
    assert np.abs(counts / draws - exact).max() < 0.03, (counts / draws, exact)


def test_power_keys_depend_on_row_seed_and_cycle_only():
    ids = np.arange(100)
    scores = np.linspace(-1, 0, 100)
    keys = batch.power_keys("tidal-margin", scores, ids, 2.0, 5, 3)
    shuffled = np.random.default_rng(0).permutation(100)
    assert np.array_equal(batch.power_keys("tidal-margin", scores[shuffled], ids[shuffled], 2.0, 5, 3),
                          keys[shuffled])
    assert not np.array_equal(batch.power_keys("tidal-margin", scores, ids, 2.0, 5, 4), keys)
    assert np.isfinite(batch.power_keys("entropy", np.zeros(3), np.arange(3), 1.0, 0, 0)).all()


def test_round_robin_takes_the_smallest_clusters_first_best_score_first():
    ids = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.3, 0.4, 0.2, 0.4])
    clusters = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    picked = ids[batch.round_robin(ids, scores, clusters, 7)]
    # cluster 1 (2 rows), cluster 2 (3 rows; 17 and 19 tie on score: smaller id), cluster 0.
    assert picked.tolist() == [15, 17, 10, 16, 19, 11, 18]


def test_kmeans_is_seeded_and_finds_planted_blobs():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 8)) * 20
    x = np.concatenate([c + rng.normal(size=(40, 8)) for c in centres])
    first, again = batch.kmeans(x, 5, seed=3), batch.kmeans(x, 5, seed=3)
    assert np.array_equal(first, again)
    assign = batch.nearest_centroid(x, first)
    assert all(len(set(assign[i * 40:(i + 1) * 40])) == 1 for i in range(5))
    assert len(set(assign)) == 5


def test_nearest_centroid_is_the_same_whatever_the_chunk_of_rows(monkeypatch):
    rng = np.random.default_rng(3)
    x, centroids = rng.normal(size=(1001, 5)), rng.normal(size=(37, 5))
    exact = np.array([np.argmin(((row - centroids) ** 2).sum(1)) for row in x])
    assert batch.nearest_centroid(x, centroids).tolist() == exact.tolist()
    monkeypatch.setattr(batch, "DISTANCE_CELLS", 37 * 10 + 5)  # 10 rows a chunk, the last one short
    assert batch.nearest_centroid(x, centroids).tolist() == exact.tolist()
    assert batch.nearest_centroid(x[:0], centroids).tolist() == []


def test_typical_rows_take_one_row_per_blob_near_its_centre():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(6, 4)) * 15
    x = np.concatenate([c + rng.normal(size=(60, 4)) for c in centres])
    ids = np.arange(len(x)) * 3
    picks = batch.typical_rows(x, ids, 6, seed=0)
    assert sorted(picks // 60) == list(range(6))
    for pick in picks:
        blob = x[(pick // 60) * 60:(pick // 60 + 1) * 60]
        distances = np.linalg.norm(blob - blob.mean(0), axis=1)
        assert np.linalg.norm(x[pick] - blob.mean(0)) <= np.quantile(distances, 0.25)
