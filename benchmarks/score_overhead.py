"""The scoring pipeline's own cost per row, with a model cheap enough to stand in for a GPU.

    python benchmarks/score_overhead.py [--rows 1000000] [--batch-size 1024] [--shards 8]

An MLP (64-d features, 10 classes, the TD module) with 2 torch threads; a feature pool
of dense int64 ids (``make_pool(..., source="synthetic", fmt="features", shape=(64,))``).
In one run, on the same machine, ``--rounds`` times each (median reported):
- model only: the forward pass over float32 tensors already in memory, the same batch
  size, two timed passes (after an untimed one) just before and two just after each
  pipeline run; their median is that run's reference. This VM's speed drifts (up to
  about 30% between passes a few seconds apart), so a pipeline is only compared with passes
  next to it. This process keeps freed memory as every scorer does
  (``scorer.keep_freed_memory``), so the reference is the model at its best;
- in-process pipeline: ``score_pool(use_ray=False)`` (read, decode, score, reduce);
- Ray pipeline: ``score_pool`` on a local Ray of ``--cpus`` CPUs; "steady" rows/s from
  the first row reaching the driver to the last, with the start-up (plan, actors,
  checkpoint load, first block) reported beside it; ``ray.init`` is not counted;
- driver ingest ceiling: rows/s that ``reduce.Reduction.add`` alone absorbs, fed
  synthetic scorer batches of one block each, Arrow tables as the pipeline delivers them.
Prints figures and ratios; writes benchmarks/out/score_overhead.json.

This process and Ray's workers (``RAY_worker_niceness``, 15 by default) run at the same
niceness (``--nice``, default 0), so that other load on a shared machine hits every side alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, write_results  # noqa: E402  (this folder is on sys.path)
from tidal_ray.train.checkpoint import save_checkpoint  # noqa: E402
from tidal_ray.data.make_pool import make_pool  # noqa: E402
from tidal_ray.models import build_model, prepare_input  # noqa: E402
from tidal_ray.score.reduce import Reduction  # noqa: E402
from tidal_ray.score.pipeline import score_pool  # noqa: E402
from tidal_ray.score.scorer import keep_freed_memory  # noqa: E402

DIM, CLASSES, BACKBONE, STRATEGY = 64, 10, "mlp", "tidal-entropy"
TARGETS = {"in_process_ratio": 0.60, "ray_steady_ratio": 0.40, "ingest_rows_per_s": 1_000_000}


def model_only(net, x: torch.Tensor, batch_size: int, passes: int = 3) -> list[float]:
    """Rows/s of the forward pass alone, tensors already in memory: ``passes`` timed
    passes over ``x`` after an untimed one."""
    def run():
        for start in range(0, len(x), batch_size):
            net.predict(prepare_input(x[start:start + batch_size]))

    run()  # warm-up
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        run()
        rates.append(len(x) / (time.perf_counter() - started))
    return rates


def ingest_ceiling(rows: int, block_rows: int, k: int = 100) -> float:
    """Rows/s that the driver's reduction absorbs: synthetic scorer output, one block per add."""
    rng = np.random.default_rng(0)
    batches = []
    for start in range(0, min(rows, 64 * block_rows), block_rows):
        n = min(block_rows, rows - start)
        batches.append(pa.table({"id": np.arange(start, start + n, dtype=np.int64), "file": np.zeros(n, np.int32),
                                 "row": np.arange(start, start + n, dtype=np.int64),
                                 "reason": pa.array(np.full(n, "", dtype="U1"), pa.string()),
                                 "predicted_class": rng.integers(0, CLASSES, n), STRATEGY: rng.random(n)}))
    reduction = Reduction(k, STRATEGY, CLASSES, pa.int64(), np.array([3, 7], np.int64), lambda f, i: "pool")
    fed = 0
    started = time.perf_counter()
    while fed < rows:
        for batch in batches:
            reduction.add(batch)
            fed += len(batch["id"])
            if fed >= rows:
                break
    return fed / (time.perf_counter() - started)


def _selection(workdir: str, out: str) -> pa.Table:
    return pq.read_table(os.path.join(workdir, out, "selection.parquet"))


