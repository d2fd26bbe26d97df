"""Labeling campaigns: the cycle state machine.

Each cycle walks the same steps:

    train -> select -> export -> wait-for-labels -> merge -> (next cycle)

and after the last selection cycle one more ``train`` measures the final model. All
state lives under one URI (a local dir or ``s3://``), laid out as DESIGN.md §2 says.
Every step first looks for its own finished output and moves on if it is there, so a
driver killed anywhere can simply ``run`` again. Labels are never rewritten: each
cycle's arrive in their own files under ``labeled/``, skips (samples nobody could
label) beside them (``state.py``: the config, the layout, the labels that arrived;
``imports.py``: a person's deliveries; ``lock.py``: the one driver's lease).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from tidal_ray.data import ids as id_utils
from tidal_ray.data import storage
from tidal_ray.campaign.state import (CampaignConfig, config_of, cycle_label_progress, cycle_uri,
                                      initial_selection_uri, input_shape_of, label_positions, labeled_table, labels_uri,
                                      load_state, positions_of,
                                      progress_line, save_state, selected_ids, skipped_table, state_uri)
from tidal_ray.errors import BadInput, NothingToSelect
from tidal_ray.campaign.labeling import read_labels, validate_labels, write_exports
from tidal_ray.campaign.lock import CampaignLock, holder_line, is_free, read_lease

STEPS = ("train", "select", "export", "wait-for-labels", "merge")
# Without --oracle, an initial draw (--initial-labels N) is exported and labeled before cycle 0.
INITIAL_STEPS = ("initial-export", "initial-wait")
# Test-only: "CYCLE:STEP" makes the driver SIGKILL itself as that step starts (crash tests).
KILL_AT_ENV = "TIDAL_RAY_TEST_KILL_AT"


# ---- steps ----------------------------------------------------------------------------------

def _maybe_kill_for_test(cycle: int, step: str) -> None:
    if os.environ.get(KILL_AT_ENV) == f"{cycle}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def step_train(root: str, config: CampaignConfig, cycle: int, log) -> None:
    metrics_uri = cycle_uri(root, cycle, "metrics.json")
    if storage.exists(metrics_uri):
        return
    from tidal_ray.train.evaluate import accuracy
    from tidal_ray.data.pool import describe_pool
    from tidal_ray.train.config import TrainConfig, scaled_epochs
    from tidal_ray.train.loop import train_in_process
    from tidal_ray.train.on_ray import train_on_ray

    # Sorted by id: the labeled table is in arrival order (the oracle's reads finish in any
    # order), and the trainer's index of each sample, hence its batches, follow the order
    # it is given; sorted, a seeded cycle trains the same model every time.
    labels = labeled_table(root).sort_by("id")
    ids, y = labels.column("id").to_numpy(zero_copy_only=False), labels.column("label").to_numpy()
    spec = describe_pool(config.pool)
    train_config = TrainConfig(num_classes=config.num_classes, input_shape=tuple(input_shape_of(config)),
                               backbone=config.backbone, feature_layers=config.feature_layers,
                               weights=config.weights, normalize=config.normalize, augment=config.augment,
                               epochs=scaled_epochs(len(ids), config.batch_size, config.epochs, config.min_steps),
                               batch_size=config.batch_size, lr=config.lr, lam=config.lam, seed=config.seed + cycle,
                               init_checkpoint=(storage.read_json(cycle_uri(root, cycle - 1, "metrics.json"))["checkpoint"]
                                                if config.warm_start and cycle > 0 else None))
    log(f"cycle {cycle}: training {config.backbone} on {len(ids)} labels, {train_config.epochs} epochs "
        f"({config.trainer}{', warm start' if train_config.init_checkpoint else ''})")
    started = time.perf_counter()
    checkpoint_dir = cycle_uri(root, cycle, "checkpoint")
    rejected = 0
    if config.trainer == "ray":
        from tidal_ray.train.ingest import labeled_rows

        # The labeled rows go from the pool to the workers on Ray Data, never through here.
        rows = labeled_rows(config.pool, ids, y, train_config.input_shape, spec, label_positions(root, cycle))
        ids, y, rejected = rows.ids, rows.labels, rows.rejected
        read_seconds = time.perf_counter() - started
        result = train_on_ray(train_config, ids, y, rows.dataset, storage_uri=checkpoint_dir,
                              num_workers=config.workers, use_gpu=config.use_gpu,
                              max_failures=config.max_failures, name="train")
        checkpoint, history = result.checkpoint_uri, result.metrics
    else:
        from tidal_ray.train.checkpoint import save_checkpoint
        from tidal_ray.data.loader import load_rows

        # --trainer local holds the labeled rows in this process: for small campaigns.
        label_of = dict(zip(ids.tolist(), y.tolist()))
        ids, x, _, _ = load_rows(config.pool, ids=list(label_of), input_shape=train_config.input_shape,
                                 skip_undecodable=True)
        read_seconds = time.perf_counter() - started
        if not len(ids):
            raise BadInput(f"none of the labeled rows in {config.pool} can be decoded")
        rejected = len(label_of) - len(ids)
        y = np.array([label_of[i] for i in ids.tolist()], dtype=np.int64)
        _, _, session = train_in_process(train_config, ids, x, y)
        checkpoint = save_checkpoint(session.last_state, checkpoint_dir).rsplit("/", 1)[0]
        history = session.history
    train_seconds = time.perf_counter() - started
    accuracy = accuracy(checkpoint, config.test)
    log(f"cycle {cycle}: trained in {train_seconds:.1f}s (reading the labeled rows {read_seconds:.1f}s); test accuracy "
        + ("n/a (no test set)" if accuracy is None else f"{accuracy:.4f}"))
    storage.write_json(metrics_uri, {
        "cycle": cycle, "labeled": len(ids), "labeled_rejected": rejected, "skipped": skipped_table(root).num_rows,
        "checkpoint": checkpoint, "started_from": train_config.init_checkpoint,   # None: from scratch
        "s3_retries": storage.s3_retries(),
        "test_accuracy": accuracy, "td_kl": history[-1]["kl"] if history else None,
        "train_seconds": train_seconds, "read_seconds": read_seconds, "train_history": history,
        "label_counts": np.bincount(y, minlength=config.num_classes).tolist(),
    })


def step_select(root: str, config: CampaignConfig, cycle: int, log) -> bool:
    """Score the pool and select; False when no row is left to select."""
    out = cycle_uri(root, cycle)
    if storage.exists(storage.join(out, "selection.json")):
        return True
    from tidal_ray.score.pipeline import score_pool

    metrics = storage.read_json(cycle_uri(root, cycle, "metrics.json"))
    exclude = sorted(set(labeled_table(root).column("id").to_pylist()) | set(skipped_table(root).column("id").to_pylist())
                     | set(selected_ids(root, cycle)))
    log(f"cycle {cycle}: scoring the pool, selecting {config.k} by {config.strategy}, "
        f"{config.batch_mode} batch mode ({len(exclude)} excluded)")
    try:
        summary = score_pool(metrics["checkpoint"], config.pool, config.k, out, strategy=config.strategy,
                             exclude_ids=exclude, per_class_quota=config.per_class_quota, actors=config.actors,
                             seed=config.seed, save_scores=False, use_gpu=True if config.use_gpu else None,
                             batch_mode=config.batch_mode, beta=config.beta, clusters=config.clusters,
                             candidates=config.candidates, cycle=cycle)
    except NothingToSelect as e:
        log(f"cycle {cycle}: {e}; the campaign ends here, with cycle {cycle}'s model")
        return False
    log(f"cycle {cycle}: selected {summary['selected']} of {summary['rows_scored']:,} scored rows in "
        f"{summary['wall_seconds']:.0f}s ({summary['rows_read']:,} read, {summary['rows_rejected']:,} rejected, "
        f"{summary['rows_excluded']:,} excluded)")
    if summary["rows_rejected"]:
        log(f"cycle {cycle}: rows that could not be scored, with the reason: {summary['outputs']['rejects']}")
    return True


def export(root: str, cycle: int | None = None, out_uri: str | None = None, document_root: str | None = None,
           log=None) -> list[str]:
    """Write the labeling-tool manifests of a cycle's selection (default: the current
    cycle, into its ``export/``); returns the files written. Rendered samples are served
    to Label Studio from the campaign directory (one Local Files storage for every cycle),
    or from ``out_uri`` when the export goes elsewhere; ``log`` gets Label Studio's settings."""
    from tidal_ray.data.pool import describe_pool

    state = load_state(root)
    config = config_of(state)
    if cycle is None and state["step"] in INITIAL_STEPS:  # the initial draw, before cycle 0
        selection, default_out = storage.read_parquet(initial_selection_uri(root)), storage.join(root, "initial", "export")
    else:
        cycle = state["cycle"] if cycle is None else cycle
        selection, default_out = storage.read_parquet(cycle_uri(root, cycle, "selection.parquet")), cycle_uri(root, cycle, "export")
    return write_exports(selection, describe_pool(config.pool), out_uri or default_out,
                         config.class_names, config.presign, document_root=document_root,
                         samples_home=out_uri or root, log=log)


