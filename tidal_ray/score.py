"""Scoring a whole pool: the batch scorer and the Ray Data pipeline around it.

    read (Ray Data) -> decode (CPU tasks) -> BatchScorer (actor pool, a GPU each if any)
      -> iter_batches to the driver -> duplicates, exclusions, exact streaming top-k

``score_pool`` runs that pipeline; with ``use_ray=False`` the same decode functions and
the same ``BatchScorer`` run in this process (tests, benchmarks, small pools).
Importing this module stays cheap (no torch, no Ray) so the CLI starts fast.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import storage
from .pool import (DUPLICATE_ID, NULL_ID, PoolSpec, check_compatible, decode_batch, describe_pool,
                   format_shape, input_dtype, iter_tables, reason_kind, stream_batch)
from .topk import StreamingTopK, is_member
from .uncertainty import STRATEGIES, check_strategy

BALD_SAMPLES = 20            # MC-dropout passes when bald is scored
# CPUs per scorer actor on CPU-only clusters: the largest step that leaves the read
# tasks room (DESIGN §5). None equals DECODE_CPUS: Ray Data fuses map stages with equal
# resources, which would move decoding into the actors.
ACTOR_CPU_STEPS = (0.5, 0.2, 0.1, 0.05)
DECODE_CPUS = 0.25
BLOCK_BATCHES = 8            # rows per block = this many scorer batches
PROGRESS_SECONDS = 5.0
SCORES_ROWS_PER_PART = 1_000_000
NONFINITE_SCORE = "non-finite score"


class BatchScorer:
    """Maps a batch ``{"id", "x"}`` to ids, predicted class and every strategy's score.
    The same class runs in-process and as a Ray Data actor.

    Pipeline batches also carry ``reason`` (rows already rejected: "" = good) and
    ``file``; rejected rows pass through with NaN scores and class -1. With ``pad_to``,
    every forward pass sees exactly that many rows (the tail padded with zeros): CPU
    kernels pick different code paths for different batch sizes, and the padding keeps a
    row's score bit-identical however the pipeline happened to batch it."""

    def __init__(self, checkpoint_uri: str, seed: int = 0, mc_samples: int = 0, device: str | None = None,
                 *, strategies=None, pad_to: int | None = None, num_threads: int | None = None):
        import torch

        from .checkpoint import load_checkpoint, model_from_checkpoint

        if num_threads:
            torch.set_num_threads(int(num_threads))
        state = load_checkpoint(checkpoint_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = model_from_checkpoint(state).to(self.device)
        self.input_shape = tuple(state["config"]["input_shape"])
        self.num_classes = int(state["config"]["num_classes"])
        self.seed, self.mc_samples = seed, mc_samples
        self.strategies = None if strategies is None else tuple(strategies)
        self.pad_to = pad_to

    def _forward(self, x: np.ndarray):
        import torch

        from .train import prepare_input

        step = self.pad_to or max(len(x), 1)
        logits, td_logits, mc = [], [], []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)])
            # A writable copy: Ray Data hands out read-only views of its blocks.
            raw = torch.from_numpy(np.array(chunk)).to(self.device, non_blocking=True)
            out = self.net.predict(prepare_input(raw), self.mc_samples)
            logits.append(out[0][:n].float().cpu().numpy())
            td_logits.append(out[1][:n].float().cpu().numpy())
            if out[2] is not None:
                mc.append(out[2][:, :n].float().cpu().numpy())
        return np.concatenate(logits), np.concatenate(td_logits), (np.concatenate(mc, axis=1) if mc else None)

    def _names(self) -> tuple[str, ...]:
        if self.strategies is not None:
            return self.strategies
        return tuple(s for s in STRATEGIES if s != "bald" or self.mc_samples > 0)

    def __call__(self, batch: dict) -> dict:
        from .uncertainty import score_all

        ids = np.asarray(batch["id"])
        x = np.asarray(batch["x"])
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"batch rows have shape {tuple(x.shape[1:])}, the checkpoint expects {self.input_shape}")
        good = np.ones(len(ids), dtype=bool) if "reason" not in batch else (np.asarray(batch["reason"]) == "")
        out = {"id": ids, **{k: np.asarray(batch[k]) for k in ("file", "reason") if k in batch}}
        predicted = np.full(len(ids), -1, dtype=np.int64)
        columns = {name: np.full(len(ids), np.nan) for name in self._names()}
        if good.any():
            logits, td_logits, mc = self._forward(x[good] if not good.all() else x)
            scores = score_all(logits, td_logits, ids[good], self.seed, mc)
            predicted[good] = scores["predicted_class"]
            for name in columns:
                columns[name][good] = scores[name]
        return {**out, "predicted_class": predicted, **columns}


