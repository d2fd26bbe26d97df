"""The training loop: cross-entropy plus lambda * KL(TD target || TD module), with TD collection.

``run_training`` is the one loop. It talks to its surroundings through a session:
``LocalSession`` runs it in this process (tests, benchmarks, the quality protocol);
the Ray Train session runs the same function on every DDP worker.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dynamics import TDTable
from .models import TiDALNet, build_model


@dataclass
class TrainConfig:
    num_classes: int
    input_shape: tuple[int, ...]
    backbone: str = "small_cnn"
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lam: float = 1.0
    seed: int = 0
    # Test-only: raise once at the start of this epoch (see ``maybe_fail_for_test``).
    fail_at_epoch: int | None = None
    extra: dict = field(default_factory=dict)


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    """Raw uint8 pixels become floats in [0, 1]; feature vectors pass through as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def train_step(model, table: TDTable, optimizer, x, y, index, lam: float) -> dict:
    """One optimisation step on CE + lam * KL(TD target || softmax(TD logits)); records TD."""
    logits, td_logits = model(prepare_input(x))
    ce = F.cross_entropy(logits, y)
    probs = logits.detach().softmax(dim=1)
    target = table.target(index, probs)
    kl = F.kl_div(td_logits.log_softmax(dim=1), target, reduction="batchmean")
    loss = ce + lam * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    table.record(index, probs)
    n = len(y)
    return {"loss": loss.item() * n, "ce": ce.item() * n, "kl": kl.item() * n,
            "correct": (logits.argmax(1) == y).sum().item(), "n": n}


def maybe_fail_for_test(config: TrainConfig, epoch: int, marker_dir: str | None) -> None:
    """Test-only fault injection: fail once at ``config.fail_at_epoch``.

    A marker file makes it fire once per run, so the restarted worker group goes on."""
    if config.fail_at_epoch is None or epoch != config.fail_at_epoch or marker_dir is None:
        return
    marker = os.path.join(marker_dir, f"failed-at-epoch-{epoch}")
    if os.path.exists(marker):
        return
    os.makedirs(marker_dir, exist_ok=True)
    open(marker, "w").close()
    raise RuntimeError(f"injected failure at epoch {epoch} (TrainConfig.fail_at_epoch, test-only)")


def _sum_across_ranks(totals: dict, device) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return totals
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def run_training(config: TrainConfig, session) -> tuple[TiDALNet, TDTable]:
    torch.manual_seed(config.seed)
    net = build_model(config.backbone, config.num_classes, tuple(config.input_shape))
    table = TDTable(session.num_samples, config.num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    start_epoch = 0
    resumed = session.restore()
    if resumed is not None:
        net.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        table = TDTable.from_state_dict(resumed["td_table"])
        start_epoch = int(resumed["epoch"])
    model = session.prepare(net)
    device = session.device
    table.to(device)

    for epoch in range(start_epoch, config.epochs):
        maybe_fail_for_test(config, epoch, session.fault_marker_dir)
        model.train()
        started = time.perf_counter()
        totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "correct": 0.0, "n": 0.0}
        for x, y, index in session.batches(epoch):
            step = train_step(model, table, optimizer, x.to(device), y.to(device), index.to(device), config.lam)
            for key in totals:
                totals[key] += step[key]
        table.end_epoch()
        scheduler.step()
        totals = _sum_across_ranks(totals, device)
        n = max(totals["n"], 1.0)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "loss": totals["loss"] / n, "ce": totals["ce"] / n,
                   "kl": totals["kl"] / n, "train_accuracy": totals["correct"] / n,
                   "samples_per_s": totals["n"] / max(seconds, 1e-9), "epoch_seconds": seconds}
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "td_table": table.state_dict(),
                 "epoch": epoch + 1, "config": asdict(config), "labeled_ids": session.ids}
        session.report(metrics, state)
    return net, table


class LocalSession:
    """Runs ``run_training`` in this process over in-memory arrays (one rank, no Ray)."""

    fault_marker_dir = None

    def __init__(self, ids, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                 device: str = "cpu", on_epoch=None):
        self.ids = list(np.asarray(ids).tolist())
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))
        self.batch_size, self.seed = batch_size, seed
        self.device = torch.device(device)
        self.num_samples = len(self.ids)
        self.history: list[dict] = []
        self.last_state: dict | None = None
        self.on_epoch = on_epoch

    def batches(self, epoch: int):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        # A trailing batch of one row would break BatchNorm; it joins the batch before it.
        bounds = list(range(0, self.num_samples, self.batch_size)) + [self.num_samples]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        for start, stop in zip(bounds, bounds[1:]):
            index = order[start:stop]
            yield self.x[index], self.y[index], index

    def prepare(self, net):
        return net.to(self.device)

    def restore(self):
        return None

    def report(self, metrics: dict, state: dict) -> None:
        self.history.append(metrics)
        self.last_state = state
        if self.on_epoch:
            self.on_epoch(metrics)


def train_in_process(config: TrainConfig, ids, x, y, device: str = "cpu", on_epoch=None):
    """Train on in-memory arrays; returns ``(net, table, session)`` (the session holds
    the per-epoch history and the last checkpoint state)."""
    session = LocalSession(ids, x, y, config.batch_size, config.seed, device, on_epoch)
    net, table = run_training(config, session)
    return net, table, session
