"""Driver memory and wall time of one oracle campaign cycle, for a pool of N and of 10N rows.

    python benchmarks/campaign_scale.py [--rows 200000] [--storage local|s3|both] [--repeat 2] [--pools DIR]

The pool is synthetic 64-d float32 features (``make_pool --source synthetic --format
features --shape 64``), 100,000 rows per parquet file, on local disk and/or on a
loopback S3 server (moto's ThreadedMotoServer, started here on 127.0.0.1, reached
through the AWS environment like a real endpoint). Each run is two fresh driver
processes, so the peak RSS is that run's own:
- ``init``: ``campaign.init`` with the oracle drawing the initial labels at random;
- ``cycle``: a local Ray started, then the campaign's steps as ``campaign.run`` calls
  them: train (Ray Train, 1 worker), select (score the whole pool on Ray Data), export,
  oracle labels, merge, and the final train; a 10,000-row test set is evaluated after
  each training.
Driver peak RSS is the process's own high-water mark (VmHWM in /proc/self/status),
read after each step, so a step's figure is the peak so far; Ray's daemons and object
store are other processes and are not counted. Not ``ru_maxrss``: Linux carries it over
an exec from the process that spawned the child, so every child would report at least
this benchmark's own RSS, which holds the loopback S3 server's objects. Prints per-step wall time and peak RSS
(and the select step's driver CPU seconds: the reduction and Ray Data's executor, all threads), each training
step split into its labeled-row read, its epochs, the rest of the training and the step around it, and the 10N / N ratios: driver peak RSS for ``init`` and the whole cycle, and wall time
for train, select, final train and the whole cycle (every step after ``ray start``), with
the load average at the start of each run (the machine is shared). ``--pools DIR`` keeps
the local pools in DIR and reuses them on the next run (a 10M-row pool takes about a
minute to write). Writes benchmarks/out/campaign_scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, peak_rss_mb, start_s3, write_results  # noqa: E402  (this folder is on sys.path)

ROWS_PER_FILE = 100_000
TEST_ROWS = 10_000
SHAPE = "64"


def child_init(root: str, pool: str, test: str, args) -> dict:
    from tidal_ray.campaign import cycle as campaign

    config = campaign.CampaignConfig(pool=pool, test=test, num_classes=10, k=args.k, cycles=1,
                                     backbone="mlp", epochs=args.epochs, batch_size=256, seed=0,
                                     initial_labels=args.initial, oracle=True, trainer="ray", workers=1,
                                     initial_draw="random")  # the default; every measurement here used it
    started = time.perf_counter()
    campaign.init(root, config, log=lambda line: print(line, file=sys.stderr))
    return {"steps": [{"step": "init", "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}]}


def child_cycle(root: str) -> dict:
    from tidal_ray.campaign import cycle as campaign
    from tidal_ray.runtime import init_ray

    def log(line):
        print(line, file=sys.stderr)

    state = campaign.load_state(root)
    config = campaign.config_of(state)
    steps = [
        ("ray start", init_ray),
        ("train", lambda: campaign.step_train(root, config, 0, log)),
        ("select", lambda: campaign.step_select(root, config, 0, log)),
        ("export", lambda: campaign.step_export(root, config, 0, log)),
        ("oracle", lambda: campaign.step_wait_for_labels(root, config, 0, log)),
        ("merge", lambda: campaign.labeled_table(root).num_rows),
        ("final train", lambda: campaign.step_train(root, config, 1, log)),
    ]
    out = []
    for name, run in steps:
        started, cpu = time.perf_counter(), time.process_time()
        run()
        # The driver's own CPU (this process, Ray's workers not counted): on two cores it
        # competes with the scorer for the select step.
        out.append({"step": name, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
                    "driver_cpu_seconds": time.process_time() - cpu})
    metrics = [campaign.storage.read_json(campaign.cycle_uri(root, c, "metrics.json")) for c in (0, 1)]
    selection = campaign.storage.read_json(campaign.cycle_uri(root, 0, "selection.json"))
    # A training step's parts: the labeled rows read from the pool, the epochs themselves,
    # the rest of the training (Ray Train's workers starting, the checkpoint), and what the
    # step does around it (the pool's description, the labels table, the test set).
    seconds_of = {s["step"]: s["seconds"] for s in out}
    trains = [{"step": name, "seconds": seconds_of[name], "read": m["read_seconds"],
               "epochs": sum(h.get("epoch_seconds", 0.0) for h in m["train_history"]),
               "training": m["train_seconds"]}
              for name, m in zip(("train", "final train"), metrics)]
    return {"steps": out, "trains": trains, "labeled": [m["labeled"] for m in metrics],
            "test_accuracy": [m["test_accuracy"] for m in metrics], "rows_scored": selection["rows_scored"]}


def run_child(kind: str, root: str, pool: str, test: str, args) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--root", root, "--pool", pool, "--test", test,
            "--k", str(args.k), "--initial", str(args.initial), "--epochs", str(args.epochs)]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def seconds(run: dict, step: str) -> float:
    """A step's wall time in a run; ``whole cycle``: every step after ``ray start``."""
    steps = run["cycle"]["steps"]
    if step == "whole cycle":
        return sum(s["seconds"] for s in steps if s["step"] != "ray start")
    return next(s["seconds"] for s in steps if s["step"] == step)