# ---- checks before any work ----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    checkpoint_uri: str
    spec: PoolSpec
    input_shape: tuple[int, ...]
    num_classes: int
    k: int
    strategy: str
    exclude: np.ndarray          # sorted unique ids, in the pool's id type
    per_class_quota: bool
    save_scores: bool
    batch_size: int
    actors: tuple[int, int]
    seed: int
    mc_samples: int

    @property
    def strategies(self) -> tuple[str, ...]:
        """Columns the scorer returns: every strategy for --save-scores, else the one."""
        return STRATEGIES if self.save_scores else (self.strategy,)


def _id_values(arr, id_type: pa.DataType, where: str) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    try:
        return arr.cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ValueError(f"{where}: ids are {arr.type} and do not match the pool's {id_type} ids") from None


def read_exclude_ids(uris, id_type: pa.DataType) -> list[pa.Array]:
    """Ids from parquet/csv files (or prefixes of them) with an ``id`` column."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    found = []
    for uri in uris:
        try:
            files = storage.list_files(uri)
        except (FileNotFoundError, OSError):
            files = []
        if not files:
            raise ValueError(f"--exclude {uri}: nothing there")
        for f, _ in files:
            fs, path = storage.resolve(f)
            if f.endswith(".parquet"):
                with fs.open_input_file(path) as handle:
                    schema = pq.read_schema(handle)
                    if "id" not in schema.names:
                        raise ValueError(f"{f}: an exclude file needs an 'id' column")
                    handle.seek(0)
                    column = pq.read_table(handle, columns=["id"]).column("id")
            elif f.endswith(".csv"):
                options = pacsv.ConvertOptions(column_types={"id": id_type}, include_columns=["id"])
                try:
                    with fs.open_input_stream(path) as handle:
                        column = pacsv.read_csv(handle, convert_options=options).column("id")
                except (pa.ArrowInvalid, KeyError) as e:
                    raise ValueError(f"{f}: not a CSV with an 'id' column of the pool's id type "
                                     f"({str(e).splitlines()[0]})") from None
            else:
                raise ValueError(f"{f}: exclude files must be parquet or csv with an 'id' column")
            found.append(_id_values(column, id_type, f).drop_null())
    return found


def _sorted_ids(arrays: list[pa.Array], id_type: pa.DataType) -> np.ndarray:
    if not arrays:
        return np.array([], dtype=str if id_type == pa.string() else np.int64)
    ids = pa.concat_arrays([a.cast(id_type) for a in arrays])
    values = ids.to_numpy(zero_copy_only=False)
    return np.unique(values.astype(str) if id_type == pa.string() else values.astype(np.int64))


def _check_actors(actors) -> tuple[int, int]:
    try:
        low, high = (int(a) for a in actors)
    except (TypeError, ValueError):
        raise ValueError(f"actors must be (MIN, MAX), got {actors!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"actors needs 1 <= MIN <= MAX, got {low},{high}")
    return low, high


def plan_scoring(checkpoint_uri, pool_uri, k, strategy="tidal-entropy", exclude_uris=(), exclude_ids=None,
                 per_class_quota=False, save_scores=False, batch_size=256, actors=(1, 1), seed=0) -> Plan:
    """Every check that can fail on bad input, before any work starts."""
    from .checkpoint import load_checkpoint

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    check_strategy(strategy)
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    actors = _check_actors(actors)
    try:
        state = load_checkpoint(checkpoint_uri)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {checkpoint_uri}") from None
    input_shape = tuple(int(d) for d in state["config"]["input_shape"])
    num_classes = int(state["config"]["num_classes"])
    spec = describe_pool(pool_uri)
    check_compatible(spec, input_shape, num_classes, checkpoint_uri)
    excluded = read_exclude_ids(exclude_uris, spec.id_type)
    if exclude_ids is not None and len(exclude_ids):
        try:
            values = [str(v) for v in exclude_ids] if spec.id_type == pa.string() else [int(v) for v in exclude_ids]
        except (TypeError, ValueError):
            raise ValueError(f"exclude_ids do not match the pool's {spec.id_type} ids") from None
        excluded.append(pa.array(values, spec.id_type))
    bald = strategy == "bald" or save_scores
    return Plan(checkpoint_uri, spec, input_shape, num_classes, int(k), strategy,
                _sorted_ids(excluded, spec.id_type), bool(per_class_quota), bool(save_scores), int(batch_size),
                actors, int(seed), BALD_SAMPLES if bald else 0)


# ---- the per-batch work, shared by both paths ---------------------------------------------


def decode_for_scoring(batch, spec: PoolSpec, input_shape, file_index: dict[str, int]) -> dict:
    """Decode one read batch into the scorer's input: good rows and rejects in one batch."""
    good, rejects = decode_batch(batch, spec, input_shape, file_index)
    return stream_batch(good, rejects, input_shape, input_dtype(spec))


