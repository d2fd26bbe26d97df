"""Batch modes (DESIGN §8): turning per-row scores into k samples that are not all
near-duplicates of each other. Pure NumPy, no I/O and no Ray: the scorer, the driver's
reduction and the quality benchmark call the same functions.

- ``topk``: the k highest scores (``topk.StreamingTopK``).
- ``power``: Gumbel-top-k on ``beta * log(s) + G``: a sample without replacement with
  probability proportional to ``s ** beta`` (Kirsch et al., TMLR 2023), where ``s`` is a
  positive form of the score and ``G`` a Gumbel variate from the row's own hash.
- ``cluster``: round-robin over k-means clusters of the model's embedding among the top
  ``M`` candidates (Citovsky et al., NeurIPS 2021, "Cluster-Margin").
- ``typical_rows``: TypiClust's initial set (Hacohen et al., ICML 2022): from each of K
  clusters, its most typical row.

Every function is deterministic: a row's key depends only on its score, id, the seed
and the cycle, and k-means is seeded and computed in float64 in a fixed order.
"""
from __future__ import annotations

import numpy as np

from tidal_ray.method.hashing import hash64

MODES = ("topk", "power", "cluster")
SCORE_FLOOR = np.float32(1e-12)        # s > 0 however certain the model is
TYPICALITY_NEIGHBOURS = 20
KMEANS_STEPS = 25
MAX_CLUSTERS = 1000


# ---- power ------------------------------------------------------------------------------


def positive_score(strategy: str, scores: np.ndarray) -> np.ndarray:
    """The strategy's score as ``s > 0`` (float32, so device noise cannot reorder rows):
    margins (``-(p1 - p2)`` in [-1, 0]) become ``1 - (p1 - p2)``; entropies, BALD and
    least-confidence are already >= 0; ``random`` is flat (power sampling is then uniform).
    A floor keeps ``log(s)`` finite."""
    scores = np.asarray(scores, dtype=np.float64)
    if strategy in ("margin", "tidal-margin"):
        s = 1.0 + scores
    elif strategy == "random":
        s = np.ones_like(scores)
    else:
        s = scores
    return np.maximum(s.astype(np.float32), SCORE_FLOOR)


def row_uniforms(ids: np.ndarray, seed: int, cycle: int) -> np.ndarray:
    """One uniform in (0, 1) per row from a hash of (seed, cycle, id), float64."""
    h = hash64(np.asarray(ids), (int(seed) * 1_000_003 + int(cycle)) ^ 0x70CE)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def power_keys(strategy: str, scores: np.ndarray, ids: np.ndarray, beta: float, seed: int,
               cycle: int) -> np.ndarray:
    """``beta * log(s) + G`` per row, ``G = -log(-log u)``: the k largest keys (ties by id)
    are a sample of k rows without replacement with probability proportional to ``s**beta``."""
    s = positive_score(strategy, scores).astype(np.float64)
    u = row_uniforms(ids, seed, cycle)
    return beta * np.log(s) - np.log(-np.log(u))


