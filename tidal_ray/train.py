"""The training loop: cross-entropy plus lambda * KL(TD target || TD module), with TD collection.

``run_training`` is the one loop. It talks to its surroundings through a session:
``LocalSession`` runs it in this process (tests, benchmarks, the quality protocol);
``RayTrainSession`` runs the same function on every DDP worker of a Ray Train
``TorchTrainer`` (``train_on_ray`` launches it).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import storage
from .checkpoint import load_checkpoint, save_checkpoint
from .dynamics import TDTable, index_ids
from .models import TiDALNet, build_backbone, build_model


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
    # A checkpoint every this many epochs, and always after the last. Under Ray Train each
    # one is persisted to storage (about a second even for a small model), so not every epoch.
    checkpoint_every: int = 10
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

    A marker file makes it fire once per run, so the restarted worker group goes on.
    ``marker_dir`` is a local path or an ``s3://`` URI that outlives the worker."""
    if config.fail_at_epoch is None or epoch != config.fail_at_epoch or marker_dir is None:
        return
    marker = storage.join(marker_dir, f"failed-at-epoch-{epoch}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"")
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
        state = None
        if (epoch + 1) % max(config.checkpoint_every, 1) == 0 or epoch + 1 == config.epochs:
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

    def report(self, metrics: dict, state: dict | None) -> None:
        self.history.append(metrics)
        if state is not None:
            self.last_state = state
        if self.on_epoch:
            self.on_epoch(metrics)


def train_in_process(config: TrainConfig, ids, x, y, device: str = "cpu", on_epoch=None):
    """Train on in-memory arrays; returns ``(net, table, session)`` (the session holds
    the per-epoch history and the last checkpoint state)."""
    session = LocalSession(ids, x, y, config.batch_size, config.seed, device, on_epoch)
    net, table = run_training(config, session)
    return net, table, session


def validate_labeled(config: TrainConfig, ids, x, y, num_workers: int = 1):
    """Check a labeled set against the config before anything starts; returns
    ``(ids, x, y)`` as arrays. Raises ValueError with a one-line message."""
    if ids is None or x is None or y is None or len(ids) == 0:
        raise ValueError("the labeled set is missing or empty")
    ids, x, y = np.asarray(ids), np.asarray(x), np.asarray(y)
    if not len(ids) == len(x) == len(y):
        raise ValueError(f"the labeled set has {len(ids)} ids, {len(x)} inputs and {len(y)} labels; they must match")
    if x.dtype not in (np.uint8, np.float32):
        raise ValueError(f"inputs must be uint8 pixels or float32 features, got {x.dtype}")
    if tuple(x.shape[1:]) != tuple(config.input_shape):
        raise ValueError(f"inputs have shape {tuple(x.shape[1:])} per sample, expected {tuple(config.input_shape)}")
    if x.dtype == np.float32 and not np.isfinite(x).all():
        raise ValueError("the labeled features contain NaN or inf")
    build_backbone(config.backbone, config.num_classes, config.input_shape)  # unknown name, shape it can't take
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} with shape {y.shape}")
    bad = (y < 0) | (y >= config.num_classes)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} labels are outside 0..{config.num_classes - 1} "
                         f"(e.g. label {y[bad][0]} for id {ids[bad][0]})")
    index_ids(ids)  # duplicate ids
    if num_workers < 1:
        raise ValueError(f"workers must be at least 1, got {num_workers}")
    # Every worker trains on a shard; BatchNorm needs at least two rows in it.
    if len(ids) < 2 * num_workers:
        raise ValueError(f"{len(ids)} labeled samples are too few for {num_workers} workers (need 2 per worker)")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch size must be positive, got {config.epochs} and {config.batch_size}")
    return ids, x, y.astype(np.int64)


def _epoch_line(metrics: dict) -> str:
    return (f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f} (CE {metrics['ce']:.4f}, "
            f"KL {metrics['kl']:.4f}), train acc {metrics['train_accuracy']:.3f}, "
            f"{metrics['samples_per_s']:.0f} samples/s")