def _scorer_kwargs(plan: Plan, **extra) -> dict:
    return {"checkpoint_uri": plan.checkpoint_uri, "seed": plan.seed, "mc_samples": plan.mc_samples,
            "strategies": plan.strategies, "pad_to": plan.batch_size, **extra}


def _read_columns(spec: PoolSpec) -> list[str] | None:
    return None if spec.format == "files" else ["id", spec.column]


def score_batches_in_process(plan: Plan):
    """The pipeline in this process: read, decode, score, batch by batch."""
    scorer = BatchScorer(**_scorer_kwargs(plan))
    spec, file_index = plan.spec.slim(), plan.spec.file_index()
    for table in iter_tables(plan.spec, _read_columns(plan.spec), batch_rows=plan.batch_size):
        yield scorer(decode_for_scoring(table, spec, plan.input_shape, file_index))


def _row_bytes(plan: Plan) -> int:
    itemsize = 4 if plan.spec.format == "features" else 1
    return int(np.prod(plan.input_shape)) * itemsize + 64  # + id, file, reason


def _cluster_shape(ray) -> tuple[float, float]:
    """(GPUs in the cluster, CPUs of the largest node)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=1.0)
    return ray.cluster_resources().get("GPU", 0.0), node_cpus


def score_batches_on_ray(plan: Plan, use_gpu: bool | None = None):
    """The pipeline on Ray Data; yields the scorer's output batches in pool order."""
    import ray
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # joins the cluster named by RAY_ADDRESS, else starts one
    gpus, node_cpus = _cluster_shape(ray)
    use_gpu = gpus >= 1 if use_gpu is None else use_gpu
    low, high = plan.actors
    spec = plan.spec
    filesystem = storage.s3_filesystem() if storage.is_s3(spec.uri) else None
    if use_gpu:
        actor_resources = {"num_gpus": 1, "num_cpus": 1}
        scorer = _scorer_kwargs(plan, device="cuda")
    else:
        # Fractional CPUs, so actors never take every CPU from the read tasks (DESIGN §5
        # saw a 2-CPU Ray hang at 0 rows with two 1-CPU actors); torch still gets the
        # node's cores through its own thread count.
        fits = [c for c in ACTOR_CPU_STEPS if c * high <= node_cpus - DECODE_CPUS]
        actor_resources = {"num_cpus": fits[0] if fits else ACTOR_CPU_STEPS[-1]}
        scorer = _scorer_kwargs(plan, device="cpu", num_threads=max(1, int(node_cpus // high)))

    if spec.format == "files":
        ds = ray.data.read_binary_files(spec.fs_paths(), include_paths=True, filesystem=filesystem,
                                        num_cpus=DECODE_CPUS)
    else:
        # Ray Data 2.60's default parquet path adds a ListFiles task that asks for a whole
        # CPU whatever num_cpus says; on a 1-CPU node with the scorer actor placed it never
        # runs and the job hangs at 0 rows. The previous read path honours num_cpus.
        context = ray.data.DataContext.get_current()
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(spec.fs_paths(), filesystem=filesystem, include_paths=True,
                                       partitioning=None, num_cpus=DECODE_CPUS)
        finally:
            context.use_datasource_v2 = v2
        ds = ds.select_columns(["id", spec.column, "path"])  # pushed into the read: `label` is never read
    ds = ds.map_batches(decode_for_scoring, batch_format="pyarrow", batch_size=None, num_cpus=DECODE_CPUS,
                        fn_kwargs={"spec": spec.slim(), "input_shape": plan.input_shape,
                                   "file_index": spec.file_index()})
    ds = ds.map_batches(BatchScorer, fn_constructor_kwargs=scorer, batch_size=plan.batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(min_size=low, max_size=high),
                        **actor_resources)
    # Blocks of a few thousand rows rather than one per file: the actors pipeline with
    # the reads and results reach the driver (and the progress line) as they are made.
    ds.context.target_max_block_size = BLOCK_BATCHES * plan.batch_size * _row_bytes(plan)
    # Pool order at the driver makes "the first of duplicate ids wins" exact and repeatable.
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False  # our own progress line instead
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# ---- the driver's reduction ---------------------------------------------------------------


class SeenIds:
    """Every id seen so far, to reject duplicates exactly across shards.

    The one structure on the driver that grows with the pool. Dense non-negative integer
    ids (the usual 0..N-1) cost one bit per id value: a bitmap, grown while it stays
    under a byte per id seen. Other ids go to sorted runs of fixed-width keys, 8 bytes
    per integer id and 16 per string id (a 128-bit BLAKE2 hash: a collision, odds about
    N^2 / 2^129, would reject a good row as a duplicate). Runs merge like a binary
    counter, so a lookup searches O(log N) of them."""

    MIN_BITMAP_BYTES = 1 << 20

    def __init__(self):
        self._bits = np.zeros(0, dtype=np.uint8)
        self._runs: list[np.ndarray] = []
        self._count = 0

    @staticmethod
    def _keys(ids: np.ndarray) -> np.ndarray:
        if ids.dtype.kind in "iu":
            return ids.astype(np.int64, copy=False)
        import hashlib

        digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in ids)
        return np.frombuffer(digests, dtype="S16")

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bits.nbytes + sum(r.nbytes for r in self._runs)

    def _in_bitmap(self, keys: np.ndarray) -> np.ndarray:
        if keys.dtype.kind != "i":
            return np.zeros(len(keys), dtype=bool)
        return (keys >= 0) & (keys < 8 * len(self._bits))

    def _contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        mapped = self._in_bitmap(keys)
        if mapped.any():
            k = keys[mapped]
            found[mapped] = (self._bits[k >> 3] >> (k & 7).astype(np.uint8)) & 1 == 1
        for run in self._runs:
            pos = np.searchsorted(run, keys).clip(max=len(run) - 1)
            found |= run[pos] == keys
        return found

    def _add(self, keys: np.ndarray) -> None:
        self._count += len(keys)
        if keys.dtype.kind == "i" and len(keys) and keys[-1] >= 8 * len(self._bits):
            wanted = int(keys[-1]) // 8 + 1
            if wanted <= max(self.MIN_BITMAP_BYTES, self._count):  # dense enough for a bitmap
                grown = np.zeros(max(wanted, 2 * len(self._bits)), dtype=np.uint8)
                grown[:len(self._bits)] = self._bits
                self._bits = grown
        mapped = self._in_bitmap(keys)
        if mapped.any():
            k = keys[mapped]
            np.bitwise_or.at(self._bits, k >> 3, (1 << (k & 7)).astype(np.uint8))
        rest = keys[~mapped]
        if len(rest):
            self._runs.append(rest)
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                last = self._runs.pop()
                merged = np.concatenate([self._runs.pop(), last])
                merged.sort(kind="stable")
                self._runs.append(merged)

    def first_seen(self, ids: np.ndarray) -> np.ndarray:
        """True for each row whose id was not seen before (the first of repeats in ``ids``)."""
        if len(ids) == 0:
            return np.zeros(0, dtype=bool)
        unique, first = np.unique(self._keys(ids), return_index=True)
        fresh = ~self._contains(unique)
        mask = np.zeros(len(ids), dtype=bool)
        mask[first[fresh]] = True
        self._add(unique[fresh])
        return mask


class ScoresWriter:
    """``--save-scores``: every scored row's scores, as parquet parts of bounded size."""

    def __init__(self, out_uri: str, id_type: pa.DataType, strategies):
        self.prefix = storage.join(out_uri, "scores")
        self.id_type, self.strategies = id_type, strategies
        self.pending: list[dict] = []
        self.pending_rows = 0
        self.written: list[str] = []

    def add(self, columns: dict) -> None:
        if len(columns["id"]):
            self.pending.append(columns)
            self.pending_rows += len(columns["id"])
        if self.pending_rows >= SCORES_ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        cols = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        table = pa.table({"id": pa.array(cols.pop("id"), self.id_type), **cols})
        uri = storage.join(self.prefix, f"part-{len(self.written):05d}.parquet")
        storage.write_parquet(uri, table)
        self.written.append(uri)
        self.pending, self.pending_rows = [], 0

    def finish(self) -> None:
        self.flush()
        # Parts left by an earlier, larger run in the same place are not this run's scores.
        stale = [uri for uri, _ in storage.list_files(self.prefix) if uri not in self.written] \
            if storage.exists(self.prefix) else []
        self._delete(stale)

    def remove(self) -> None:
        self._delete(self.written)

    @staticmethod
    def _delete(uris) -> None:
        for uri in uris:
            try:
                fs, path = storage.resolve(uri)
                fs.delete_file(path)
            except OSError:
                pass


class Reduction:
    """The driver's side: row accounting, rejects, duplicates, exclusions and the exact
    top-k. Memory: O(k) for the selection, O(rejects) for the rejects table, and the
    duplicate check (``SeenIds``): a bit per id for dense integer ids, else 8-16 bytes."""

    def __init__(self, plan: Plan, scores: ScoresWriter | None = None):
        self.plan = plan
        self.topk = StreamingTopK(plan.k, per_class_quota=plan.per_class_quota, num_classes=plan.num_classes)
        self.seen = SeenIds()
        self.scores = scores
        self.rows_read = self.rows_scored = self.rows_excluded = 0
        self.reject_ids, self.reject_files, self.reject_reasons = [], [], []
        self.rejects_by_reason: Counter = Counter()

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejects_by_reason.values())

    def _ids(self, values) -> np.ndarray:
        ids = np.asarray(values)
        return ids.astype(str) if self.plan.spec.id_type == pa.string() else ids.astype(np.int64, copy=False)

    def add(self, batch: dict) -> None:
        ids = self._ids(batch["id"])
        reasons = np.asarray(batch["reason"]).astype(object)
        self.rows_read += len(ids)
        decoded = np.flatnonzero(reasons == "")
        # Duplicates: the first decodable row of an id, in pool order, wins.
        repeated = decoded[~self.seen.first_seen(ids[decoded])]
        reasons[repeated] = DUPLICATE_ID
        score = np.asarray(batch[self.plan.strategy])
        reasons[(reasons == "") & ~np.isfinite(score)] = NONFINITE_SCORE  # e.g. features that overflow the model
        rejected = reasons != ""
        if rejected.any():
            self._reject(ids[rejected], np.asarray(batch["file"])[rejected], reasons[rejected])
        live = ~rejected
        excluded = live & is_member(self.plan.exclude, ids)
        keep = live & ~excluded
        self.rows_excluded += int(excluded.sum())
        self.rows_scored += int(keep.sum())
        predicted = np.asarray(batch["predicted_class"])
        self.topk.add(ids[keep], score[keep], predicted[keep])
        if self.scores is not None:
            columns = {"id": ids[live], "predicted_class": predicted[live], "excluded": excluded[live]}
            columns.update({s: np.asarray(batch[s])[live] for s in self.plan.strategies})
            self.scores.add(columns)

    def _reject(self, ids, files, reasons) -> None:
        for i, f, r in zip(ids.tolist(), files.tolist(), reasons.tolist()):
            sample_id = None if r == NULL_ID else i
            self.reject_ids.append(sample_id)
            self.reject_files.append(self.plan.spec.file_name(f, sample_id))
            self.reject_reasons.append(r)
            self.rejects_by_reason[reason_kind(r)] += 1

    def accounting(self) -> dict:
        return {"rows_read": self.rows_read, "rows_scored": self.rows_scored,
                "rows_rejected": self.rows_rejected, "rows_excluded": self.rows_excluded,
                "rejects_by_reason": dict(sorted(self.rejects_by_reason.items()))}

    def selection_table(self) -> pa.Table:
        ids, scores, classes = self.topk.result()
        return pa.table({
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int64()),
            "id": pa.array(ids.tolist(), self.plan.spec.id_type),
            "score": pa.array(scores, pa.float64()),
            "strategy": pa.array([self.plan.strategy] * len(ids), pa.string()),
            "predicted_class": pa.array(classes, pa.int64()),
        })

    def rejects_table(self) -> pa.Table:
        return pa.table({"id": pa.array(self.reject_ids, self.plan.spec.id_type),
                         "file": pa.array(self.reject_files, pa.string()),
                         "reason": pa.array(self.reject_reasons, pa.string())})


