"""The cluster batch mode's centroids (DESIGN §8): k-means on a bounded, hashed sample
of the unlabeled pool's embeddings.

The sample is the ``sample_rows`` unlabeled, decodable rows with the smallest
``method.batch.sample_hashes`` (ties by id). The scorers (``BatchScorer`` with
``sample``) send only rows under a hash threshold that admits about 1.25 times that
many, with their positions and embeddings; ``SampleRows`` keeps, for each id, its
earliest row (``ids.earliest_rows``) and trims to the smallest hashes, so the driver
holds at most ``2 * sample_rows`` embeddings and the sample does not depend on the
order rows arrive in. The centroids come from ``method.batch.kmeans`` over the sample
in (hash, id) order, seeded by the run's seed and cycle.
"""
from __future__ import annotations

import numpy as np

from tidal_ray.data import ids as id_utils
from tidal_ray.data.decode import numpy_column
from tidal_ray.data.ids import is_member
from tidal_ray.data.lookup import encode_positions
from tidal_ray.errors import BadInput
from tidal_ray.method.batch import kmeans, sample_hashes


class SampleRows:
    """The centroids' sample as batches of sampled rows arrive, in any order."""

    def __init__(self, limit: int, exclude: np.ndarray, id_type, seed: int, cycle: int):
        self.limit, self.exclude, self.id_type = int(limit), exclude, id_type
        self.seed, self.cycle = seed, cycle
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # ids, positions, embeddings
        self.held = 0

    def add(self, batch) -> None:
        ids = id_utils.to_numpy(batch["id"], self.id_type)
        if not len(ids):
            return
        column = batch["embedding"]
        if isinstance(column, np.ndarray):
            embeddings = column
        else:  # an Arrow fixed-size list column
            column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
            embeddings = column.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1)
        positions = encode_positions(numpy_column(batch, "file"), numpy_column(batch, "row"))
        keep = ~is_member(self.exclude, ids) & np.isfinite(embeddings).all(axis=1)
        self.parts.append((ids[keep], positions[keep], np.array(embeddings[keep], dtype=np.float32)))
        self.held += int(keep.sum())
        if self.held > 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        """One row per id (the earliest), the ``limit`` smallest (hash, id), in that order."""
        if not self.parts:
            return
        ids, positions, embeddings = (np.concatenate(column) for column in zip(*self.parts))
        winners = id_utils.earliest_rows(ids, positions)
        order = np.lexsort((ids[winners], sample_hashes(ids[winners], self.seed, self.cycle)))[: self.limit]
        chosen = winners[order]
        self.parts = [(ids[chosen], positions[chosen], embeddings[chosen])]
        self.held = len(chosen)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, embeddings)`` of the sample, in (hash, id) order."""
        self._trim()
        if not self.parts:
            return id_utils.empty(self.id_type), np.zeros((0, 1), np.float32)
        ids, _, embeddings = self.parts[0]
        return ids, embeddings


def fit_centroids(batches, plan, run_kmeans=None) -> tuple[np.ndarray, int]:
    """Centroids ``(K, d)`` from the sampler's ``batches`` and the number of sampled
    rows. ``run_kmeans(x, k, seed)`` runs it elsewhere (a Ray task), default here.
    BadInput when the pool has fewer unlabeled rows than ``--clusters``."""
    sample = SampleRows(plan.batch.sample_rows, plan.exclude, plan.spec.id_type, plan.seed, plan.cycle)
    for batch in batches:
        sample.add(batch)
    ids, x = sample.result()
    k = plan.batch.clusters
    if len(ids) < k:
        raise BadInput(f"--clusters {k}: more than the {len(ids)} unlabeled rows "
                       f"{'of the pool' if len(ids) < plan.batch.sample_rows else 'sampled'}")
    seed = int(plan.seed) * 1_000_003 + int(plan.cycle)
    centroids = (run_kmeans or kmeans)(x, k, seed, plan.batch.kmeans_steps)
    return np.asarray(centroids, dtype=np.float32), len(ids)
