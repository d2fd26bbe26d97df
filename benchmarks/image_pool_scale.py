"""Driver memory and wall time of scoring an image-file pool, for a prefix of N and of 10N images.

    python benchmarks/image_pool_scale.py [--images 20000] [--storage s3|local] [--folder-images 10000]

Two prefixes of 8x8 PNG files (``make_pool --source synthetic --format files``, 10,000
per folder, or ``--folder-images 0``: all in one folder) on a loopback S3 server (moto's
ThreadedMotoServer in this process, reached through the AWS environment like a real
endpoint), or ``--storage local`` in a temporary directory. For each, fresh driver
processes measure their own peak RSS (VmHWM in /proc/self/status; Ray's daemons and
object store are other processes):
- ``score``: ``describe_pool``, then ``score_pool`` on a local Ray (2 CPUs, 1 actor) with a
  small CNN checkpoint, k = 100: the listing is walked once on the driver and each
  read task lists its own range again;
- ``hold``: what keeping the listing would cost: ``list(storage.iter_files(prefix))``,
  the ``(uri, size)`` pairs the driver held before pools were described by ranges.
Prints wall times, peak RSS and the 10N / N ratios; writes benchmarks/out/image_pool_scale.json.
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

IMAGES_PER_FOLDER = 10_000
SHAPE = (3, 8, 8)


def child_score(pool: str, checkpoint: str, out: str) -> dict:
    from tidal_ray.data.pool import describe_pool
    from tidal_ray.score.pipeline import score_pool

    started = time.perf_counter()
    spec = describe_pool(pool)
    described = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "ranges": len(spec.ranges)}
    started = time.perf_counter()
    summary = score_pool(checkpoint, pool, 100, out, strategy="margin", progress=False)
    return {"describe": described, "score": {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
                                            "rows_read": summary["rows_read"], "rows_scored": summary["rows_scored"]}}


def child_hold(pool: str) -> dict:
    from tidal_ray.data import storage

    started = time.perf_counter()
    files = list(storage.iter_files(pool))
    return {"files": len(files), "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def run_child(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_checkpoint(path: str) -> str:
    import numpy as np

    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.data.make_pool import synthetic_rows
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    ids = np.arange(2000)
    x, labels = synthetic_rows(ids, SHAPE, 10, seed=1)
    config = TrainConfig(num_classes=10, input_shape=SHAPE, backbone="small_cnn", epochs=1, batch_size=64)
    _, _, session = train_in_process(config, ids, x, labels)
    return save_checkpoint(session.last_state, path).rsplit("/", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="N (the other prefix has 10N)")
    parser.add_argument("--storage", choices=["s3", "local"], default="s3")
    parser.add_argument("--folder-images", type=int, default=IMAGES_PER_FOLDER,
                        help="images per folder; 0: every image in one folder")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "image_pool_scale.json"))
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_score(*rest) if kind == "score" else child_hold(*rest)))
        return

    from tidal_ray.data.make_pool import make_pool

    results = {"machine": machine(),
               "settings": {"n": args.images, "shape": "x".join(map(str, SHAPE)), "k": 100, "backbone": "small_cnn",
                            "storage": args.storage, "folder_images": args.folder_images},
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="image-pool-scale-") as local:
        base = start_s3("image-pool-scale") if args.storage == "s3" else local
        checkpoint = train_checkpoint(os.path.join(local, "ck"))
        for images in (args.images, 10 * args.images):
            pool = f"{base}/pool-{images}"
            started = time.perf_counter()
            make_pool(pool, source="synthetic", rows=images, fmt="files", shape="x".join(map(str, SHAPE)),
                      shards=max(1, images // args.folder_images) if args.folder_images else 1)
            print(f"wrote {images:,} images in {time.perf_counter() - started:.0f}s", flush=True)
            run = {"images": images, "load_average": os.getloadavg(),
                   "score": run_child("score", pool, checkpoint, f"{base}/out-{images}"),
                   "hold": run_child("hold", pool)}
            results["runs"].append(run)
            s, h = run["score"], run["hold"]
            print(f"{images:>9,} images: describe {s['describe']['seconds']:.1f}s/{s['describe']['peak_rss_mb']:.0f}MB "
                  f"({s['describe']['ranges']} ranges), score {s['score']['seconds']:.1f}s/"
                  f"{s['score']['peak_rss_mb']:.0f}MB ({s['score']['rows_read']:,} read); "
                  f"holding the listing {h['peak_rss_mb']:.0f}MB, load {run['load_average'][0]:.1f}", flush=True)
    small, large = results["runs"]
    results["ratios"] = {name: large[kind][step]["peak_rss_mb"] / small[kind][step]["peak_rss_mb"]
                         for name, kind, step in (("describe", "score", "describe"), ("score", "score", "score"))}
    results["ratios"]["hold"] = large["hold"]["peak_rss_mb"] / small["hold"]["peak_rss_mb"]
    print("driver peak RSS 10N / N: " + ", ".join(f"{k} {v:.3f}" for k, v in results["ratios"].items()), flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
