"""Driver memory of the batch modes (DESIGN §8): peak RSS for a pool of N rows and of 10N
rows, same k, for ``power`` and ``cluster``.

    python benchmarks/batch_memory.py [--rows 200000] [--k 1000] [--dim 128] [--modes power,cluster]

Each mode and size runs in a fresh process that does what the driver does for a pool of
64-d features scored by an MLP (its embedding, the last stage, is ``--dim`` wide), with
the scorers' output made up (no model):

- both modes: the duplicate pre-pass over the ids (``ids.SeenIds``) and the reduction
  (``score.reduce.Reduction``), fed 4,096-row scorer batches (id, file, row, reason,
  predicted class, score; ``cluster`` adds the cluster column): 10,000 excluded ids;
- ``power``: the reduction computes every row's key and keeps the top k keys;
- ``cluster``: first the centroids' sample (``score.centroids.SampleRows``), fed the
  rows a scorer would send (those under the hash threshold, with an embedding each),
  then k-means with K = k in a child process (on Ray it is a task, off the driver),
  then the reduction keeps the top M = 10k and picks round-robin.

Prints peak RSS per mode and size and the 10N / N ratio (O(k), O(M + K*d) whatever the
pool: the ratio should stay near 1); writes benchmarks/out/batch_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, write_results  # noqa: E402  (this folder is on sys.path)
from topk_memory import BATCH, EXCLUDED, peak_rss_mb, rss_mb  # noqa: E402


def _kmeans_elsewhere(x, k, seed, steps):
    """k-means in a forked child, as a Ray task would run it: its memory is not the driver's."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tidal_ray.method.batch import kmeans

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(kmeans, x, k, seed, steps).result()


def child(mode: str, rows: int, k: int, dim: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from tidal_ray.data.ids import SeenIds
    from tidal_ray.data.pool import PoolSpec
    from tidal_ray.method import batch as batch_modes
    from tidal_ray.score.centroids import SampleRows
    from tidal_ray.score.reduce import Reduction

    params = batch_modes.check_batch_params(mode, k)
    spec = PoolSpec(uri="synthetic://pool", format="features", files=(("synthetic://pool/part-0", 0),),
                    id_type=pa.int64(), rows=rows, shape=(64,))
    exclude = np.arange(EXCLUDED, dtype=np.int64) * max(1, rows // EXCLUDED)
    rng = np.random.default_rng(0)
    baseline = rss_mb()
    started = time.perf_counter()
    seen = SeenIds()
    for start in range(0, rows, BATCH):
        seen.first_seen(np.arange(start, min(start + BATCH, rows), dtype=np.int64))
    record = {}
    if mode == "cluster":
        threshold = np.uint64(batch_modes.sample_threshold(params.sample_rows, rows))
        sample = SampleRows(params.sample_rows, exclude, pa.int64(), 0, 0)
        sent = 0
        for start in range(0, rows, BATCH):
            ids = np.arange(start, min(start + BATCH, rows), dtype=np.int64)
            ids = ids[batch_modes.sample_hashes(ids, 0, 0) <= threshold]
            sent += len(ids)
            sample.add({"id": ids, "file": np.zeros(len(ids), np.int32), "row": ids,
                        "embedding": batch_modes.normalize_rows(rng.normal(size=(len(ids), dim)))})
        sample_ids, x = sample.result()
        record.update(sample_rows_sent=sent, sampled_rows=len(sample_ids))
        fit_started = time.perf_counter()
        centroids = _kmeans_elsewhere(x, params.clusters, 0, params.kmeans_steps)
        record.update(kmeans_seconds=time.perf_counter() - fit_started, centroid_bytes=centroids.nbytes)
    reduction = Reduction(k, "margin", 10, pa.int64(), exclude, spec.file_name, batch=params)
    for start in range(0, rows, BATCH):
        stop = min(start + BATCH, rows)
        n = stop - start
        batch = {"id": np.arange(start, stop, dtype=np.int64), "file": np.zeros(n, np.int32),
                 "row": np.arange(start, stop), "reason": np.full(n, "", dtype="<U1"),
                 "predicted_class": rng.integers(0, 10, n), "margin": -rng.random(n)}
        if mode == "cluster":
            batch["cluster"] = rng.integers(0, params.clusters, n).astype(np.int32)
        reduction.add(batch)
    selected = reduction.selection_table()
    seconds = time.perf_counter() - started
    assert selected.num_rows == k and reduction.rows_read == rows
    return {"mode": mode, "rows": rows, "k": k, "dim": dim, **params.record(), **record,
            "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": baseline, "seconds": seconds}


def measure(mode: str, rows: int, k: int, dim: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(rows), "--k", str(k),
                          "--dim", str(dim)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="N (the second run has 10N)")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128, help="embedding width (the MLP's last stage: 128)")
    parser.add_argument("--modes", default="power,cluster")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "batch_memory.json"))
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.rows, args.k, args.dim)))
        return

    results = {"machine": machine(), "k": args.k, "dim": args.dim, "batch_rows": BATCH, "excluded_ids": EXCLUDED,
               "runs": []}
    for mode in args.modes.split(","):
        small, large = measure(mode, args.rows, args.k, args.dim), measure(mode, 10 * args.rows, args.k, args.dim)
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        results["runs"].append({"mode": mode, "n": small, "10n": large, "ratio": ratio})
        for r in (small, large):
            extra = (f"; sample {r['sampled_rows']:,} of {r['sample_rows_sent']:,} sent, k-means "
                     f"{r['kmeans_seconds']:.1f}s off the driver") if mode == "cluster" else ""
            print(f"{mode:>7}, {r['rows']:>10,} rows, k={args.k}: peak RSS {r['peak_rss_mb']:7.1f} MB "
                  f"(after imports {r['rss_after_imports_mb']:.1f} MB; {r['seconds']:.1f}s{extra})")
        print(f"{mode:>7}: peak RSS 10N / N = {ratio:.3f}")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
