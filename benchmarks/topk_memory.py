"""Driver memory of the whole-pool reduction: peak RSS for a pool of N rows and of 10N rows, same k.

    python benchmarks/topk_memory.py [--rows 200000] [--k 1000] [--ids dense|sparse|both]

Each size runs in a fresh process, which feeds scorer-output batches (4,096 rows: id,
file, row, reason, predicted class, score, as the actors send them) through the driver's
real duplicate pre-pass (``ids.SeenIds`` over the ids, as ``read.repeated_ids`` does) and
reduction, ``tidal_ray.score.reduce.Reduction``: exclusions (10,000 ids),
streaming exact top-k, row accounting. Ids are either dense (0..N-1, what make-pool and
most pools use) or sparse (scattered 62-bit integers), since the duplicate check keeps a
bit per id for the first and 8 bytes per id for the second. Prints peak RSS per size and
the 10N / N ratio; writes benchmarks/out/topk_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, write_results  # noqa: E402  (this folder is on sys.path)

BATCH = 4096
EXCLUDED = 10_000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(rows: int, k: int, ids_kind: str) -> dict:
    """Run one reduction in this process and report its memory."""
    import numpy as np
    import pyarrow as pa

    from tidal_ray.data.ids import SeenIds
    from tidal_ray.data.pool import PoolSpec
    from tidal_ray.score.reduce import Reduction

    def ids_at(positions):
        ids = np.asarray(positions, dtype=np.int64)
        return ids if ids_kind == "dense" else (ids * 2654435761 + 12345) % (1 << 62)

    spec = PoolSpec(uri="synthetic://pool", format="pixels", files=(("synthetic://pool/part-0", 0),),
                    id_type=pa.int64(), rows=rows, shape=(1,))
    exclude = np.unique(ids_at(np.arange(EXCLUDED) * max(1, rows // EXCLUDED)))
    reduction = Reduction(k, "tidal-entropy", 10, pa.int64(), exclude, spec.file_name)
    rng = np.random.default_rng(0)
    baseline = rss_mb()
    started = time.perf_counter()
    seen = SeenIds()  # the duplicate pre-pass: the pool's ids, once
    for start in range(0, rows, BATCH):
        seen.first_seen(ids_at(np.arange(start, min(start + BATCH, rows))))
    for start in range(0, rows, BATCH):
        stop = min(start + BATCH, rows)
        n = stop - start
        reduction.add({"id": ids_at(np.arange(start, stop)), "file": np.zeros(n, np.int32),
                       "row": np.arange(start, stop), "reason": np.full(n, "", dtype="<U1"),
                       "predicted_class": rng.integers(0, 10, n), "tidal-entropy": rng.random(n)})
    seconds = time.perf_counter() - started
    selected = reduction.selection_table()
    assert selected.num_rows == k and reduction.rows_read == rows
    assert reduction.rows_scored + reduction.rows_excluded == rows
    return {"rows": rows, "ids": ids_kind, "k": k, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": baseline,
            "duplicate_check_bytes": seen.nbytes, "reduction_rows_per_s": rows / seconds}


def measure(rows: int, k: int, ids_kind: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(rows), "--k", str(k), "--ids", ids_kind],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="N (the second run has 10N)")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--ids", default="both", choices=["dense", "sparse", "both"])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "topk_memory.json"))
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.k, args.ids)))
        return

    results = {"machine": machine(),
               "k": args.k, "batch_rows": BATCH, "excluded_ids": EXCLUDED, "runs": []}
    for ids_kind in (["dense", "sparse"] if args.ids == "both" else [args.ids]):
        small, large = measure(args.rows, args.k, ids_kind), measure(10 * args.rows, args.k, ids_kind)
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        results["runs"].append({"ids": ids_kind, "n": small, "10n": large, "ratio": ratio})
        for r in (small, large):
            print(f"{ids_kind:>6} ids, {r['rows']:>10,} rows, k={args.k}: peak RSS {r['peak_rss_mb']:7.1f} MB "
                  f"(after imports {r['rss_after_imports_mb']:.1f} MB; duplicate check "
                  f"{r['duplicate_check_bytes'] / 2**20:.2f} MB; {r['reduction_rows_per_s']:,.0f} rows/s)")
        print(f"{ids_kind:>6} ids: peak RSS 10N / N = {ratio:.3f} (target <= 1.10)")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
