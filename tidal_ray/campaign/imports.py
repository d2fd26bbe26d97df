"""Labels coming back from people: each import is one more delivery for the current
cycle's selection, merged under the campaign's lease."""
from __future__ import annotations

import os
import time

import pyarrow as pa

from tidal_ray.campaign.labeling import read_labels, validate_labels
from tidal_ray.campaign.lock import CampaignLock
from tidal_ray.campaign.state import (config_of, cycle_label_progress, cycle_uri, delivery_uri,
                                      initial_selection_uri, labeled_table, labels_uri, load_state, progress_line,
                                      skipped_table, skips_uri)
from tidal_ray.data import storage
from tidal_ray.errors import BadInput

# Seconds an import waits for a driver that holds the lease (a `run` that only looks).
LEASE_WAIT_S = 60
# Test-only: seconds an import pauses between reading what is merged and writing its
# delivery, so that two imports started together overlap there (race tests).
PAUSE_ENV = "TIDAL_RAY_TEST_IMPORT_PAUSE"


def _write_delivery(uri_of, table: pa.Table) -> None:
    delivery = 0
    while not storage.put_if_absent(uri_of(delivery), storage.parquet_bytes(table)):
        delivery += 1


def import_labels(root: str, labels_file: str, log=print) -> dict:
    """Merge a person's labels (and skips) for the current cycle's selection, as one more
    delivery (``labeled/cycle-NNN-delivery-MMM.parquet``, skips in ``labeled/skips-...``,
    never rewritten), under the campaign's lease, so two imports at once never merge an
    id twice: partial deliveries add up, and the cycle moves on once every selected id is
    labeled or skipped. Rows that do not fit are listed, not merged; unknown class names
    fail the file (nothing written)."""
    from tidal_ray.data.lookup import pool_has_ids

    state = load_state(root)
    _importable(state, root)  # said at once, before waiting for the lease
    config = config_of(state)
    rows = read_labels(labels_file, config.pool, config.class_names)
    candidates = [str(r["id"]) for r in rows if r["id"] is not None]
    in_pool = pool_has_ids(config.pool, candidates)
    with CampaignLock(root, wait=LEASE_WAIT_S):
        state = load_state(root)
        cycle = _importable(state, root)
        initial = state["step"] == "initial-wait"
        target = 0 if initial else cycle + 1  # the labels feed this cycle's training (the initial draw: cycle 0's)
        selection_uri = initial_selection_uri(root) if initial else cycle_uri(root, cycle, "selection.parquet")
        selection = storage.read_parquet(selection_uri)
        already = {str(i) for i in labeled_table(root).column("id").to_pylist()}
        already_skipped = {str(i) for i in skipped_table(root).column("id").to_pylist()}
        skips = []
        table, problems = validate_labels(rows, selection.column("id").to_pylist(), config.num_classes,
                                          lambda key: key in in_pool, selection.schema.field("id").type, already,
                                          skips, already_skipped)
        time.sleep(float(os.environ.get(PAUSE_ENV, 0)))
        for p in problems:
            log(f"not merged: line {p['line']}: id {p['id']!r} label {p['label']!r}: {p['reason']}")
        if table.num_rows:
            _write_delivery(lambda d: delivery_uri(root, target, d), table)
        if skips:
            _write_delivery(lambda d: skips_uri(root, target, d), pa.table({
                "id": pa.array([s["id"] for s in skips], selection.schema.field("id").type),
                "reason": pa.array([s["reason"] for s in skips], pa.string())}))
        progress = cycle_label_progress(root, cycle, selection_uri)
    left = (f"run 'tidal-ray campaign run {root}' to continue" if not progress["waiting"]
            else f"{len(progress['waiting'])} still to label")
    log(f"merged {table.num_rows} labels and {len(skips)} skips for cycle {cycle} ({progress_line(progress)}); "
        f"{len(problems)} rows not merged; {left}")
    return {"merged": table.num_rows, "skipped": len(skips), "problems": problems, "labeled": progress["labeled"],
            "selected": progress["selected"], "waiting": len(progress["waiting"])}


def _importable(state: dict, root: str) -> int:
    cycle = state["cycle"]
    if state["step"] not in ("wait-for-labels", "initial-wait") or state["status"] != "waiting-for-labels":
        raise BadInput(f"cycle {cycle} is at step {state['step']!r}, not waiting for labels")
    target = 0 if state["step"] == "initial-wait" else cycle + 1
    if storage.exists(labels_uri(root, target)):
        raise BadInput(f"labels for cycle {cycle} were already imported ({labels_uri(root, target)})")
    return cycle
