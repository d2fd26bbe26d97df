"""The training loop: cross-entropy plus lambda * KL(TD target || TD module), with TD collection.

``run_training`` is the one loop, plain PyTorch, read top to bottom. It talks to its
surroundings through a session: ``LocalSession`` (here) runs it in this process over
in-memory arrays (tests, benchmarks, the quality protocol, ``--trainer local``);
``train_ray.RayTrainSession`` runs the same function on every DDP worker of a Ray Train
``TorchTrainer``. A session gives ``batches(epoch)``, ``prepare(net)``, ``restore()``,
``report(metrics, state)``, ``device``, ``ids`` and ``num_samples``.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tidal_ray.data.decode import augment_batch
from tidal_ray.method.dynamics import TDTable
from tidal_ray.models import TiDALNet, build_model, prepare_input
from tidal_ray.models.spec import apply_weights
from tidal_ray.train.checkpoint import load_checkpoint, read_weights
from tidal_ray.train.config import TrainConfig


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


def join_single_row_tail(batches):
    """Pass dict batches through, except that a trailing batch of one row joins the
    batch before it: BatchNorm cannot train on a single row."""
    held = None
    for batch in batches:
        if held is not None and len(next(iter(batch.values()))) == 1:
            batch = {key: np.concatenate([held[key], batch[key]]) for key in batch}
        elif held is not None:
            yield held
        held = batch
    if held is not None:
        yield held


def _sum_across_ranks(totals: dict, device) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return totals
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def build_for_training(config: TrainConfig) -> TiDALNet:
    """The network of the config, started from ``config.init_checkpoint`` (warm start: the
    whole network, backbone and TD module) or else ``config.weights`` (the backbone) when given."""
    net = build_model(config.backbone, config.num_classes, tuple(config.input_shape), config.feature_layers,
                      config.normalize)
    if config.init_checkpoint:
        net.load_state_dict(load_checkpoint(config.init_checkpoint)["model"])
    elif config.weights:
        apply_weights(net.backbone, read_weights(config.weights), config.num_classes, config.weights)
    return net


def make_optimizer(config: TrainConfig, net):
    """The optimizer and its per-epoch schedule: Adam or SGD (momentum 0.9), with cosine
    decay, or a x0.1 step at ``lr_drop_at`` of the epochs (the reference code's 80%)."""
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.lr_drop_at is None:
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    drop = max(1, round(config.lr_drop_at * config.epochs))
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[drop], gamma=0.1)


def run_training(config: TrainConfig, session) -> tuple[TiDALNet, TDTable]:
    torch.manual_seed(config.seed)
    net = build_for_training(config)
    table = TDTable(session.num_samples, config.num_classes)
    start_epoch = 0
    resumed = session.restore()
    if resumed is not None:
        net.load_state_dict(resumed["model"])
        table = TDTable.from_state_dict(resumed["td_table"])
        start_epoch = int(resumed["epoch"])
    model = session.prepare(net)
    device = session.device
    table.to(device)
    # Built and restored only now that the network is on its device: load_state_dict puts
    # Adam's moments beside their parameters, so a resume on a GPU steps on the GPU.
    optimizer, scheduler = make_optimizer(config, net)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    rank = getattr(session, "rank", 0)

    for epoch in range(start_epoch, config.epochs):
        model.train()
        # Random state set by (seed, epoch, rank), not carried over from earlier epochs, so
        # a run resumed at this epoch draws what an uninterrupted run draws.
        torch.manual_seed(config.seed * 100_003 + epoch)
        augment_rng = np.random.default_rng([config.seed, 7, epoch, rank]) if config.augment else None
        started = time.perf_counter()
        totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "correct": 0.0, "n": 0.0}
        for x, y, index in session.batches(epoch):
            if augment_rng is not None:
                x = torch.from_numpy(augment_batch(x.numpy(), augment_rng))
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
        state = None
        if (epoch + 1) % max(config.checkpoint_every, 1) == 0 or epoch + 1 == config.epochs:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "td_table": table.state_dict(),
                     "epoch": epoch + 1, "config": asdict(config), "labeled_ids": session.ids}
        session.report(metrics, state)
    return net, table


class LocalSession:
    """Runs ``run_training`` in this process over in-memory arrays (one rank, no Ray)."""

    def __init__(self, ids, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                 device: str = "cpu", on_epoch=None, resume: dict | None = None):
        self.ids = list(np.asarray(ids).tolist())
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))
        self.batch_size, self.seed = batch_size, seed
        self.device = torch.device(device)
        self.num_samples = len(self.ids)
        self.history: list[dict] = []
        self.last_state: dict | None = None
        self.on_epoch = on_epoch
        self.resume = resume  # a checkpoint state to resume from (as torch.load gives it)

    def batches(self, epoch: int):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        chunks = ({"index": chunk.numpy()} for chunk in order.split(self.batch_size))
        for chunk in join_single_row_tail(chunks):
            index = torch.from_numpy(chunk["index"])
            yield self.x[index], self.y[index], index

    def prepare(self, net):
        return net.to(self.device)

    def restore(self):
        return self.resume

    def report(self, metrics: dict, state: dict | None) -> None:
        self.history.append(metrics)
        if state is not None:
            self.last_state = state
        if self.on_epoch:
            self.on_epoch(metrics)


def train_in_process(config: TrainConfig, ids, x, y, device: str = "cpu", on_epoch=None, resume: dict | None = None):
    """Train on in-memory arrays; returns ``(net, table, session)`` (the session holds
    the per-epoch history and the last checkpoint state). ``resume``: a checkpoint state
    to go on from (its epoch onwards)."""
    session = LocalSession(ids, x, y, config.batch_size, config.seed, device, on_epoch, resume)
    net, table = run_training(config, session)
    return net, table, session
