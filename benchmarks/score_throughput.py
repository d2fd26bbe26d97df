"""Scoring throughput: the model alone vs the whole pipeline, on the same machine in the same run.

    python benchmarks/score_throughput.py [--rows 20000] [--batch-size 256] [--device cpu|cuda] [--actors 1,1]

Model only: ResNet-18 + TD module (eval) on 3x32x32 uint8 tensors already in memory,
the same batch size and torch threads as a scorer actor, measured before and after the
pipeline (their mean is the reference, so drifting background load hits both sides).
Pipeline: ``tidal_ray.score.pipeline.score_pool`` on a local parquet pool of the same shape:
Ray Data read -> decode (CPU tasks) -> BatchScorer actors -> driver top-k, timed end to
end from the call (actor start and checkpoint load included; ``ray.init`` not). Also
the same work in-process (no Ray) to tell Ray's overhead from the decode's. Prints the
figures and the pipeline / model-only ratio; writes benchmarks/out/score_throughput.json.

Ray runs its workers at niceness 15 (RAY_worker_niceness), so on a machine shared with
other work the scorer actor yields the CPU where a plain process would not. The benchmark
process takes the same niceness (``--nice``) so that other load hits both sides alike;
on a quiet machine it changes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, write_results  # noqa: E402  (this folder is on sys.path)
from tidal_ray.train.checkpoint import save_checkpoint  # noqa: E402
from tidal_ray.data.make_pool import make_pool, synthetic_rows  # noqa: E402
from tidal_ray.cli import parse_actors  # noqa: E402
from tidal_ray.models import build_model, prepare_input  # noqa: E402
from tidal_ray.score.pipeline import score_pool  # noqa: E402
from tidal_ray.score.scorer import keep_freed_memory  # noqa: E402

SHAPE, CLASSES, BACKBONE = (3, 32, 32), 10, "resnet18"


def model_only(net, x: torch.Tensor, batch_size: int, device: str) -> float:
    """Rows/s of the forward pass alone (uint8 -> float on the device, as the scorer does)."""
    def run(rows):
        for start in range(0, rows, batch_size):
            net.predict(prepare_input(x[start:start + batch_size].to(device, non_blocking=True)))
        if device == "cuda":
            torch.cuda.synchronize()

    run(2 * batch_size)  # warm-up
    started = time.perf_counter()
    run(len(x))
    return len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="pool rows for the pipeline")
    parser.add_argument("--model-rows", type=int, default=4096, help="rows per model-only measurement")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--actors", default="1,1", help="scorer actors MIN,MAX")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-in-process", action="store_true", help="skip the no-Ray pipeline run")
    parser.add_argument("--nice", type=int, default=15, help="niceness of this process (Ray's workers: 15)")
    parser.add_argument("--workdir", default=None, help="where the pool and checkpoint go (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "score_throughput.json"))
    args = parser.parse_args()
    low, high = parse_actors(args.actors)
    os.nice(args.nice - os.nice(0))
    cpus = os.cpu_count() or 1
    # A CPU scorer actor runs torch with (node CPUs // max actors) threads: the same here.
    threads = max(1, cpus // high)
    torch.set_num_threads(threads)
    keep_freed_memory()  # as every scorer does: the model-only reference runs alike
    workdir = args.workdir or tempfile.mkdtemp(prefix="score-throughput-")

    started = time.perf_counter()
    pool = os.path.join(workdir, "pool")
    if not os.path.exists(pool):
        make_pool(pool, "synthetic", rows=args.rows, fmt="pixels", shards=args.shards, shape=SHAPE,
                  num_classes=CLASSES)
    torch.manual_seed(0)
    net = build_model(BACKBONE, CLASSES, SHAPE).eval()
    checkpoint = save_checkpoint({"model": net.state_dict(),
                                  "config": {"backbone": BACKBONE, "num_classes": CLASSES, "input_shape": list(SHAPE)}},
                                 os.path.join(workdir, "checkpoint"))
    net = net.to(args.device)
    pixels, _ = synthetic_rows(np.arange(args.model_rows), SHAPE, CLASSES, seed=0)
    x = torch.from_numpy(pixels)
    if args.device == "cuda":
        x = x.pin_memory()
    print(f"setup {time.perf_counter() - started:.1f}s: {args.rows:,} rows of {'x'.join(map(str, SHAPE))} pixels, "
          f"{BACKBONE}, batch {args.batch_size}, {threads} torch thread(s), device {args.device}", flush=True)

    before = model_only(net, x, args.batch_size, args.device)
    print(f"model only (before): {before:,.1f} rows/s", flush=True)

    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    load_before, driver_cpu = os.getloadavg()[0], time.process_time()
    summary = score_pool(checkpoint, pool, 100, os.path.join(workdir, "out-ray"), batch_size=args.batch_size,
                         actors=(low, high), use_gpu=args.device == "cuda")
    pipeline = summary["rows_per_s"]
    driver_cpu = time.process_time() - driver_cpu
    load_after = os.getloadavg()[0]
    timing = summary["timing"]
    print(f"pipeline (Ray Data, actors {low},{high}): {pipeline:,.1f} rows/s "
          f"({summary['rows_read']:,} rows in {summary['wall_seconds']:.1f}s); steady "
          f"{timing['steady_rows_per_s'] or 0:,.1f} rows/s after a start-up of {timing['first_row_seconds']:.1f}s",
          flush=True)
    ray.shutdown()

    in_process = None
    if not args.skip_in_process:
        torch.set_num_threads(threads)
        local = score_pool(checkpoint, pool, 100, os.path.join(workdir, "out-local"), batch_size=args.batch_size,
                           use_ray=False, progress=False)
        in_process = local["rows_per_s"]
        print(f"pipeline in-process (no Ray): {in_process:,.1f} rows/s", flush=True)

    torch.set_num_threads(threads)
    after = model_only(net, x, args.batch_size, args.device)
    print(f"model only (after): {after:,.1f} rows/s", flush=True)
    reference = (before + after) / 2
    ratio = pipeline / reference
    print(f"\npipeline / model only = {pipeline:,.1f} / {reference:,.1f} = {ratio:.3f} (target >= 0.90)")
    print(f"driver CPU during the pipeline: {driver_cpu:.1f}s of {summary['wall_seconds']:.1f}s; "
          f"load average {load_before:.2f} -> {load_after:.2f}")
    if abs(before - after) > 0.15 * reference:
        print("warning: model-only throughput moved by more than 15% during the run "
              "(other load on this machine?); rerun on a quiet machine")

    result = {
        "machine": machine(torch=torch.__version__, device=args.device,
                           **({"gpu": torch.cuda.get_device_name(0)} if args.device == "cuda" else {})), "backbone": BACKBONE, "shape": list(SHAPE), "rows": args.rows,
        "model_rows": args.model_rows, "batch_size": args.batch_size, "torch_threads": threads,
        "actors": [low, high], "niceness": os.nice(0), "model_only_rows_per_s": {"before": before, "after": after, "mean": reference},
        "pipeline_rows_per_s": pipeline, "pipeline_wall_seconds": summary["wall_seconds"],
        "pipeline_steady_rows_per_s": timing["steady_rows_per_s"], "pipeline_startup_seconds": timing["first_row_seconds"],
        "in_process_pipeline_rows_per_s": in_process, "ratio": ratio, "target_ratio": 0.90,
        "driver_cpu_seconds": driver_cpu, "load_average": [load_before, load_after],
        "accounting": {k: summary[k] for k in ("rows_read", "rows_scored", "rows_rejected", "rows_excluded")},
    }
    write_results(result, args.out)


if __name__ == "__main__":
    main()