def ensure_pool(uri: str, rows: int) -> str:
    """A synthetic features pool of ``rows`` rows at ``uri``, written unless already there."""
    from tidal_ray.data import storage
    from tidal_ray.data.make_pool import make_pool

    if storage.exists(uri) and storage.list_files(uri):
        print(f"using the {rows:,}-row pool at {uri}", flush=True)
        return uri
    started = time.perf_counter()
    make_pool(uri, source="synthetic", rows=rows, fmt="features", shape=SHAPE, shards=max(1, rows // ROWS_PER_FILE))
    print(f"wrote a {rows:,}-row pool at {uri} in {time.perf_counter() - started:.0f}s", flush=True)
    return uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="N (the other pool has 10N)")
    parser.add_argument("--storage", default="both", choices=["local", "s3", "both"])
    parser.add_argument("--repeat", type=int, default=2, help="runs per pool (fresh campaign each)")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--initial", type=int, default=1000, help="initial labels drawn by the oracle")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--init-only", action="store_true", help="measure campaign init alone (quick repeats)")
    parser.add_argument("--pools", help="local folder for the pools, reused when already there (local storage)")
    parser.add_argument("--child", choices=["init", "cycle"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--test", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "campaign_scale.json"))
    args = parser.parse_args()
    if args.child:
        result = child_init(args.root, args.pool, args.test, args) if args.child == "init" else child_cycle(args.root)
        print(json.dumps(result))
        return

    results = {"machine": machine(),
               "settings": {"n": args.rows, "shape": SHAPE, "rows_per_file": ROWS_PER_FILE, "k": args.k,
                            "initial_labels": args.initial, "epochs": args.epochs, "backbone": "mlp",
                            "test_rows": TEST_ROWS},
               "runs": [], "ratios": []}
    stores = ["local", "s3"] if args.storage == "both" else [args.storage]
    with tempfile.TemporaryDirectory(prefix="campaign-scale-") as local:
        for store in stores:
            base = start_s3("campaign-scale") if store == "s3" else local
            pools = args.pools if store == "local" and args.pools else base
            test = ensure_pool(f"{pools}/test", TEST_ROWS)
            by_size = {}
            for rows in (args.rows, 10 * args.rows):
                pool = ensure_pool(f"{pools}/pool-{rows}", rows)
                for repeat in range(args.repeat):
                    root = f"{base}/campaign-{rows}-{repeat}"
                    run = {"storage": store, "rows": rows, "repeat": repeat, "load_average": os.getloadavg()}
                    run["init"] = run_child("init", root, pool, test, args)
                    run["cycle"] = {"steps": [], "labeled": None} if args.init_only else \
                        run_child("cycle", root, pool, test, args)
                    results["runs"].append(run)
                    by_size.setdefault(rows, []).append(run)
                    line = ", ".join(f"{s['step']} {s['seconds']:.1f}s/{s['peak_rss_mb']:.0f}MB"
                                     + (f" (driver CPU {s['driver_cpu_seconds']:.1f}s)" if s["step"] == "select" else "")
                                     for s in run["init"]["steps"] + run["cycle"]["steps"])
                    print(f"{store} {rows:>10,} rows #{repeat}: {line}; labeled {run['cycle']['labeled']}, "
                          f"load {run['load_average'][0]:.1f}", flush=True)
                    for t in run["cycle"].get("trains", []):
                        print(f"    {t['step']} {t['seconds']:.1f}s: labeled rows read {t['read']:.1f}s, "
                              f"epochs {t['epochs']:.1f}s, the rest of the training "
                              f"{t['training'] - t['read'] - t['epochs']:.1f}s, around it (pool, labels, test set) "
                              f"{t['seconds'] - t['training']:.1f}s", flush=True)
            for repeat in range(args.repeat):
                small, large = by_size[args.rows][repeat], by_size[10 * args.rows][repeat]
                ratio = {"storage": store, "repeat": repeat,
                         "init": large["init"]["steps"][-1]["peak_rss_mb"] / small["init"]["steps"][-1]["peak_rss_mb"],
                         "cycle": None if args.init_only else
                         large["cycle"]["steps"][-1]["peak_rss_mb"] / small["cycle"]["steps"][-1]["peak_rss_mb"]}
                if not args.init_only:
                    ratio["seconds"] = {step: seconds(large, step) / seconds(small, step)
                                        for step in ("train", "select", "final train", "whole cycle")}
                    ratio["seconds_n"] = {step: seconds(small, step) for step in ratio["seconds"]}
                    ratio["seconds_10n"] = {step: seconds(large, step) for step in ratio["seconds"]}
                results["ratios"].append(ratio)
                cycle = "not run" if ratio["cycle"] is None else f"{ratio['cycle']:.3f}"
                print(f"{store} #{repeat}: driver peak RSS 10N / N: init {ratio['init']:.3f}, "
                      f"whole cycle {cycle} (target <= 1.10)", flush=True)
                if not args.init_only:
                    print(f"{store} #{repeat}: wall time N / 10N / ratio: " + ", ".join(
                        f"{step} {ratio['seconds_n'][step]:.1f}s / {ratio['seconds_10n'][step]:.1f}s / {r:.2f}"
                        for step, r in ratio["seconds"].items())
                        + f" (targets: train ratio <= 1.2, whole cycle at 10N <= 150 s); load at the runs' starts "
                        f"{small['load_average'][0]:.1f} / {large['load_average'][0]:.1f}", flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
