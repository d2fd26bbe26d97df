"""``tidal-ray train`` and ``jobs/train.py``: the arguments, reading the labeled set,
and the call to ``train_on_ray``. Importing this module stays cheap (no torch, no Ray)."""
from __future__ import annotations

import argparse

DESCRIPTION = """Train the backbone and the TD module (CE + lambda * KL) on Ray Train workers
(DDP: gloo on CPU, nccl with --use-gpu). The labeled set is parquet with `id`, `label`
(0..C-1) and the sample's data (`pixels` or `features`). The run goes to OUT/NAME:
a checkpoint directory every --checkpoint-every epochs and after the last (model.pt, metrics.json; the last two kept) and
metrics.json. Rerunning with the same OUT and --name resumes that run."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labeled", required=True, metavar="URI", help="labeled set: a parquet file or prefix (local or s3://)")
    p.add_argument("--out", required=True, metavar="URI", help="where the run is stored (local dir or s3://bucket/prefix)")
    p.add_argument("--name", default="train", help="run name under OUT (default: train)")
    p.add_argument("--backbone", default="small_cnn", help="resnet18, small_cnn or mlp (default: small_cnn)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the TD-module KL loss (default: 1)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="C (default: the labeled set's tidal_ray.num_classes metadata, else the largest label + 1)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step over all workers (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="E",
                   help="checkpoint every E epochs and after the last (default: 10); a restarted worker group resumes from the latest")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts, each resuming from the last checkpoint")
    p.add_argument("--cpus-per-worker", type=float, default=0.5,
                   help="CPUs reserved per worker (default: 0.5, leaving room for data tasks)")
    p.add_argument("--fail-at-epoch", type=int, default=None, metavar="E",
                   help="TEST-ONLY fault injection: one worker raises once at epoch E (0-based)")


def load_labeled(uri: str):
    """``(ids, x, labels, input_shape)`` of a labeled set."""
    from . import storage
    from .pool import load_rows

    if not storage.exists(uri):
        raise ValueError(f"labeled set not found: {uri}")
    ids, x, labels, input_shape = load_rows(uri)
    if labels is None:
        raise ValueError(f"labeled set {uri} has no label column")
    if len(ids) == 0:
        raise ValueError(f"labeled set {uri} has no rows")
    return ids, x, labels, input_shape


def run(args: argparse.Namespace):
    from .train import TrainConfig, train_on_ray

    ids, x, y, input_shape = load_labeled(args.labeled)
    num_classes = args.num_classes
    if num_classes is None:  # a labeled set that lacks the top class would otherwise shrink C
        from .pool import describe_pool

        num_classes = describe_pool(args.labeled).num_classes or max(int(y.max()) + 1, 2)
    config = TrainConfig(num_classes=num_classes, input_shape=tuple(input_shape), backbone=args.backbone,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lam=args.lam,
                         seed=args.seed, fail_at_epoch=args.fail_at_epoch,
                         checkpoint_every=args.checkpoint_every)
    result = train_on_ray(config, ids, x, y, args.out, num_workers=args.workers, use_gpu=args.use_gpu,
                          max_failures=args.max_failures, name=args.name, cpus_per_worker=args.cpus_per_worker)
    last = result.metrics[-1]
    print(f"trained {last['epoch']} epochs on {len(ids)} labeled samples with {args.workers} workers: "
          f"loss {last['loss']:.4f}, train acc {last['train_accuracy']:.3f}")
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"metrics: {result.history_uri}")
    return result
