"""Labeling campaigns: the cycle state machine.

Each cycle walks the same steps:

    train -> select -> export -> wait-for-labels -> merge -> (next cycle)

and after the last selection cycle one more ``train`` measures the final model. All
state lives under one URI (a local dir or ``s3://``), laid out as DESIGN.md §2 says.
Every step first looks for its own finished output and moves on if it is there, so a
driver killed anywhere can simply ``run`` again. Labels are never rewritten: each
cycle's arrive in their own files under ``labeled/`` (``campaign_state.py``: the
config, the layout, the labels that arrived).
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
from tidal_ray.campaign.state import (CampaignConfig, config_of, cycle_label_progress, cycle_uri, delivery_uri,
                             input_shape_of, labeled_table, labels_uri, load_state, save_state, selected_ids,
                             state_uri)
from tidal_ray.errors import BadInput
from tidal_ray.campaign.labeling import read_labels, validate_labels, write_exports
from tidal_ray.campaign.lock import CampaignLock

STEPS = ("train", "select", "export", "wait-for-labels", "merge")
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
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process
    from tidal_ray.train.on_ray import train_on_ray

    labels = labeled_table(root)
    ids, y = labels.column("id").to_numpy(zero_copy_only=False), labels.column("label").to_numpy()
    spec = describe_pool(config.pool)
    train_config = TrainConfig(num_classes=config.num_classes, input_shape=tuple(input_shape_of(config)),
                               backbone=config.backbone, feature_layers=config.feature_layers,
                               weights=config.weights, normalize=config.normalize, augment=config.augment,
                               epochs=config.epochs, batch_size=config.batch_size,
                               lr=config.lr, lam=config.lam, seed=config.seed + cycle)
    log(f"cycle {cycle}: training {config.backbone} on {len(ids)} labels ({config.trainer})")
    started = time.perf_counter()
    checkpoint_dir = cycle_uri(root, cycle, "checkpoint")
    rejected = 0
    if config.trainer == "ray":
        from tidal_ray.train.ingest import labeled_rows

        # The labeled rows go from the pool to the workers on Ray Data, never through here.
        rows = labeled_rows(config.pool, ids, y, train_config.input_shape, spec, label_positions(root, cycle))
        ids, y, rejected = rows.ids, rows.labels, rows.rejected
        result = train_on_ray(train_config, ids, y, rows.dataset, storage_uri=checkpoint_dir,
                              num_workers=config.workers, use_gpu=config.use_gpu,
                              max_failures=config.max_failures, name="train")
        checkpoint, history = result.checkpoint_uri, result.metrics
    else:
        from tidal_ray.train.checkpoint import save_checkpoint
        from tidal_ray.data.loader import load_rows

        # --trainer local holds the labeled rows in this process: for small campaigns.
        label_of = dict(zip(ids.tolist(), y.tolist()))
        ids, x, _, _ = load_rows(config.pool, ids=list(label_of), input_shape=train_config.input_shape)
        y = np.array([label_of[i] for i in ids.tolist()], dtype=np.int64)
        _, _, session = train_in_process(train_config, ids, x, y)
        checkpoint = save_checkpoint(session.last_state, checkpoint_dir).rsplit("/", 1)[0]
        history = session.history
    train_seconds = time.perf_counter() - started
    accuracy = accuracy(checkpoint, config.test)
    log(f"cycle {cycle}: trained in {train_seconds:.1f}s; test accuracy "
        + ("n/a (no test set)" if accuracy is None else f"{accuracy:.4f}"))
    storage.write_json(metrics_uri, {
        "cycle": cycle, "labeled": len(ids), "labeled_rejected": rejected, "checkpoint": checkpoint,
        "test_accuracy": accuracy, "td_kl": history[-1]["kl"] if history else None,
        "train_seconds": train_seconds, "train_history": history,
        "label_counts": np.bincount(y, minlength=config.num_classes).tolist(),
    })


def _positions(table: pa.Table) -> pa.Table | None:
    """``id`` and where the row lives, from a selection or the initial labels (None
    when it does not say: made before positions were recorded)."""
    from tidal_ray.data.lookup import POSITION_COLUMNS

    if not all(c in table.column_names for c in POSITION_COLUMNS):
        return None
    table = table.select(["id", *POSITION_COLUMNS])
    return table.filter(table.column("row").is_valid())


def label_positions(root: str, cycle: int) -> pa.Table | None:
    """Where the labeled rows live: the initial labels' positions (looked up once at
    init) and every earlier cycle's selection (later labels are of selected ids)."""
    tables = [_positions(storage.read_parquet(uri)) for uri in
              [labels_uri(root, 0)] + [cycle_uri(root, c, "selection.parquet") for c in range(cycle)]
              if storage.exists(uri)]
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def step_select(root: str, config: CampaignConfig, cycle: int, log) -> None:
    out = cycle_uri(root, cycle)
    if storage.exists(storage.join(out, "selection.json")):
        return
    from tidal_ray.score.pipeline import score_pool

    metrics = storage.read_json(cycle_uri(root, cycle, "metrics.json"))
    exclude = sorted(set(labeled_table(root).column("id").to_pylist()) | set(selected_ids(root, cycle)))
    log(f"cycle {cycle}: scoring the pool, selecting {config.k} by {config.strategy} ({len(exclude)} excluded)")
    score_pool(metrics["checkpoint"], config.pool, config.k, out, strategy=config.strategy,
               exclude_ids=exclude, per_class_quota=config.per_class_quota, actors=config.actors,
               seed=config.seed, save_scores=False, use_gpu=True if config.use_gpu else None)