def steady(summary: dict) -> tuple[float | None, float | None]:
    timing = summary.get("timing") or {}
    return timing.get("steady_rows_per_s"), timing.get("first_row_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--model-rows", type=int, default=200_000, help="rows per model-only measurement")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (model only, in-process, the actor)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--actors", default="1,1", help="scorer actors MIN,MAX")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each pipeline, each between model-only passes")
    parser.add_argument("--nice", type=int, default=0, help="niceness of this process and of Ray's workers")
    parser.add_argument("--workdir", default=None, help="where the pool and checkpoint go (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "score_overhead.json"))
    args = parser.parse_args()
    low, high = (int(a) for a in args.actors.split(","))
    os.nice(args.nice - os.nice(0))
    os.environ["RAY_worker_niceness"] = str(args.nice)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every scorer does: the model-only reference runs alike
    workdir = args.workdir or tempfile.mkdtemp(prefix="score-overhead-")
    load_start = os.getloadavg()

    started = time.perf_counter()
    pool = os.path.join(workdir, "pool")
    if not os.path.exists(pool):
        make_pool(pool, "synthetic", rows=args.rows, fmt="features", shards=args.shards, shape=(DIM,),
                  num_classes=CLASSES)
    torch.manual_seed(0)
    net = build_model(BACKBONE, CLASSES, (DIM,)).eval()
    checkpoint = save_checkpoint({"model": net.state_dict(),
                                  "config": {"backbone": BACKBONE, "num_classes": CLASSES, "input_shape": [DIM]}},
                                 os.path.join(workdir, "checkpoint"))
    x = torch.from_numpy(np.random.default_rng(0).random((args.model_rows, DIM), dtype=np.float32))
    print(f"setup {time.perf_counter() - started:.1f}s: {args.rows:,} rows of {DIM}-d features in {args.shards} "
          f"files, {BACKBONE}, batch {args.batch_size}, {args.threads} torch threads; load average "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    common = dict(batch_size=args.batch_size, strategy=STRATEGY, progress=False)

    # Rounds of model-only, pipeline, model-only: this machine's speed drifts (a shared
    # VM), so each pipeline run is held against the model-only passes just before and
    # after it, and the median round is reported.
    def bracketed(run) -> tuple[dict, float, list[float]]:
        before = model_only(net, x, args.batch_size, passes=2)
        cpu = time.process_time()
        summary = run()
        summary["driver_cpu_seconds"] = time.process_time() - cpu
        after = model_only(net, x, args.batch_size, passes=2)
        return summary, float(np.median(before + after)), before + after

    local_runs = []
    for i in range(args.rounds):
        summary, reference, passes = bracketed(lambda: score_pool(
            checkpoint, pool, 100, os.path.join(workdir, "out-local"), use_ray=False, **common))
        local_runs.append({"rows_per_s": summary["rows_per_s"], "model_only": passes, "reference": reference,
                           "ratio": summary["rows_per_s"] / reference, "selection": _selection(workdir, "out-local")})
        print(f"in-process {i + 1}: {summary['rows_per_s']:,.0f} rows/s, model only {reference:,.0f} "
              f"({', '.join(f'{r:,.0f}' for r in passes)}): ratio {local_runs[-1]['ratio']:.3f}", flush=True)

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_runs = []
    for i in range(args.rounds):
        summary, reference, passes = bracketed(lambda: score_pool(
            checkpoint, pool, 100, os.path.join(workdir, "out-ray"), actors=(low, high), **common))
        torch.set_num_threads(args.threads)
        rate, startup = steady(summary)
        ray_runs.append({"steady_rows_per_s": rate, "startup_seconds": startup,
                         "end_to_end_rows_per_s": summary["rows_per_s"], "wall_seconds": summary["wall_seconds"],
                         "driver_cpu_seconds": summary["driver_cpu_seconds"], "model_only": passes,
                         "reference": reference, "steady_ratio": (rate or 0.0) / reference,
                         "end_to_end_ratio": summary["rows_per_s"] / reference,
                         "selection": _selection(workdir, "out-ray")})
        print(f"Ray {i + 1}: steady {(rate or 0):,.0f} rows/s after a start-up of {(startup or 0):.1f}s, "
              f"{summary['rows_per_s']:,.0f} end to end ({summary['wall_seconds']:.1f}s); model only "
              f"{reference:,.0f}: steady ratio {ray_runs[-1]['steady_ratio']:.3f}; the driver used "
              f"{summary['driver_cpu_seconds']:.1f} CPU-s", flush=True)
    ray.shutdown()

    ingest = ingest_ceiling(args.rows, 50 * args.batch_size)  # about the pipeline's block for 64-d features
    print(f"driver ingest ceiling (Reduction.add alone): {ingest:,.0f} rows/s", flush=True)

    selections = [r.pop("selection") for r in local_runs + ray_runs]
    same = all(t.equals(selections[0]) for t in selections)
    ratios = {"in_process_ratio": float(np.median([r["ratio"] for r in local_runs])),
              "ray_steady_ratio": float(np.median([r["steady_ratio"] for r in ray_runs])),
              "ray_end_to_end_ratio": float(np.median([r["end_to_end_ratio"] for r in ray_runs]))}
    load_end = os.getloadavg()
    print(f"\nmedian of {args.rounds} rounds: in-process / model only = {ratios['in_process_ratio']:.3f} "
          f"(target >= 0.60); Ray steady / model only = {ratios['ray_steady_ratio']:.3f} (target >= 0.40); "
          f"Ray end to end {ratios['ray_end_to_end_ratio']:.3f}")
    print(f"ingest ceiling {ingest:,.0f} rows/s (target >= 1,000,000); every run selected the same rows: {same}")
    print(f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}")

    result = {
        "machine": machine(torch=torch.__version__), "backbone": BACKBONE, "dim": DIM, "rows": args.rows, "shards": args.shards,
        "batch_size": args.batch_size, "torch_threads": args.threads, "ray_cpus": args.cpus, "actors": [low, high],
        "niceness": os.nice(0), "in_process_runs": local_runs, "ray_runs": ray_runs,
        "ingest_rows_per_s": ingest, **ratios, "targets": TARGETS, "same_selection": same,
        "load_average": {"start": load_start, "end": load_end},
    }
    write_results(result, args.out)


if __name__ == "__main__":
    main()