class RayTrainSession:
    """Runs ``run_training`` on one Ray Train worker (built inside the worker).

    The labeled set arrives as this worker's shard of the ``"train"`` dataset, rows
    ``{id, index, label, x}`` where ``index`` is the sample's row in the TD table
    (its position in ``ids``). ``batch_size`` is global (samples per optimiser step
    over all workers, as in-process); each worker takes its share of it.
    Rank 0 writes the checkpoint (``model.pt`` + ``metrics.json``, the history so far).

    ``fault_marker_dir`` (test-only) is given to the last rank alone, so exactly one
    worker raises at ``TrainConfig.fail_at_epoch``."""

    def __init__(self, ids, batch_size: int, fault_marker_dir: str | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.ids = list(np.asarray(ids).tolist())
        self.num_samples = len(self.ids)
        self.device = ray.train.torch.get_device()
        self.batch_size = -(-batch_size // self.world_size)
        self.fault_marker_dir = fault_marker_dir if self.rank == self.world_size - 1 else None
        self.history: list[dict] = []
        self.resumed_from_epoch = 0

    def _shard_batches(self):
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        held = None
        for batch in shard.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            # A trailing batch of one row would break BatchNorm; it joins the batch before it.
            if held is not None and len(batch["index"]) == 1:
                batch = {key: np.concatenate([held[key], batch[key]]) for key in ("x", "label", "index")}
            elif held is not None:
                yield held
            held = batch
        if held is not None:
            yield held

    def batches(self, epoch: int):
        # Ray's split (equal=True) gives every rank the same number of rows, hence of
        # batches. Agreeing on "one more batch?" each step costs one tiny all-reduce and
        # turns any mismatch into a shorter epoch on one rank instead of a DDP hang.
        local = self._shard_batches()
        while True:
            batch = next(local, None)
            more = torch.tensor([batch is not None], dtype=torch.int32, device=self.device)
            if self.world_size > 1:
                dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                for _ in local:  # finish this epoch's stream so the next epoch can start
                    pass
                return
            yield (torch.from_numpy(np.array(batch["x"])),  # a writable copy of Arrow's buffer
                   torch.from_numpy(batch["label"].astype(np.int64)),
                   torch.from_numpy(batch["index"].astype(np.int64)))

    def prepare(self, net):
        import ray.train.torch

        return ray.train.torch.prepare_model(net)  # moves to the device; DDP when world_size > 1

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
            self.history = storage.read_json(os.path.join(directory, "metrics.json"))
        if state["labeled_ids"] != self.ids:
            raise ValueError("the checkpoint to resume from was trained on a different labeled set; "
                             "use a new run name or output location")
        self.resumed_from_epoch = int(state["epoch"])
        return state

    def report(self, metrics: dict, state: dict | None) -> None:
        import ray.train

        metrics = {**metrics, "resumed_from_epoch": self.resumed_from_epoch}
        self.history.append(metrics)
        if self.rank == 0:
            # Not print(): Ray Train's print patch would show the line twice on the driver.
            sys.stdout.write(_epoch_line(metrics) + "\n")
            sys.stdout.flush()
        if state is None:
            # ray.train.report blocks until the controller's next poll (about 2 s in 2.60),
            # so results go to Ray Train with the checkpoints, not every epoch; the history
            # of every epoch travels inside each checkpoint (metrics.json).
            return
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(state, directory)
            storage.write_json(os.path.join(directory, "metrics.json"), self.history)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}")


def _train_worker(loop_config: dict) -> None:
    config = TrainConfig(**loop_config["config"])
    session = RayTrainSession(loop_config["ids"], config.batch_size, loop_config["fault_marker_dir"])
    run_training(config, session)


@dataclass
class TrainResult:
    checkpoint_uri: str  # directory holding model.pt (local path or s3://...)
    metrics: list[dict]  # one dict per epoch, over all attempts of the run
    history_uri: str  # metrics.json of the run
    run_uri: str  # Ray Train's directory for the run


def _labeled_dataset(ids: np.ndarray, x: np.ndarray, y: np.ndarray):
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({"id": pa.array(ids.tolist()), "index": np.arange(len(ids), dtype=np.int64),
                      "label": y, "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x))})
    return ray.data.from_arrow(table)


def train_on_ray(config: TrainConfig, ids, x, y, storage_uri: str, num_workers: int = 2,
                 use_gpu: bool = False, max_failures: int = 0, name: str | None = None,
                 cpus_per_worker: float = 0.5) -> TrainResult:
    """Train on ``num_workers`` Ray Train workers (DDP: gloo on CPU, nccl with ``use_gpu``).

    ``ids``/``x``/``y``: the labeled set as arrays (``x`` uint8 pixels (N, C, H, W) or
    float32 features (N, D)). The run lives at ``storage_uri/name`` (local dir or
    ``s3://``); a checkpoint per epoch (the last two kept), ``metrics.json`` beside them.
    Reusing ``name`` at the same place resumes that run (Ray Train restores from it).
    Workers take ``cpus_per_worker`` CPUs each (fractional, so data tasks keep a CPU on
    small machines). A worker that dies is restarted up to ``max_failures`` times and
    resumes from the last checkpoint, TD table included.

    ``config.fail_at_epoch`` is test-only: one worker raises once at that epoch (a
    marker under the run directory makes it fire once)."""
    ids, x, y = validate_labeled(config, ids, x, y, num_workers)
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus per worker must be positive, got {cpus_per_worker}")
    import ray
    from ray.data import RandomSeedConfig
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    name = name or time.strftime("train-%Y%m%d-%H%M%S")
    run_uri = storage.join(storage_uri, name)
    fs, path = storage.resolve(storage_uri)
    # A new shuffle every epoch (reseeded per execution), reproducible from the seed; it also
    # moves the <num_workers rows that the equal split leaves out to other samples each epoch.
    dataset = _labeled_dataset(ids, x, y).random_shuffle(
        seed=RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": asdict(config), "ids": ids,
                           "fault_marker_dir": storage.join(run_uri, "fault-markers")},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training at {run_uri} finished without a checkpoint")
    checkpoint_uri = ("s3://" if storage.is_s3(storage_uri) else "") + result.checkpoint.path
    metrics = storage.read_json(storage.join(checkpoint_uri, "metrics.json"))
    history_uri = storage.join(run_uri, "metrics.json")
    storage.write_json(history_uri, metrics)
    return TrainResult(checkpoint_uri, metrics, history_uri, run_uri)