def export(root: str, cycle: int | None = None, out_uri: str | None = None) -> list[str]:
    """Write the labeling-tool manifests of a cycle's selection (default: the current
    cycle, into its ``export/``); returns the files written."""
    from tidal_ray.data.pool import describe_pool

    state = load_state(root)
    config = config_of(state)
    cycle = state["cycle"] if cycle is None else cycle
    selection = storage.read_parquet(cycle_uri(root, cycle, "selection.parquet"))
    return write_exports(selection, describe_pool(config.pool), out_uri or cycle_uri(root, cycle, "export"),
                         config.class_names, config.presign)


def step_export(root: str, config: CampaignConfig, cycle: int, log) -> None:
    written = export(root, cycle)
    log(f"cycle {cycle}: exported {len(written)} files for labeling: {cycle_uri(root, cycle, 'export')}/")


def step_wait_for_labels(root: str, config: CampaignConfig, cycle: int, log) -> bool:
    """True when this cycle's labels are in; False means stop and wait for a person."""
    target = labels_uri(root, cycle + 1)
    if storage.exists(target):
        return True
    if not config.oracle:
        selected, labeled = cycle_label_progress(root, cycle)
        if labeled == selected:
            return True
        log(f"cycle {cycle}: waiting for labels ({labeled} of {selected} selected samples labeled). Label "
            f"{cycle_uri(root, cycle, 'export')}/ and run 'tidal-ray campaign import-labels {root} FILE' "
            f"(partial deliveries add up), then 'tidal-ray campaign run {root}'")
        return False
    from tidal_ray.data.lookup import labels_of
    from tidal_ray.data.pool import describe_pool

    selection = storage.read_parquet(cycle_uri(root, cycle, "selection.parquet"))
    # Only the id and label columns of the selected rows' row groups are read, never the data.
    ids, labels = labels_of(describe_pool(config.pool), selection.column("id").to_pylist(),
                            positions=_positions(selection))
    storage.write_parquet(target, pa.table({"id": pa.array(ids), "label": pa.array(labels, pa.int64())}))
    log(f"cycle {cycle}: oracle labeled {len(ids)} samples")
    return True


def run(root: str, log=print) -> dict:
    """Advance the campaign as far as it can go; returns the final state."""
    with CampaignLock(root):
        state = load_state(root)
        config = config_of(state)
        state["status"] = "running"
        save_state(root, state)
        while True:
            cycle, step = state["cycle"], state["step"]
            _maybe_kill_for_test(cycle, step)
            if step == "train":
                step_train(root, config, cycle, log)
                if cycle >= config.cycles:
                    state.update(step="done", status="done")
                    save_state(root, state)
                    break
            elif step == "select":
                step_select(root, config, cycle, log)
            elif step == "export":
                step_export(root, config, cycle, log)
            elif step == "wait-for-labels":
                if not step_wait_for_labels(root, config, cycle, log):
                    state["status"] = "waiting-for-labels"
                    save_state(root, state)
                    return state
            elif step == "merge":
                merged = cycle_label_progress(root, cycle)[1]
                log(f"cycle {cycle}: merged {merged} new labels; {labeled_table(root).num_rows} labeled in all")
                state.update(cycle=cycle + 1, step="train")
                save_state(root, state)
                continue
            elif step == "done":
                break
            state["step"] = STEPS[STEPS.index(step) + 1]
            save_state(root, state)
        write_report(root)
        return state


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
        row = {"cycle": c, "labeled": m["labeled"], "test_accuracy": m["test_accuracy"], "td_kl": m["td_kl"],
               "train_seconds": m["train_seconds"], "label_counts": m.get("label_counts")}
        selection_json = cycle_uri(root, c, "selection.json")
        if storage.exists(selection_json):
            sel = storage.read_json(selection_json)
            scores = storage.read_parquet(cycle_uri(root, c, "selection.parquet")).column("score").to_numpy()
            row.update(selected=len(scores), score_seconds=sel.get("wall_seconds"),
                       rows_scored=sel.get("rows_scored"), rows_rejected=sel.get("rows_rejected"),
                       score_min=float(scores.min()) if len(scores) else None,
                       score_median=float(np.median(scores)) if len(scores) else None,
                       score_max=float(scores.max()) if len(scores) else None)
        rows.append(row)
    return rows