def step_export(root: str, config: CampaignConfig, cycle: int, log) -> None:
    written = export(root, cycle, log=None if config.oracle else log)   # a simulation has no labeler
    log(f"cycle {cycle}: exported {len(written)} files for labeling: {cycle_uri(root, cycle, 'export')}/")


def step_wait_for_labels(root: str, config: CampaignConfig, cycle: int, log) -> bool:
    """True when this cycle's labels are in; False means stop and wait for a person."""
    target = labels_uri(root, cycle + 1)
    if storage.exists(target):
        return True
    if not config.oracle:
        progress = cycle_label_progress(root, cycle)
        if not progress["waiting"]:
            return True
        log(f"cycle {cycle}: waiting for labels ({progress_line(progress)}). Label "
            f"{cycle_uri(root, cycle, 'export')}/ and run 'tidal-ray campaign import-labels {root} FILE' "
            f"(partial deliveries add up; a sample nobody can label comes back as a skip), "
            f"then 'tidal-ray campaign run {root}'")
        return False
    from tidal_ray.data.lookup import labels_of
    from tidal_ray.data.pool import describe_pool

    selection = storage.read_parquet(cycle_uri(root, cycle, "selection.parquet"))
    # Only the id and label columns of the selected rows' row groups are read, never the data.
    ids, labels = labels_of(describe_pool(config.pool), selection.column("id").to_pylist(),
                            positions=positions_of(selection))
    storage.write_parquet(target, pa.table({"id": pa.array(ids), "label": pa.array(labels, pa.int64())}))
    log(f"cycle {cycle}: oracle labeled {len(ids)} samples")
    return True


