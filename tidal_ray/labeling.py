"""Labeling-tool formats: what goes out (a selection) and what comes back (labels).

Out: SageMaker Ground Truth input manifest (JSON Lines), Label Studio tasks (JSON), CSV.
In: CSV / JSON Lines / parquet of ``id,label``, or a Ground Truth output manifest.
"""
from __future__ import annotations

import csv
import io
import json

import pyarrow as pa

from . import storage
from .errors import BadInput

ID_FIELD = "tidal-ray-id"


def source_uri(pool_uri: str, pool_is_image_prefix: bool, sample_id) -> str | None:
    """The sample's own object when the pool is an image prefix (id = key under the prefix)."""
    return storage.join(pool_uri, str(sample_id)) if pool_is_image_prefix else None


def ground_truth_manifest(selection: pa.Table, pool_uri: str, pool_is_image_prefix: bool) -> str:
    lines = []
    for row in selection.to_pylist():
        src = source_uri(pool_uri, pool_is_image_prefix, row["id"])
        entry = {"source-ref": src} if src else {"source": str(row["id"]), "data-ref": pool_uri}
        entry.update({ID_FIELD: row["id"], "tidal-ray-rank": row["rank"], "tidal-ray-score": row["score"]})
        lines.append(json.dumps(entry))
    return "\n".join(lines) + "\n"


def label_studio_tasks(selection: pa.Table, pool_uri: str, pool_is_image_prefix: bool) -> str:
    tasks = []
    for row in selection.to_pylist():
        src = source_uri(pool_uri, pool_is_image_prefix, row["id"])
        data = {"image": src} if src else {"text": str(row["id"]), "pool": pool_uri}
        data[ID_FIELD] = row["id"]
        tasks.append({"data": data, "meta": {"rank": row["rank"], "score": row["score"],
                                             "predicted_class": row["predicted_class"]}})
    return json.dumps(tasks, indent=1) + "\n"


def selection_csv(selection: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = ["rank", "id", "score", "strategy", "predicted_class"]
    writer.writerow(columns)
    for row in selection.select(columns).to_pylist():
        writer.writerow([row[c] for c in columns])
    return buf.getvalue()


def write_exports(selection: pa.Table, pool_uri: str, pool_is_image_prefix: bool, out_uri: str) -> list[str]:
    files = {
        "ground-truth-input.manifest": ground_truth_manifest(selection, pool_uri, pool_is_image_prefix),
        "label-studio-tasks.json": label_studio_tasks(selection, pool_uri, pool_is_image_prefix),
        "selection.csv": selection_csv(selection),
    }
    written = []
    for name, text in files.items():
        storage.write_bytes(storage.join(out_uri, name), text.encode())
        written.append(storage.join(out_uri, name))
    return written


# ---- labels coming back -------------------------------------------------------------------

def _ground_truth_label(entry: dict):
    """A Ground Truth output line keeps the input fields and adds ``<job>`` (the class
    index) next to ``<job>-metadata``."""
    for key, value in entry.items():
        if f"{key}-metadata" in entry and not key.endswith("-metadata"):
            return value
    return None


def _id_from_ground_truth(entry: dict, pool_uri: str | None):
    if ID_FIELD in entry:
        return entry[ID_FIELD]
    ref = entry.get("source-ref")
    if ref and pool_uri and ref.startswith(pool_uri.rstrip("/") + "/"):
        return ref[len(pool_uri.rstrip("/")) + 1:]
    return entry.get("source", ref)


def read_labels(uri: str, pool_uri: str | None = None) -> list[dict]:
    """Rows ``{"id", "label", "line"}`` from CSV, JSON Lines (plain or Ground Truth output)
    or parquet. Values are kept as read; validation happens in ``validate_labels``."""
    if uri.endswith(".parquet"):
        table = storage.read_parquet(uri)
        missing = {"id", "label"} - set(table.column_names)
        if missing:
            raise BadInput(f"{uri}: missing column(s) {sorted(missing)}; need id,label")
        return [{"id": r["id"], "label": r["label"], "line": i + 1} for i, r in enumerate(table.select(["id", "label"]).to_pylist())]
    text = storage.read_bytes(uri).decode()
    if uri.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"id", "label"} <= set(reader.fieldnames):
            raise BadInput(f"{uri}: a labels CSV needs a header with id,label")
        return [{"id": r["id"], "label": r["label"], "line": i + 2} for i, r in enumerate(reader)]
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            rows.append({"id": None, "label": None, "line": i + 1, "error": "not valid JSON"})
            continue
        if "label" in entry and "id" in entry:
            rows.append({"id": entry["id"], "label": entry["label"], "line": i + 1})
        else:
            rows.append({"id": _id_from_ground_truth(entry, pool_uri), "label": _ground_truth_label(entry), "line": i + 1})
    return rows


def _as_int(value):
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    return int(as_float) if as_float.is_integer() else None


def validate_labels(rows: list[dict], selected_ids, num_classes: int, pool_has_id,
                    id_type: pa.DataType = pa.int64()) -> tuple[pa.Table, list[dict]]:
    """Split imported rows into good ``(id, label)`` rows and a list of problems.

    ``selected_ids``: ids this cycle sent out for labeling (same type as pool ids).
    ``pool_has_id``: callable telling whether an id exists in the pool."""
    selected = {str(i): i for i in selected_ids}
    good_ids, good_labels, problems, seen = [], [], [], set()
    for row in rows:
        key = None if row["id"] is None else str(row["id"]).strip()
        label = _as_int(row["label"])
        reason = row.get("error")
        if reason is None:
            if key is None or key == "":
                reason = "missing id"
            elif key in seen:
                reason = "duplicate id in this import"
            elif key not in selected:
                reason = "not selected in this cycle" if pool_has_id(key) else "unknown id"
            elif label is None:
                reason = f"label {row['label']!r} is not an integer"
            elif not 0 <= label < num_classes:
                reason = f"label {label} out of range 0..{num_classes - 1}"
        if reason:
            problems.append({"line": row["line"], "id": row["id"], "label": row["label"], "reason": reason})
            continue
        seen.add(key)
        good_ids.append(selected[key])
        good_labels.append(label)
    table = pa.table({"id": pa.array(good_ids, type=id_type), "label": pa.array(good_labels, type=pa.int64())})
    return table, problems