def write_report(root: str) -> str:
    """``report/report.md`` and ``report/learning_curve.png`` of the campaign."""
    from tidal_ray.campaign import report

    state = load_state(root)
    config = config_of(state)
    heading = (f"# Campaign report: {root}\n\n"
               f"Status **{state['status']}**, cycle {state['cycle']} of {config.cycles}, step `{state['step']}`. "
               f"Strategy `{config.strategy}`, backbone `{config.backbone}`, k = {config.k} per cycle, "
               f"pool `{config.pool}`.")
    title = f"campaign {root.rstrip('/').split('/')[-1]}: {config.strategy}"
    return report.write_report(storage.join(root, "report"), heading, cycle_rows(root), title)


# ---- init, status, import -------------------------------------------------------------------

def init(root: str, config: CampaignConfig, initial_labels_uri: str | None = None, log=print) -> dict:
    """Create the campaign: every check (recipe and model spec first, before any row is
    read), then the initial labels (by id, labels as indices or class names)."""
    config.check()
    if storage.exists(state_uri(root)):
        raise BadInput(f"a campaign already exists at {root}")
    from tidal_ray.data.lookup import pool_has_ids
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
    elif config.oracle and config.initial_labels > 0:
        table = sample_labels(spec, config.initial_labels, config.seed)
    else:
        raise BadInput("give initial labels: --initial-labels-file FILE, or --oracle with --initial-labels N")
    if table.num_rows == 0:
        raise BadInput("no valid initial labels")
    # Where each initial row lives, looked up once, so training reads those rows directly.
    table = table.join(winning_positions(spec, table.column("id").to_pylist()), "id", join_type="left outer")
    storage.write_parquet(labels_uri(root, 0), table)
    state = {"config": asdict(config), "cycle": 0, "step": "train", "status": "initialized",
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_state(root, state)
    skipped = f", {spec.skipped_count} files skipped" if spec.skipped_count else ""
    log(f"campaign initialized at {root}: {table.num_rows} initial labels, pool {config.pool} "
        f"({spec.rows} rows{skipped}), model {config.backbone}, input {'x'.join(map(str, input_shape))}, "
        f"{config.cycles} cycles of {config.k}")
    return state


def status(root: str) -> dict:
    state = load_state(root)
    config = config_of(state)
    cycles = []
    for c in range(state["cycle"] + 1):
        uri = cycle_uri(root, c, "metrics.json")
        if storage.exists(uri):
            m = storage.read_json(uri)
            cycles.append({"cycle": c, "labeled": m["labeled"], "test_accuracy": m["test_accuracy"]})
    return {"uri": root, "status": state["status"], "cycle": state["cycle"], "of_cycles": config.cycles,
            "step": state["step"], "labeled": labeled_table(root).num_rows, "cycles": cycles}


def import_labels(root: str, labels_file: str, log=print) -> dict:
    """Merge a person's labels for the current cycle's selection, as one more delivery
    (``labeled/cycle-NNN-delivery-MMM.parquet``, never rewritten): partial deliveries
    add up, and the cycle moves on once every selected id has a label. Rows that do not
    fit are listed, not merged; unknown class names fail the file (nothing written)."""
    from tidal_ray.data.lookup import pool_has_ids

    state = load_state(root)
    config = config_of(state)
    cycle = state["cycle"]
    if state["step"] not in ("wait-for-labels",) or state["status"] != "waiting-for-labels":
        raise BadInput(f"cycle {cycle} is at step {state['step']!r}, not waiting for labels")
    if storage.exists(labels_uri(root, cycle + 1)):
        raise BadInput(f"labels for cycle {cycle} were already imported ({labels_uri(root, cycle + 1)})")
    selection = storage.read_parquet(cycle_uri(root, cycle, "selection.parquet"))
    rows = read_labels(labels_file, config.pool, config.class_names)
    candidates = [str(r["id"]) for r in rows if r["id"] is not None]
    in_pool = pool_has_ids(config.pool, candidates)
    already = {str(i) for i in labeled_table(root).column("id").to_pylist()}
    table, problems = validate_labels(rows, selection.column("id").to_pylist(), config.num_classes,
                                      lambda key: key in in_pool, selection.schema.field("id").type, already)
    for p in problems:
        log(f"not merged: line {p['line']}: id {p['id']!r} label {p['label']!r}: {p['reason']}")
    if table.num_rows:
        delivery = 0
        while not storage.put_if_absent(delivery_uri(root, cycle + 1, delivery), storage.parquet_bytes(table)):
            delivery += 1
    selected, labeled = cycle_label_progress(root, cycle)
    left = (f"run 'tidal-ray campaign run {root}' to continue" if labeled == selected
            else f"{selected - labeled} still to label")
    log(f"merged {table.num_rows} labels for cycle {cycle} ({labeled} of {selected} selected samples labeled); "
        f"{len(problems)} rows not merged; {left}")
    return {"merged": table.num_rows, "problems": problems, "labeled": labeled, "selected": selected}

