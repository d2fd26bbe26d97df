"""Training on Ray Train: ``RayTrainSession`` (the session ``train.run_training`` talks
to on each DDP worker) and ``train_on_ray``, which launches a ``TorchTrainer`` with the
labeled set as a Ray Dataset: read out of the pool on Ray tasks
(``labeled.labeled_rows``), or, for small in-memory sets, ``arrays_dataset``.

Test-only fault injection: with ``TIDAL_RAY_TEST_FAIL_AT_EPOCH=E`` in the driver's
environment, one worker raises once at the start of epoch E (see tests/README.md).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from tidal_ray.data import storage
from tidal_ray.train.checkpoint import load_checkpoint, save_checkpoint
from tidal_ray.errors import BadInput
from tidal_ray.train.config import TrainConfig, validate_labeled, validate_labels
from tidal_ray.train.loop import join_single_row_tail, run_training

FAIL_AT_EPOCH_ENV = "TIDAL_RAY_TEST_FAIL_AT_EPOCH"


def maybe_fail_for_test(fail_at_epoch: int | None, epoch: int, marker_dir: str | None) -> None:
    """Test-only fault injection: fail once at ``fail_at_epoch``.

    A marker file makes it fire once per run, so the restarted worker group goes on.
    ``marker_dir`` is a local path or an ``s3://`` URI that outlives the worker."""
    if fail_at_epoch is None or epoch != fail_at_epoch or marker_dir is None:
        return
    marker = storage.join(marker_dir, f"failed-at-epoch-{epoch}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"")
    raise RuntimeError(f"injected failure at epoch {epoch} ({FAIL_AT_EPOCH_ENV}, test-only)")


def _fail_at_epoch_for_test() -> int | None:
    value = os.environ.get(FAIL_AT_EPOCH_ENV)
    return int(value) if value else None


def _epoch_line(metrics: dict) -> str:
    return (f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f} (CE {metrics['ce']:.4f}, "
            f"KL {metrics['kl']:.4f}), train acc {metrics['train_accuracy']:.3f}, "
            f"{metrics['samples_per_s']:.0f} samples/s")


class RayTrainSession:
    """Runs ``run_training`` on one Ray Train worker (built inside the worker).

    Every worker sees the whole ``"train"`` dataset (rows ``{id, index, label, x}``, where
    ``index`` is the sample's row in the TD table, its position in ``ids``) and keeps its
    shard in memory: the indices a seeded permutation gives its rank, ordered by index.
    Each epoch it goes through them in a permutation seeded by (seed, epoch, rank). So
    shards and batches are a function of the seed and the ids, never of the order in
    which Ray Data's tasks deliver rows, and a seeded run repeats itself on CPU.
    ``batch_size`` is global (samples per optimiser step over all workers, as
    in-process); each worker takes its share of it.
    Rank 0 writes the checkpoint (``model.pt`` + ``metrics.json``, the history so far).

    ``fail_at_epoch`` (test-only) is armed on the last rank alone, so exactly one worker
    raises there, after a barrier: every rank's report of the epoch before is queued by
    then, so its checkpoint is the one the restart resumes from (without the barrier, the
    failure could beat rank 0's upload and the restart would go back one checkpoint more)."""

    def __init__(self, ids, batch_size: int, seed: int = 0, fail_at_epoch: int | None = None,
                 fault_marker_dir: str | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.ids = list(np.asarray(ids).tolist())
        self.num_samples = len(self.ids)
        self.device = ray.train.torch.get_device()
        self.batch_size = -(-batch_size // self.world_size)
        self.seed = seed
        self.shard: dict | None = None
        self.fail_at_epoch = fail_at_epoch
        self.fault_marker_dir = fault_marker_dir
        self.history: list[dict] = []
        self.resumed_from_epoch = 0

    def _load_shard(self) -> dict:
        import ray.train

        split = np.random.default_rng([self.seed, 11]).permutation(self.num_samples)
        mine = np.zeros(self.num_samples, bool)
        mine[split[self.rank::self.world_size]] = True
        parts = []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=1024, batch_format="numpy"):
            keep = mine[batch["index"]]
            parts.append({key: batch[key][keep] for key in ("x", "label", "index")})
        shard = {key: np.concatenate([part[key] for part in parts]) for key in ("x", "label", "index")}
        by_index = np.argsort(shard["index"], kind="stable")
        return {key: value[by_index] for key, value in shard.items()}

    def _shard_batches(self, epoch: int):
        if self.shard is None:
            self.shard = self._load_shard()
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.shard["index"]))
        chunks = ({key: value[order[i:i + self.batch_size]] for key, value in self.shard.items()}
                  for i in range(0, len(order), self.batch_size))
        return join_single_row_tail(chunks)

    def batches(self, epoch: int):
        if self.fail_at_epoch == epoch:
            if self.world_size > 1:
                dist.barrier()
            if self.rank == self.world_size - 1:
                maybe_fail_for_test(self.fail_at_epoch, epoch, self.fault_marker_dir)
        # Shards differ by at most one row, so the ranks' batch counts can differ by one.
        # Agreeing on "one more batch?" each step costs one tiny all-reduce and turns a
        # mismatch into a shorter epoch on one rank instead of a DDP hang.
        local = self._shard_batches(epoch)
        while True:
            batch = next(local, None)
            more = torch.tensor([batch is not None], dtype=torch.int32, device=self.device)
            if self.world_size > 1:
                dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                return
            yield (torch.from_numpy(np.array(batch["x"])),  # a writable copy
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
        # A directory of this worker's own: Checkpoint.as_directory() shares one per node,
        # and a second worker that takes its lock after the first's download downloads
        # again over the files the first is reading (an empty metrics.json, seen in CI).
        with tempfile.TemporaryDirectory() as directory:
            checkpoint.to_directory(directory)
            state = load_checkpoint(directory)
            self.history = storage.read_json(os.path.join(directory, "metrics.json"))
        if state["labeled_ids"] != self.ids:
            raise BadInput("the checkpoint to resume from was trained on a different labeled set; "
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
    session = RayTrainSession(loop_config["ids"], config.batch_size, config.seed, loop_config["fail_at_epoch"],
                              loop_config["fault_marker_dir"])
    run_training(config, session)


@dataclass
class TrainResult:
    checkpoint_uri: str  # directory holding model.pt (local path or s3://...)
    metrics: list[dict]  # one dict per epoch, over all attempts of the run
    history_uri: str  # metrics.json of the run
    run_uri: str  # Ray Train's directory for the run
    failures: int = 0     # restarts after a worker raised
    preemptions: int = 0  # restarts after a worker's process or node was lost


def _worker_lost(error: BaseException) -> bool:
    """Whether Ray says a worker was lost (its process or node died), not that it raised.
    Ray Train's controller hands over a dead worker's failed or hanging health check
    (``WorkerHealthCheckFailedError`` wrapping the ``RayActorError``, or
    ``WorkerHealthCheckTimeoutError``), not the ``RayActorError`` itself (seen with Ray
    2.60 when a node is removed: tests/test_cluster.py); the classes are Ray Train v2
    internals, so check them when Ray is upgraded."""
    import ray.exceptions
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    if isinstance(error, WorkerHealthCheckFailedError):
        error = error.health_check_failure
    return isinstance(error, (ray.exceptions.RayActorError, WorkerHealthCheckTimeoutError))


def _interruptions_counter(uri: str):
    """A Ray Train callback (it runs on the controller, its own process) that counts the
    worker group's interruptions into ``uri`` (JSON), told apart as Ray tells them: a
    worker whose actor died (``_worker_lost``: its process or node was lost, a preemption)
    against one that raised (the training code's error)."""
    from ray.train import UserCallback

    class InterruptionsCounter(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            lost = any(_worker_lost(e) for e in worker_exceptions.values())
            counts = storage.read_json(uri) if storage.exists(uri) else {"failures": 0, "preemptions": 0}
            counts["preemptions" if lost else "failures"] += 1
            storage.write_json(uri, counts)

    return InterruptionsCounter()


def arrays_dataset(ids: np.ndarray, x: np.ndarray, y: np.ndarray):
    """A small labeled set held in this process as a Ray Dataset of ``{id, index, label, x}``
    (``index``: the row's position in ``ids``). Whole-pool campaigns use
    ``labeled.labeled_rows`` instead, which never brings the rows to the driver."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({"id": pa.array(ids.tolist()), "index": np.arange(len(ids), dtype=np.int64),
                      "label": y, "x": ArrowTensorArray.from_numpy(np.ascontiguousarray(x))})
    return ray.data.from_arrow(table)


def train_arrays_on_ray(config: TrainConfig, ids, x, y, storage_uri: str, num_workers: int = 2, **kwargs) -> TrainResult:
    """``train_on_ray`` for a small labeled set held as arrays (``x`` uint8 pixels
    (N, C, H, W) or float32 features (N, D)); tests and benchmarks."""
    ids, x, y = validate_labeled(config, ids, x, y, num_workers)
    from tidal_ray.runtime import init_ray

    init_ray()
    return train_on_ray(config, ids, y, arrays_dataset(ids, x, y), storage_uri, num_workers=num_workers, **kwargs)


def train_on_ray(config: TrainConfig, ids, labels, dataset, storage_uri: str, num_workers: int = 2,
                 use_gpu: bool = False, max_failures: int = 0, name: str | None = None,
                 cpus_per_worker: float = 0.5) -> TrainResult:
    """Train on ``num_workers`` Ray Train workers (DDP: gloo on CPU, nccl with ``use_gpu``).

    ``dataset``: a Ray Dataset of ``{id, index, label, x}`` rows, where ``index`` is the
    row's position in ``ids`` (its TD-table row) and ``labels`` are aligned with ``ids``
    (checked here before anything starts). Each worker keeps its seeded shard of it
    (``RayTrainSession``). The run
    lives at ``storage_uri/name`` (local dir or ``s3://``); a checkpoint every
    ``config.checkpoint_every`` epochs and after the last (the last two kept),
    ``metrics.json`` beside them.
    Reusing ``name`` at the same place resumes that run (Ray Train restores from it).
    Workers take ``cpus_per_worker`` CPUs each (fractional, so data tasks keep a CPU on
    small machines). A worker that dies is restarted up to ``max_failures`` times and
    resumes from the last checkpoint, TD table included."""
    ids, labels = validate_labels(config, ids, labels, num_workers)
    if cpus_per_worker <= 0:
        raise BadInput(f"cpus per worker must be positive, got {cpus_per_worker}")
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tidal_ray.runtime import init_ray, ray_log_level

    init_ray()
    name = name or time.strftime("train-%Y%m%d-%H%M%S")
    run_uri = storage.join(storage_uri, name)
    interruptions_uri = storage.join(run_uri, "interruptions.json")
    fs, path = storage.resolve(storage_uri)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": asdict(config), "ids": ids, "fail_at_epoch": _fail_at_epoch_for_test(),
                           "fault_marker_dir": storage.join(run_uri, "fault-markers")},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=[_interruptions_counter(interruptions_uri)],
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level=ray_log_level())),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker takes its seeded shard itself
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training at {run_uri} finished without a checkpoint")
    checkpoint_uri = ("s3://" if storage.is_s3(storage_uri) else "") + result.checkpoint.path
    metrics = storage.read_json(storage.join(checkpoint_uri, "metrics.json"))
    history_uri = storage.join(run_uri, "metrics.json")
    storage.write_json(history_uri, metrics)
    counts = storage.read_json(interruptions_uri) if storage.exists(interruptions_uri) else {}
    return TrainResult(checkpoint_uri, metrics, history_uri, run_uri, counts.get("failures", 0),
                       counts.get("preemptions", 0))
