"""Scoring a whole pool: every check before work (``plan_scoring``), then the pipeline.

    repeated ids (the id columns alone, on the driver)
    [cluster mode: the same pipeline once more first, the scorers sending only a hashed
      sample's embeddings -> k-means (a Ray task) -> centroids for the scorers]
    read by position (Ray Data tasks) -> decode (CPU tasks) -> BatchScorer (actor pool,
      a GPU each if any; each block then loses the rows that cannot be selected:
      BlockFilter) -> iter_batches to the driver, in any order
      -> Reduction: duplicates by position, exclusions, the batch mode's selection

``score_pool`` runs it; with ``use_ray=False`` the same read, decode and ``BatchScorer``
run in this process (tests, benchmarks, small pools). Importing this module stays cheap
(no torch, no Ray) so the CLI starts fast.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.data.decode import decode_for_scoring, format_shape
from tidal_ray.errors import BadInput, NothingToSelect
from tidal_ray.data.pool import PoolSpec, check_compatible, describe_pool
from tidal_ray.data.read import arrival_order_for_tests, read_batches, read_tasks, read_unit, read_units, repeated_ids
from tidal_ray.method.batch import BatchParams, check_batch_params, sample_threshold
from tidal_ray.score.centroids import fit_centroids
from tidal_ray.score.reduce import BlockFilter, Progress, Reduction, ScoresWriter
from tidal_ray.score.scorer import BALD_SAMPLES, PRECISIONS, BatchScorer
from tidal_ray.method.uncertainty import DEFAULT_STRATEGY, STRATEGIES, check_strategy

# CPUs per scorer actor on CPU-only clusters: the largest step that leaves the read
# tasks room (DESIGN §5). None equals DECODE_CPUS: Ray Data fuses map stages with equal
# resources, which would move decoding into the actors.
ACTOR_CPU_STEPS = (0.5, 0.2, 0.1, 0.05)
DECODE_CPUS = 0.25
# Rows per block: whole scorer batches, about BLOCK_BYTES decoded, at most MAX_BLOCK_BATCHES
# batches. Ray Data's costs are per block (tasks, object store, the executor's loop on the
# driver): 8-batch blocks of 64-d features held the Ray pipeline to about half of what
# 51-batch blocks gave on 2 CPUs (benchmarks/score_overhead.py).
# A small pool still spreads over MIN_BLOCKS blocks, so that reading overlaps scoring
# (one block of an expensive model's whole pool would score nothing until all is read).
BLOCK_BYTES = 16 << 20
MAX_BLOCK_BATCHES = 64
MIN_BLOCKS = 8
# Object store memory the pipeline may hold: this many blocks, or BLOCKS_PER_ACTOR for
# each scorer actor when there are many. Unbounded, the reads ran hundreds of MB ahead of
# the scorer, and the driver's RSS grew with the pool (it maps the store's pages of every
# block it reads).
IN_FLIGHT_BLOCKS = 16
BLOCKS_PER_ACTOR = 4
READ_BLOCK_BYTES = 64 << 20  # encoded bytes per read block (large images: fewer rows)


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
    precision: str = "fp32"
    batch: BatchParams = BatchParams()
    cycle: int = 0                # the power keys' and the centroids' cycle

    @property
    def strategies(self) -> tuple[str, ...]:
        """Columns the scorer returns: every strategy for --save-scores, else the one."""
        return STRATEGIES if self.save_scores else (self.strategy,)


def _check_actors(actors) -> tuple[int, int]:
    try:
        low, high = (int(a) for a in actors)
    except (TypeError, ValueError):
        raise BadInput(f"actors must be (MIN, MAX), got {actors!r}") from None
    if not 1 <= low <= high:
        raise BadInput(f"actors needs 1 <= MIN <= MAX, got {low},{high}")
    return low, high


def plan_scoring(checkpoint_uri, pool_uri, k, strategy=DEFAULT_STRATEGY, exclude_uris=(), exclude_ids=None,
                 per_class_quota=False, save_scores=False, batch_size=256, actors=(1, 1), seed=0,
                 precision="fp32", batch_mode="topk", beta=None, clusters=None, candidates=None,
                 cycle=0) -> Plan:
    """Every check that can fail on bad input, before any work starts (except that a
    ``--clusters`` over the unlabeled rows is found by the centroids' sample)."""
    from tidal_ray.train.checkpoint import check_model_importable, load_checkpoint

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise BadInput(f"--k {k!r}: must be a positive integer")
    check_strategy(strategy)
    batch = check_batch_params(batch_mode, int(k), beta, clusters, candidates)
    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if int(batch_size) < 1:
        raise BadInput(f"batch size must be at least 1, got {batch_size}")
    actors = _check_actors(actors)
    try:
        state = load_checkpoint(checkpoint_uri)
    except FileNotFoundError:
        raise BadInput(f"no checkpoint at {checkpoint_uri}") from None
    check_model_importable(state)
    input_shape = tuple(int(d) for d in state["config"]["input_shape"])
    num_classes = int(state["config"]["num_classes"])
    spec = describe_pool(pool_uri)
    check_compatible(spec, input_shape, num_classes, checkpoint_uri)
    excluded = id_utils.read_id_files(exclude_uris, spec.id_type)
    if exclude_ids is not None and len(exclude_ids):
        excluded.append(id_utils.from_user(exclude_ids, spec.id_type, "exclude_ids"))
    if batch.mode == "cluster" and batch.clusters > spec.rows:
        raise BadInput(f"--clusters {batch.clusters}: more than the pool's {spec.rows} rows")
    bald = strategy == "bald" or save_scores
    return Plan(checkpoint_uri, spec, input_shape, num_classes, int(k), strategy,
                id_utils.sorted_unique(excluded, spec.id_type), bool(per_class_quota), bool(save_scores), int(batch_size),
                actors, int(seed), BALD_SAMPLES if bald else 0, precision, batch, int(cycle))


def _scorer_kwargs(plan: Plan, extra: dict | None = None, **more) -> dict:
    """The ``BatchScorer``'s arguments; ``extra`` (``centroids`` or ``sample``) on top."""
    return {"checkpoint_uri": plan.checkpoint_uri, "seed": plan.seed, "mc_samples": plan.mc_samples,
            "strategies": plan.strategies, "pad_to": plan.batch_size, "precision": plan.precision,
            **(extra or {}), **more}


def _block_rows(plan: Plan) -> int:
    by_bytes = BLOCK_BYTES // (_row_bytes(plan) * plan.batch_size)
    by_pool = -(-plan.spec.rows // (MIN_BLOCKS * plan.batch_size))
    return plan.batch_size * int(max(1, min(MAX_BLOCK_BATCHES, by_bytes, by_pool)))


def _row_bytes(plan: Plan) -> int:
    """Decoded bytes of one row in a block."""
    itemsize = 4 if plan.spec.format == "features" else 1
    return int(np.prod(plan.input_shape)) * itemsize + 64  # + id, file, reason


def score_batches_in_process(plan: Plan, extra: dict | None = None):
    """The pipeline in this process: read, decode, score, one block at a time."""
    scorer = BatchScorer(**_scorer_kwargs(plan, extra))
    spec, block_rows = plan.spec.slim(), _block_rows(plan)
    for unit in arrival_order_for_tests(read_units(plan.spec)):
        for table in read_unit(unit, spec, block_rows, READ_BLOCK_BYTES):
            yield scorer(decode_for_scoring(table, spec, plan.input_shape, {}))


def _cluster_shape(ray) -> tuple[float, float]:
    """(GPUs in the cluster, CPUs of the largest node)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=1.0)
    return ray.cluster_resources().get("GPU", 0.0), node_cpus


def score_batches_on_ray(plan: Plan, use_gpu: bool | None = None, extra: dict | None = None):
    """The pipeline on Ray Data; yields the scorer's output batches in whatever order
    they finish (the reduction decides duplicates by position). ``use_gpu=True`` asks
    for a GPU per scorer actor whether or not a GPU node is up yet (an autoscaler starts
    one); None uses GPUs when the cluster has some now. ``extra``: more ``BatchScorer``
    arguments (the cluster mode's ``centroids`` or ``sample``)."""
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources

    from tidal_ray.runtime import init_ray

    init_ray()
    gpus, node_cpus = _cluster_shape(ray)
    use_gpu = gpus >= 1 if use_gpu is None else use_gpu
    low, high = plan.actors
    spec = plan.spec
    block_rows = _block_rows(plan)
    block_bytes = block_rows * _row_bytes(plan)
    if use_gpu:
        actor_resources = {"num_gpus": 1, "num_cpus": 1}
        scorer = _scorer_kwargs(plan, extra, device="cuda")
    else:
        # Fractional CPUs, so actors never take every CPU from the read tasks (DESIGN §5
        # saw a 2-CPU Ray hang at 0 rows with two 1-CPU actors); torch still gets the
        # node's cores through its own thread count.
        fits = [c for c in ACTOR_CPU_STEPS if c * high <= node_cpus - DECODE_CPUS]
        actor_resources = {"num_cpus": fits[0] if fits else ACTOR_CPU_STEPS[-1]}
        scorer = _scorer_kwargs(plan, extra, device="cpu", num_threads=max(1, int(node_cpus // high)))

    # Our own read, tasks over runs of parquet row groups (or one per window of image files),
    # in fractional CPUs: Ray Data 2.60's read_parquet adds a ListFiles task that asks for a whole CPU
    # and hung a 1-CPU node with the scorer actor placed. Every row keeps its position.
    cpus = ray.cluster_resources().get("CPU", 1.0)
    units = read_units(spec, cpus)
    tasks = read_tasks(spec, len(units), cpus)
    ds = ray.data.from_items(units, override_num_blocks=tasks)
    ds = ds.map_batches(read_batches, batch_size=1, batch_format="pyarrow", num_cpus=DECODE_CPUS,
                        fn_kwargs={"spec": spec.slim(), "block_rows": block_rows,
                                   "max_bytes": READ_BLOCK_BYTES})
    ds = ds.map_batches(decode_for_scoring, batch_format="pyarrow", batch_size=None, num_cpus=DECODE_CPUS,
                        fn_kwargs={"spec": spec.slim(), "input_shape": plan.input_shape, "file_index": {}})
    # Whole blocks per call (the scorer steps through them ``batch_size`` rows at a time)
    # and Arrow in and out: Ray Data's per-call and NumPy-to-Arrow costs are per row.
    ds = ds.map_batches(BatchScorer, fn_constructor_kwargs=scorer, batch_size=block_rows,
                        batch_format="pyarrow", compute=ActorPoolStrategy(min_size=low, max_size=high),
                        **actor_resources)
    # Blocks of _block_rows rather than one per file: the actors pipeline with the reads
    # and results reach the driver (and the progress line) as they are made.
    ds.context.target_max_block_size = block_bytes
    ds.context.execution_options.preserve_order = False  # any order: duplicates go by position
    in_flight = max(IN_FLIGHT_BLOCKS, BLOCKS_PER_ACTOR * high)
    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=in_flight * block_bytes)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _pool_files(spec: PoolSpec) -> dict:
    """The pool's files for selection.json: each parquet file; for image files (a row
    each, millions in a real pool) their count and bytes only."""
    if spec.format == "files":
        return {"image_files": spec.rows, "image_bytes": spec.bytes}
    return {"files": [{"uri": f, "size": s} for f, s in spec.files]}


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


def _centroids(plan: Plan, use_ray: bool, use_gpu) -> tuple[np.ndarray, int]:
    """The cluster mode's centroids: the sampler pass over the pool (the same pipeline,
    scoring nothing), then k-means on the driver's bounded sample (a Ray task on Ray)."""
    sample = {"sample": {"seed": plan.seed, "cycle": plan.cycle,
                         "threshold": sample_threshold(plan.batch.sample_rows, plan.spec.rows)}}
    sampler = dataclasses.replace(plan, mc_samples=0)
    if not use_ray:
        return fit_centroids(score_batches_in_process(sampler, sample), plan)
    import ray

    from tidal_ray.method.batch import kmeans

    def run_kmeans(x, k, seed, steps):  # its n x K distances stay off the driver
        return ray.get(ray.remote(num_cpus=DECODE_CPUS)(kmeans).remote(x, k, seed, steps))

    return fit_centroids(score_batches_on_ray(sampler, use_gpu, sample), plan, run_kmeans)


def score_pool(checkpoint_uri, pool_uri, k, out_uri, strategy=DEFAULT_STRATEGY, exclude_uris=(), exclude_ids=None,
               per_class_quota=False, save_scores=False, batch_size=256, actors=(1, 1), seed=0, progress=True,
               *, use_ray=True, use_gpu=None, precision="fp32", batch_mode="topk", beta=None, clusters=None,
               candidates=None, cycle=0) -> dict:
    """Score every row of a pool and write the selection under ``out_uri``:
    ``selection.parquet``, ``selection.json`` (returned), ``rejects.parquet`` and, with
    ``save_scores``, ``scores/``. Bad input raises BadInput before anything is written.
    ``use_gpu=True`` makes every scorer actor ask for a GPU (see ``score_batches_on_ray``);
    ``precision="bf16"`` scores under bf16 autocast (scores change slightly).
    ``batch_mode`` (DESIGN §8): ``topk`` (the exact top k), ``power`` (``beta``) or
    ``cluster`` (``clusters``, ``candidates``); ``cycle`` feeds the power keys and the
    centroids' sample."""
    started = time.perf_counter()
    plan = plan_scoring(checkpoint_uri, pool_uri, k, strategy, exclude_uris, exclude_ids, per_class_quota,
                        save_scores, batch_size, actors, seed, precision, batch_mode, beta, clusters, candidates,
                        cycle)
    repeated = repeated_ids(plan.spec)
    mode_record = plan.batch.record()
    extra = None
    if plan.batch.mode == "cluster":
        fit_started = time.perf_counter()
        centroids, sampled = _centroids(plan, use_ray, use_gpu)
        extra = {"centroids": centroids}
        mode_record.update(sampled_rows=sampled, embedding_dim=int(centroids.shape[1]),
                           centroid_seconds=round(time.perf_counter() - fit_started, 3))
    if not save_scores:  # --save-scores writes every row, so every row comes to the driver
        kept = plan.batch.candidates if plan.batch.mode == "cluster" else plan.k
        extra = {**(extra or {}), "block_filter": BlockFilter(
            kept, plan.strategy, plan.num_classes, plan.spec.id_type, plan.exclude, repeated,
            plan.per_class_quota, plan.batch, plan.seed, plan.cycle)}
    scores = ScoresWriter(out_uri, plan.spec.id_type, plan.strategies) if save_scores else None
    reduction = Reduction(plan.k, plan.strategy, plan.num_classes, plan.spec.id_type, plan.exclude,
                          plan.spec.file_name, repeated=repeated, per_class_quota=plan.per_class_quota,
                          scores=scores, batch=plan.batch, seed=plan.seed, cycle=plan.cycle,
                          row_groups=plan.spec.row_groups)
    batches = score_batches_on_ray(plan, use_gpu, extra) if use_ray else score_batches_in_process(plan, extra)
    first_at = last_at = None
    first_rows = 0
    try:
        with Progress(reduction, plan.spec.rows, progress):
            for batch in batches:
                reduction.add(batch)
                last_at = time.perf_counter()
                if first_at is None:
                    first_at, first_rows = last_at, reduction.rows_read
        reduction.finish()
        accounting = reduction.accounting()
        if reduction.rows_read != plan.spec.rows:
            raise RuntimeError(f"read {reduction.rows_read} rows but the pool's files hold {plan.spec.rows}")
        if reduction.rows_scored == 0:
            raise NothingToSelect(f"{pool_uri}: no row to select from ({reduction.rows_read} read, "
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
        "per_class_quota": plan.per_class_quota, "seed": plan.seed, "cycle": plan.cycle, **mode_record,
        "checkpoint": checkpoint_uri,
        "pool": {"uri": pool_uri, "format": plan.spec.format, "input_shape": format_shape(plan.input_shape),
                 **_pool_files(plan.spec)},
        **accounting,
        "score_histogram": reduction.score_histogram(),
        # Marker/hidden files and non-images under an image prefix: skipped, not rows.
        "files_skipped": plan.spec.skipped_count, "files_skipped_names": list(plan.spec.skipped),
        "wall_seconds": round(wall, 3), "rows_per_s": round(reduction.rows_read / max(wall, 1e-9), 1),
        # Start-up (plan, repeated ids, actors, checkpoint load, first block) and the
        # rate from the first batch at the driver to the last.
        "timing": {"first_row_seconds": round((first_at or started) - started, 3),
                   "steady_rows_per_s": round((reduction.rows_read - first_rows) / (last_at - first_at), 1)
                   if last_at is not None and last_at > first_at else None},
        # Rows the driver read (the rest were dropped on the scorers: reduce.BlockFilter).
        "rows_at_driver": reduction.rows_at_driver,
        "precision": plan.precision, "repeated_ids": int(len(repeated)),
        "batch_size": plan.batch_size, "actors": list(plan.actors), "ray": bool(use_ray),
        "outputs": {"selection": storage.join(out_uri, "selection.parquet"),
                    "rejects": storage.join(out_uri, "rejects.parquet"),
                    "scores": scores.written if scores is not None else []},
        # botocore's retries in this process (pyarrow's reads retry too, uncounted: it exposes no count)
        "s3_retries": storage.s3_retries(),
        "versions": _versions(),
    }
    storage.write_parquet(storage.join(out_uri, "rejects.parquet"), reduction.rejects_table())
    storage.write_parquet(storage.join(out_uri, "selection.parquet"), selection)
    storage.write_json(storage.join(out_uri, "selection.json"), summary)  # last: marks the run complete
    return summary