# ---- k-means and clusters -------------------------------------------------------------------


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    d = (x64 * x64).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64 * c64).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int, steps: int = KMEANS_STEPS) -> np.ndarray:
    """Seeded k-means++ then ``steps`` Lloyd steps over the rows of ``x``: ``(k, d)``
    float32 centroids. With fewer distinct rows than ``k`` some centroids repeat. A
    cluster that empties keeps its centroid."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0 or k < 1:
        raise ValueError(f"k-means needs rows and k >= 1 (rows {n}, k {k})")
    rng = np.random.default_rng([int(seed), 0xC1A5])
    centroids = np.empty((k, x.shape[1]), dtype=np.float64)
    centroids[0] = x[rng.integers(n)]
    closest = _squared_distances(x, centroids[:1])[:, 0]
    for j in range(1, k):
        total = closest.sum()
        pick = rng.integers(n) if total <= 0 else int(np.searchsorted(np.cumsum(closest), rng.random() * total))
        centroids[j] = x[min(pick, n - 1)]
        closest = np.minimum(closest, _squared_distances(x, centroids[j:j + 1])[:, 0])
    for _ in range(steps):
        assign = _squared_distances(x, centroids).argmin(axis=1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        filled = counts > 0
        moved = sums[filled] / counts[filled, None]
        if np.allclose(moved, centroids[filled]):
            centroids[filled] = moved
            break
        centroids[filled] = moved
    return centroids.astype(np.float32)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid (ties: the smaller index), int32."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int32)
    return _squared_distances(np.asarray(x), centroids).argmin(axis=1).astype(np.int32)


def round_robin(ids: np.ndarray, scores: np.ndarray, clusters: np.ndarray, k: int) -> np.ndarray:
    """Cluster-Margin's pick among candidates: clusters in order of (fewest candidates,
    smallest index); one row from each in turn, best score first within a cluster (ties
    by id), until ``k``. Returns indices into the candidates, in pick order."""
    ids, scores, clusters = np.asarray(ids), np.asarray(scores, dtype=np.float64), np.asarray(clusters)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    within = np.lexsort((ids, -scores, clusters))             # by cluster, best first, ties by id
    labels, starts, counts = np.unique(clusters[within], return_index=True, return_counts=True)
    turn = np.arange(len(within)) - np.repeat(starts, counts)  # a row's rank inside its cluster
    cluster_order = np.lexsort((labels, counts))               # fewest candidates, then index
    cluster_rank = np.empty(len(labels), dtype=np.int64)
    cluster_rank[cluster_order] = np.arange(len(labels))
    rank_of_row = cluster_rank[np.repeat(np.arange(len(labels)), counts)]
    picked = within[np.lexsort((rank_of_row, turn))]
    return picked[:k]


# ---- typicality -------------------------------------------------------------------------------


def typicality(x: np.ndarray, neighbours: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """1 / mean distance to each row's ``neighbours`` nearest other rows (TypiClust); a
    row alone in its cluster is as typical as can be (inf)."""
    n = len(x)
    if n <= 1:
        return np.full(n, np.inf)
    d = np.sqrt(_squared_distances(x, x))
    np.fill_diagonal(d, np.inf)
    m = min(neighbours, n - 1)
    nearest = np.partition(d, m - 1, axis=1)[:, :m]
    return 1.0 / np.maximum(nearest.mean(axis=1), 1e-12)


def typical_rows(x: np.ndarray, ids: np.ndarray, budget: int, seed: int,
                 neighbours: int = TYPICALITY_NEIGHBOURS, max_cluster_rows: int = 2000) -> np.ndarray:
    """TypiClust's initial set: k-means with K = ``budget`` over ``x`` and, from each
    cluster (largest first, then smaller index), its most typical row (ties by id).
    Typicality is computed on at most ``max_cluster_rows`` rows of a cluster (its
    smallest id hashes: a seeded, order-free sample). Returns indices into ``x``."""
    x = np.asarray(x, dtype=np.float32)
    ids = np.asarray(ids)
    if budget < 1 or budget > len(x):
        raise ValueError(f"a typical set of {budget} from {len(x)} rows")
    assign = nearest_centroid(x, kmeans(x, budget, seed))
    order = hash64(ids, seed ^ 0x7E1C)
    picks, spare = [], []
    sizes = np.bincount(assign, minlength=budget)
    for c in np.lexsort((np.arange(budget), -sizes)):
        members = np.flatnonzero(assign == c)
        if len(members) == 0:
            continue
        members = members[np.argsort(order[members], kind="stable")][:max_cluster_rows]
        typ = typicality(x[members], neighbours)
        ranked = members[np.lexsort((ids[members], -typ))]
        picks.append(ranked[0])
        spare.extend(ranked[1:2])
    # Empty clusters (duplicate rows): the next most typical rows of the largest clusters.
    picks.extend(spare[: budget - len(picks)])
    return np.array(picks[:budget], dtype=np.int64)