def run(root: str, log=print) -> dict:
    """Advance the campaign as far as it can go; returns the final state. A step that
    raises leaves status ``failed`` with the step and the error; the next run retries it."""
    load_state(root)  # no campaign: said before any lease is written
    with CampaignLock(root) as lease:
        state = load_state(root)
        if state["step"] == "done":
            if state["status"] != "done":
                state["status"] = "done"
                save_state(root, state)
            write_report(root)
            return state
        state["status"] = "running"
        state.pop("error", None)
        save_state(root, state)
        try:
            _advance(root, state, lease, log)
        except (Exception, KeyboardInterrupt) as e:
            if not lease.lost:  # a driver that lost its lease leaves the state to the one that took it
                state.update(status="failed", error={
                    "cycle": state["cycle"], "step": state["step"], "message": f"{type(e).__name__}: {_one_line(e)}",
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                save_state(root, state)
            raise
        write_report(root)
        return state


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def _advance(root: str, state: dict, lease: CampaignLock, log) -> None:
    config = config_of(state)

    def save():
        lease.check()
        save_state(root, state)

    while True:
        cycle, step = state["cycle"], state["step"]
        _maybe_kill_for_test(cycle, step)
        if step == "train":
            step_train(root, config, cycle, log)
            if cycle >= config.cycles:
                state.update(step="done", status="done")
                save()
                return
        elif step == "select":
            if not step_select(root, config, cycle, log):
                state.update(step="done", status="done", ended_early={
                    "cycle": cycle, "reason": "no row left to select: every row is labeled, skipped or rejected"})
                save()
                return
        elif step == "export":
            step_export(root, config, cycle, log)
        elif step == "wait-for-labels":
            if not step_wait_for_labels(root, config, cycle, log):
                state["status"] = "waiting-for-labels"
                save()
                return
        elif step == "initial-export":
            log(f"initial draw: exported {len(export(root))} files for labeling: {root}/initial/export/")
            state["step"] = "initial-wait"
            save()
            continue
        elif step == "initial-wait":
            progress = cycle_label_progress(root, 0, initial_selection_uri(root))
            if progress["waiting"]:
                log(f"initial draw: waiting for labels ({progress_line(progress)}). Label "
                    f"{root}/initial/export/ and run 'tidal-ray campaign import-labels {root} FILE', "
                    f"then 'tidal-ray campaign run {root}'")
                state["status"] = "waiting-for-labels"
                save()
                return
            state["step"] = "train"
            save()
            continue
        elif step == "merge":
            progress = cycle_label_progress(root, cycle)
            log(f"cycle {cycle}: merged {progress['labeled']} new labels, {progress['skipped']} skipped; "
                f"{labeled_table(root).num_rows} labeled in all")
            state.update(cycle=cycle + 1, step="train")
            save()
            continue
        state["step"] = STEPS[STEPS.index(step) + 1]
        save()


# ---- report ---------------------------------------------------------------------------------

def cycle_rows(root: str) -> list[dict]:
    """One row per trained cycle: metrics, and the selection's spread when it has one."""
    state = load_state(root)
    rows = []
    for c in range(state["cycle"] + 1):
        metrics_uri = cycle_uri(root, c, "metrics.json")
        if not storage.exists(metrics_uri):
            break
        m = storage.read_json(metrics_uri)
        row = {"cycle": c, "labeled": m["labeled"], "skipped": m.get("skipped", 0),
               "test_accuracy": m["test_accuracy"], "td_kl": m["td_kl"],
               "train_seconds": m["train_seconds"], "label_counts": m.get("label_counts")}
        selection_json = cycle_uri(root, c, "selection.json")
        if storage.exists(selection_json):
            sel = storage.read_json(selection_json)
            scores = storage.read_parquet(cycle_uri(root, c, "selection.parquet")).column("score").to_numpy()
            row.update(selected=len(scores), score_seconds=sel.get("wall_seconds"),
                       rows_read=sel.get("rows_read"), rows_scored=sel.get("rows_scored"),
                       rows_rejected=sel.get("rows_rejected"), rows_excluded=sel.get("rows_excluded"),
                       timing=sel.get("timing"), pool=sel.get("pool"),
                       score_histogram=sel.get("score_histogram"),  # absent before the histogram
                       score_min=float(scores.min()) if len(scores) else None,
                       score_median=float(np.median(scores)) if len(scores) else None,
                       score_max=float(scores.max()) if len(scores) else None)
        rows.append(row)
    return rows


def write_report(root: str) -> str:
    """``report/index.html``, ``report/report.md`` and ``report/learning_curve.png`` of
    the campaign; returns the page's URI."""
    from tidal_ray.campaign import report

    state = load_state(root)
    config = config_of(state)
    ended = state.get("ended_early")
    ended = f" (ended at cycle {ended['cycle']}: {ended['reason']})" if ended else ""
    heading = (f"# Campaign report: {root}\n\n"
               f"Status **{state['status']}**{ended}, cycle {state['cycle']} of {config.cycles}, step `{state['step']}`. "
               f"Strategy `{config.strategy}`, backbone `{config.backbone}`, k = {config.k} per cycle, "
               f"pool `{config.pool}`.")
    name = root.rstrip("/").split("/")[-1]
    summary = {"name": name, "uri": root, "status": state["status"] + ended, "cycle": state["cycle"],
               "step": state["step"], "updated": state.get("updated"), **asdict(config)}
    return report.write_report(root, cycle_rows(root), heading, f"campaign {name}: {config.strategy}", summary)


# ---- init, status -------------------------------------------------------------------

def init(root: str, config: CampaignConfig, initial_labels_uri: str | None = None, log=print) -> dict:
    """Create the campaign: every check (recipe and model spec first, before any row is
    read), then the initial labels (by id, labels as indices or class names)."""
    config.check()
    if storage.exists(state_uri(root)):
        raise BadInput(f"a campaign already exists at {root}")
    from tidal_ray.data.lookup import pool_has_ids
    from tidal_ray.campaign.initial import initial_draw
    from tidal_ray.data.lookup import sample_labels, winning_positions
    from tidal_ray.data.pool import describe_pool
    from tidal_ray.train.config import resolve_recipe

    # Footers, ids and the drawn rows' labels only: the pool's data is never read here.
    spec = describe_pool(config.pool)
    config.backbone, input_shape = resolve_recipe(
        spec, config.num_classes, config.backbone, config.feature_layers, config.weights, config.image_size,
        config.channels, config.normalize, log)
    if config.test is not None and not storage.exists(config.test):
        raise BadInput(f"test set {config.test} does not exist")
    if initial_labels_uri:
        rows = read_labels(initial_labels_uri, config.pool, config.class_names)
        in_pool = pool_has_ids(config.pool, [str(r["id"]) for r in rows if r["id"] is not None])
        table, problems = validate_labels(rows, id_utils.parse_keys(sorted(in_pool), spec.id_type).to_pylist(),
                                          config.num_classes, lambda _: False, spec.id_type)
        for p in problems:
            log(f"initial labels: line {p['line']}: id {p['id']!r}: {p['reason']}")
    elif config.oracle and config.initial_labels > 0 and config.initial_draw == "random":
        table = sample_labels(spec, config.initial_labels, config.seed)
    elif config.initial_labels > 0:
        table = initial_draw(spec, config, input_shape, log)
    else:
        raise BadInput("give initial labels: --initial-labels-file FILE, or --initial-labels N")
    if table.num_rows == 0:
        raise BadInput("no valid initial labels")
    if config.batch_mode == "cluster" and config.clusters > spec.rows - table.num_rows:
        raise BadInput(f"--clusters {config.clusters}: more than the {spec.rows - table.num_rows} unlabeled rows")
    waiting = "label" not in table.column_names  # drawn without --oracle: a person labels them first
    if not waiting and spec.format != "files":  # where each initial row lives (looked up once) for training
        table = table.join(winning_positions(spec, table.column("id").to_pylist()), "id", join_type="left outer")
    storage.write_parquet(initial_selection_uri(root) if waiting else labels_uri(root, 0), table)
    state = {"config": asdict(config), "cycle": 0, "step": "initial-export" if waiting else "train",
             "status": "initialized", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_state(root, state)
    asked = table.num_rows + config.k * config.cycles
    if asked > spec.rows:
        log(f"note: {table.num_rows:,} initial + {config.cycles} cycles of {config.k:,} = {asked:,} samples, more "
            f"than the pool's {spec.rows:,} rows: the campaign ends when no row is left to select")
    skipped = f", {spec.skipped_count} files skipped" if spec.skipped_count else ""
    log(f"campaign initialized at {root}: {table.num_rows} initial {'rows to label' if waiting else 'labels'} "
        f"({config.initial_draw if config.initial_labels and not initial_labels_uri else 'given'}), pool {config.pool} "
        f"({spec.rows} rows{skipped}), model {config.backbone}, input {'x'.join(map(str, input_shape))}, "
        f"{config.cycles} cycles of {config.k}")
    return state


def status(root: str) -> dict:
    """Where the campaign is; while it waits for labels, how many ids and the first few;
    when a step failed, the step and the error; and the driver holding the lease, if any."""
    state = load_state(root)
    config = config_of(state)
    cycles = []
    for c in range(state["cycle"] + 1):
        uri = cycle_uri(root, c, "metrics.json")
        if storage.exists(uri):
            m = storage.read_json(uri)
            cycles.append({"cycle": c, "labeled": m["labeled"], "skipped": m.get("skipped", 0),
                           "test_accuracy": m["test_accuracy"]})
    out = {"uri": root, "status": state["status"], "cycle": state["cycle"], "of_cycles": config.cycles,
           "step": state["step"], "labeled": labeled_table(root).num_rows, "skipped": skipped_table(root).num_rows,
           "cycles": cycles}
    if state.get("error"):
        out["error"] = state["error"]
    if state.get("ended_early"):
        out["ended_early"] = state["ended_early"]
    if state["step"] == "wait-for-labels" and storage.exists(cycle_uri(root, state["cycle"], "selection.parquet")):
        progress = cycle_label_progress(root, state["cycle"])
        out["waiting_for"] = {"count": len(progress["waiting"]), "first": progress["waiting"][:10],
                              "selected": progress["selected"], "labeled": progress["labeled"],
                              "skipped": progress["skipped"]}
    lease = read_lease(root)
    out["driver"] = None if is_free(lease, time.time()) else holder_line(lease)
    return out
