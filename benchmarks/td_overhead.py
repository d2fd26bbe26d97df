"""Epoch time of TiDAL training (TD table + TD module, CE + lambda * KL) vs plain
cross-entropy training of the same backbone, same data, optimiser and threads.

    python benchmarks/td_overhead.py [--samples 512] [--epochs 3] [--batch-size 64]

TiDAL epochs run the real step (``tidal_ray.train.loop.train_step``); plain epochs run the
backbone alone with ``F.cross_entropy``. The two alternate epoch by epoch so that
background load hits both alike; one warm-up epoch each is not counted. Prints both
median epoch times and their ratio; writes benchmarks/out/td_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, write_results  # noqa: E402  (this folder is on sys.path)
from tidal_ray.method.dynamics import TDTable  # noqa: E402
from tidal_ray.models import build_backbone, build_model, prepare_input  # noqa: E402
from tidal_ray.train.loop import train_step  # noqa: E402

SHAPE, CLASSES = (3, 32, 32), 10


def batches(n: int, batch_size: int, epoch: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def tidal_epoch(net, table, optimizer, x, y, batch_size, epoch) -> float:
    started = time.perf_counter()
    net.train()
    for index in batches(len(y), batch_size, epoch):
        train_step(net, table, optimizer, x[index], y[index], index, lam=1.0)
    table.end_epoch()
    return time.perf_counter() - started


def plain_epoch(backbone, optimizer, x, y, batch_size, epoch) -> float:
    started = time.perf_counter()
    backbone.train()
    for index in batches(len(y), batch_size, epoch):
        logits, _ = backbone(prepare_input(x[index]))
        loss = F.cross_entropy(logits, y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # train_step reads its losses back too
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per variant (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "td_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(args.samples, *SHAPE), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, CLASSES, size=args.samples))
    torch.manual_seed(0)
    net = build_model("resnet18", CLASSES, SHAPE)
    table = TDTable(args.samples, CLASSES)
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", CLASSES, SHAPE)
    # The same optimiser and settings as run_training.
    tidal_opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    plain_opt = torch.optim.Adam(backbone.parameters(), lr=1e-3, weight_decay=5e-4)

    tidal, plain = [], []
    for epoch in range(args.epochs + 1):
        tidal.append(tidal_epoch(net, table, tidal_opt, x, y, args.batch_size, epoch))
        plain.append(plain_epoch(backbone, plain_opt, x, y, args.batch_size, epoch))
        print(f"epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: tidal {tidal[-1]:.2f}s, plain {plain[-1]:.2f}s",
              flush=True)
    tidal_s, plain_s = statistics.median(tidal[1:]), statistics.median(plain[1:])
    result = {
        "benchmark": "td_overhead",
        "machine": machine(torch_threads=args.threads, torch=torch.__version__, device="cpu"),
        "model": "resnet18 (CIFAR-style) + TD module", "input": list(SHAPE), "samples": args.samples,
        "batch_size": args.batch_size, "measured_epochs": args.epochs,
        "tidal_epoch_s": tidal_s, "plain_epoch_s": plain_s, "ratio": tidal_s / plain_s, "target_ratio": 1.15,
        "tidal_epochs_s": tidal, "plain_epochs_s": plain,
    }
    print(f"median epoch: tidal {tidal_s:.2f}s, plain CE {plain_s:.2f}s, ratio {tidal_s / plain_s:.3f} "
          f"(target <= 1.15; {args.samples} samples, batch {args.batch_size}, {args.threads} threads)")
    write_results(result, args.out)


if __name__ == "__main__":
    main()
