"""What training pays to read its labeled rows by position, in a pool of N and of 10N rows.

    python benchmarks/labeled_reads.py [--rows 1000000] [--labels 1000] [--repeat 3] [--pools DIR]

The pools are ``campaign_scale.py``'s (synthetic 64-d float32 features, 100,000 rows per
parquet file, one row group per file; ``--pools DIR`` reuses them). ``--labels`` positions
are drawn uniformly at random, as an oracle's initial draw or a cycle's selection falls
on a pool, and read the way training's read tasks read them
(``lookup.rows_at_positions``: each row group holding a position is decoded up to its last
wanted row), in this one process. Prints, per pool: the row groups touched, the rows
decoded, the best and every wall time; then the 10N / N ratio of the best times. This is
the part of a campaign's train step that grows with the pool (``campaign_scale.py``
measures the whole step). Writes benchmarks/out/labeled_reads.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from campaign_scale import ensure_pool  # noqa: E402  (this folder is on sys.path)
from common import machine, write_results  # noqa: E402


def read_labeled(uri: str, labels: int, repeat: int, seed: int = 0) -> dict:
    """Time reading ``labels`` random positions of the pool at ``uri``, ``repeat`` times."""
    from tidal_ray.data.lookup import position_units, row_group_of, rows_at_positions
    from tidal_ray.data.pool import describe_pool

    spec = describe_pool(uri)
    chosen = np.sort(np.random.default_rng(seed).choice(spec.rows, size=labels, replace=False))
    ends = np.cumsum([sum(groups) for groups in spec.row_groups])
    files = np.searchsorted(ends, chosen, side="right")
    rows = chosen - np.concatenate([[0], ends[:-1]])[files]
    groups = row_group_of(spec.row_groups, files, rows)
    units = position_units(files, groups, rows)
    group_starts = {(f, g): int(sum(spec.row_groups[f][:g])) for f, g, _ in units}
    decoded = sum(int(r[-1]) - group_starts[(f, g)] + 1 for f, g, r in units)
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        table = rows_at_positions(spec, files, groups, rows, [spec.column])
        seconds.append(time.perf_counter() - started)
        assert table.num_rows == labels, (table.num_rows, labels)
    return {"rows": spec.rows, "row_groups": sum(len(g) for g in spec.row_groups), "labels": labels,
            "row_groups_touched": len(units), "rows_decoded": decoded, "seconds": seconds, "best": min(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="N (the other pool has 10N)")
    parser.add_argument("--labels", type=int, default=1000, help="positions read, drawn at random")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pools", help="local folder for the pools, reused when already there")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "labeled_reads.json"))
    args = parser.parse_args()

    results = {"machine": machine(), "settings": vars(args), "pools": []}
    with tempfile.TemporaryDirectory(prefix="labeled-reads-") as scratch:
        folder = args.pools or scratch
        for rows in (args.rows, 10 * args.rows):
            result = read_labeled(ensure_pool(f"{folder}/pool-{rows}", rows), args.labels, args.repeat)
            results["pools"].append(result)
            print(f"{rows:>11,} rows: {args.labels} positions in {result['row_groups_touched']} of "
                  f"{result['row_groups']} row groups, {result['rows_decoded']:,} rows decoded; best "
                  f"{result['best']:.2f} s (" + " / ".join(f"{s:.2f}" for s in result["seconds"]) + ")", flush=True)
    small, large = results["pools"]
    results["ratio"] = large["best"] / small["best"]
    print(f"10N / N: {results['ratio']:.2f} in time, {large['rows_decoded'] / small['rows_decoded']:.2f} in rows decoded")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