class Progress:
    """A line on stderr every few seconds, from a thread, so a stalled pipeline shows too."""

    def __init__(self, reduction: Reduction, total: int, enabled: bool, every: float = PROGRESS_SECONDS):
        self.reduction, self.total, self.every = reduction, total, every
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def line(self) -> str:
        r = self.reduction
        elapsed = time.perf_counter() - self.started
        return (f"score: {r.rows_read:,}/{self.total:,} rows ({r.rows_read / max(elapsed, 1e-9):,.0f} rows/s), "
                f"{r.rows_rejected:,} rejected, {r.rows_excluded:,} excluded, {elapsed:.0f}s")

    def _run(self):
        while not self._stop.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


# ---- the whole job --------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("tidal-ray")
    except PackageNotFoundError:
        own = "unknown"
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {"tidal_ray": own, "ray": ray_version}


def score_pool(checkpoint_uri, pool_uri, k, out_uri, strategy="tidal-entropy", exclude_uris=(), exclude_ids=None,
               per_class_quota=False, save_scores=False, batch_size=256, actors=(1, 1), seed=0, progress=True,
               *, use_ray=True, use_gpu=None) -> dict:
    """Score every row of a pool and write the exact top-k selection under ``out_uri``:
    ``selection.parquet``, ``selection.json`` (returned), ``rejects.parquet`` and, with
    ``save_scores``, ``scores/``. Bad input raises ValueError before anything is written."""
    started = time.perf_counter()
    plan = plan_scoring(checkpoint_uri, pool_uri, k, strategy, exclude_uris, exclude_ids, per_class_quota,
                        save_scores, batch_size, actors, seed)
    scores = ScoresWriter(out_uri, plan.spec.id_type, plan.strategies) if save_scores else None
    reduction = Reduction(plan, scores)
    batches = score_batches_on_ray(plan, use_gpu) if use_ray else score_batches_in_process(plan)
    try:
        with Progress(reduction, plan.spec.rows, progress):
            for batch in batches:
                reduction.add(batch)
        accounting = reduction.accounting()
        if reduction.rows_read != plan.spec.rows:
            raise RuntimeError(f"read {reduction.rows_read} rows but the pool's files hold {plan.spec.rows}")
        if reduction.rows_scored == 0:
            raise ValueError(f"{pool_uri}: no row to select from ({reduction.rows_read} read, "
                             f"{reduction.rows_rejected} rejected, {reduction.rows_excluded} excluded)")
        if scores is not None:
            scores.finish()
    except BaseException:
        if scores is not None:
            scores.remove()
        raise
    wall = time.perf_counter() - started

    selection = reduction.selection_table()
    summary = {
        "k": plan.k, "selected": selection.num_rows, "strategy": plan.strategy,
        "per_class_quota": plan.per_class_quota, "seed": plan.seed,
        "checkpoint": checkpoint_uri,
        "pool": {"uri": pool_uri, "format": plan.spec.format, "input_shape": format_shape(plan.input_shape),
                 "files": [{"uri": f, "size": s} for f, s in plan.spec.files]},
        **accounting,
        "wall_seconds": round(wall, 3), "rows_per_s": round(reduction.rows_read / max(wall, 1e-9), 1),
        "batch_size": plan.batch_size, "actors": list(plan.actors), "ray": bool(use_ray),
        "outputs": {"selection": storage.join(out_uri, "selection.parquet"),
                    "rejects": storage.join(out_uri, "rejects.parquet"),
                    "scores": scores.written if scores is not None else []},
        "versions": _versions(),
    }
    storage.write_parquet(storage.join(out_uri, "rejects.parquet"), reduction.rejects_table())
    storage.write_parquet(storage.join(out_uri, "selection.parquet"), selection)
    storage.write_json(storage.join(out_uri, "selection.json"), summary)  # last: marks the run complete
    return summary


