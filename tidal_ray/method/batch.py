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

import math
from dataclasses import dataclass

import numpy as np

from tidal_ray.errors import BadInput
from tidal_ray.method.hashing import hash64

MODES = ("topk", "power", "cluster")
SCORE_FLOOR = np.float32(1e-12)        # s > 0 however certain the model is
TYPICALITY_NEIGHBOURS = 20
KMEANS_STEPS = 25
DISTANCE_CELLS = 1 << 24              # row-centroid distances computed at once (128 MB of float64)
MAX_CLUSTERS = 1000
SAMPLE_ROWS = 20_000                   # unlabeled rows the centroids are fitted on
SAMPLE_SLACK = 1.25                    # the hash threshold admits this many times more, expected
CANDIDATES_PER_K = 10


# ---- parameters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchParams:
    """A batch mode and its settled parameters (``check_batch_params``)."""
    mode: str = "topk"
    beta: float | None = None          # power
    clusters: int | None = None        # cluster: K
    candidates: int | None = None      # cluster: M
    sample_rows: int = SAMPLE_ROWS     # cluster: the centroids' sample, at most
    kmeans_steps: int = KMEANS_STEPS   # cluster: Lloyd steps, at most

    def record(self) -> dict:
        """What selection.json says about the mode."""
        if self.mode == "power":
            return {"batch_mode": "power", "beta": self.beta}
        if self.mode == "cluster":
            return {"batch_mode": "cluster", "clusters": self.clusters, "candidates": self.candidates,
                    "sample_rows": self.sample_rows, "kmeans_steps": self.kmeans_steps}
        return {"batch_mode": "topk"}


def _number(flag: str, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadInput(f"{flag} {value}: not {'a number' if kind is float else 'an integer'}") from None
    if kind is float and not math.isfinite(number):
        raise BadInput(f"{flag} {value}: not a finite number")
    return number


def check_batch_params(mode: str, k: int, beta=None, clusters=None, candidates=None) -> BatchParams:
    """``--batch-mode`` and its flags (None = not given), checked: BadInput naming the
    flag and value for a bad value or a flag that does not apply to the mode. Defaults:
    beta 1; clusters k (at most 1000); candidates 10 * k."""
    if mode not in MODES:
        raise BadInput(f"--batch-mode {mode}: choose one of {', '.join(MODES)}")
    given = {"--beta": beta, "--clusters": clusters, "--candidates": candidates}
    applies = {"topk": (), "power": ("--beta",), "cluster": ("--clusters", "--candidates")}[mode]
    for flag, value in given.items():
        if value is not None and flag not in applies:
            raise BadInput(f"{flag} {value}: applies to --batch-mode "
                           f"{'power' if flag == '--beta' else 'cluster'} only, not {mode}")
    if mode == "power":
        beta = 1.0 if beta is None else _number("--beta", beta, float)
        if beta <= 0:
            raise BadInput(f"--beta {beta:g}: must be > 0")
        return BatchParams("power", beta=beta)
    if mode == "cluster":
        clusters = min(int(k), MAX_CLUSTERS) if clusters is None else _number("--clusters", clusters, int)
        if not 1 <= clusters <= MAX_CLUSTERS:
            raise BadInput(f"--clusters {clusters}: must be between 1 and {MAX_CLUSTERS}")
        candidates = CANDIDATES_PER_K * int(k) if candidates is None else _number("--candidates", candidates, int)
        if candidates < k:
            raise BadInput(f"--candidates {candidates}: must be at least k ({k})")
        return BatchParams("cluster", clusters=clusters, candidates=candidates)
    return BatchParams()


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
        assign = nearest_centroid(x, centroids)
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
    """Each row's nearest centroid (ties: the smaller index), int32. Rows go a chunk at a
    time, so the distances held stay about ``DISTANCE_CELLS`` (a typical draw of 5,000 over
    a 20,000-row sample held 800 MB of them at once)."""
    x = np.asarray(x)
    out = np.zeros(len(x), dtype=np.int32)
    rows = max(1, DISTANCE_CELLS // max(len(centroids), 1))
    for start in range(0, len(x), rows):
        out[start:start + rows] = _squared_distances(x[start:start + rows], centroids).argmin(axis=1)
    return out


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


def cluster_pick(ids, scores, clusters, classes, k: int, quota: int | None = None) -> np.ndarray:
    """``round_robin``'s order over all candidates, cut at ``k``; with a per-class
    ``quota``, a row whose predicted class already has ``quota`` picks is passed over
    until the order runs out, and then the rows passed over fill up to ``k`` in that order."""
    order = round_robin(ids, scores, clusters, len(ids))
    if quota is None:
        return order[:k]
    taken: dict[int, int] = {}
    picks, passed = [], []
    for i in order.tolist():
        c = int(classes[i])
        if taken.get(c, 0) < quota:
            taken[c] = taken.get(c, 0) + 1
            picks.append(i)
        else:
            passed.append(i)
    return np.array((picks + passed)[:k], dtype=np.int64)


def sample_hashes(ids: np.ndarray, seed: int, cycle: int) -> np.ndarray:
    """The hash that picks the centroids' sample: the rows with the smallest win."""
    return hash64(np.asarray(ids), (int(seed) * 1_000_003 + int(cycle)) ^ 0x5A3E)


def sample_threshold(sample_rows: int, pool_rows: int) -> int:
    """Rows whose ``sample_hashes`` is at most this are the sample's candidates: about
    ``SAMPLE_SLACK * sample_rows`` of ``pool_rows`` (every row in a small pool)."""
    fraction = SAMPLE_SLACK * sample_rows / max(int(pool_rows), 1)
    return 2**64 - 1 if fraction >= 1 else int(fraction * 2**64)


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