# ---- command line -------------------------------------------------------------------------


def parse_actors(text: str) -> tuple[int, int]:
    low, _, high = str(text).partition(",")
    try:
        return _check_actors((int(low), int(high or low)))
    except ValueError:
        raise ValueError(f"--actors takes MIN,MAX with 1 <= MIN <= MAX (e.g. 1,4), got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="URI", help="a checkpoint dir (model.pt) or file")
    p.add_argument("--pool", required=True, metavar="URI", help="the pool: local dir or s3:// prefix")
    p.add_argument("--k", required=True, type=int, help="how many samples to select")
    p.add_argument("--out", required=True, metavar="URI", help="where selection.parquet/json and rejects go")
    p.add_argument("--strategy", default="tidal-entropy", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="URI",
                   help="parquet/csv files (or prefixes) whose 'id's are never selected: labeled, pending")
    p.add_argument("--per-class-quota", action="store_true",
                   help="at most ceil(k / classes) per predicted class")
    p.add_argument("--save-scores", action="store_true", help="also write every row's scores (all strategies)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actors", default="1,1", metavar="MIN,MAX", help="scorer actors (a GPU each when there are GPUs)")
    p.add_argument("--seed", type=int, default=0, help="for the random strategy")
    p.add_argument("--in-process", action="store_true", help="no Ray: score in this process (small pools)")


def run_cli(args: argparse.Namespace) -> dict:
    summary = score_pool(args.checkpoint, args.pool, args.k, args.out, strategy=args.strategy,
                         exclude_uris=args.exclude, per_class_quota=args.per_class_quota,
                         save_scores=args.save_scores, batch_size=args.batch_size,
                         actors=parse_actors(args.actors), seed=args.seed, use_ray=not args.in_process)
    print(f"selected {summary['selected']} of {summary['rows_scored']:,} scored rows by {summary['strategy']} "
          f"({summary['rows_read']:,} read, {summary['rows_rejected']:,} rejected, {summary['rows_excluded']:,} "
          f"excluded; {summary['rows_per_s']:,.0f} rows/s)")
    print(f"selection: {summary['outputs']['selection']}")
    return summary
