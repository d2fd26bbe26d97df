"""Labeling-tool formats: what goes out (a selection a person can see) and what comes
back (labels), and the rendering of samples for labelers.

Out: SageMaker Ground Truth input manifest (JSON Lines), Label Studio tasks (JSON, the
model's prediction as a pre-annotation), CSV; with class names, the Ground Truth
label-categories file and a Label Studio labeling config. Image-file pools point at the
original objects; parquet ``pixels``/``image`` pools get one PNG per selected sample
under ``samples/``; feature pools carry the id and any ``uri``/``source`` column.
In: CSV / JSON Lines / parquet of ``id,label``, a Ground Truth output manifest, or
Label Studio's JSON, JSON_MIN or CSV export (read by ``tidal-ray-id``: ``label_studio.py``);
labels may be class names.
"""
from __future__ import annotations

import csv
import io
import json
import re
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from tidal_ray.campaign import label_studio
from tidal_ray.campaign.label_studio import FROM_NAME, ID_FIELD
from tidal_ray.data import storage
from tidal_ray.data.labels import as_label, label_problem
from tidal_ray.errors import BadInput

REFERENCE_COLUMNS = ("uri", "source")   # a feature pool's pointer to the original sample
SAMPLES_DIR = "samples"
IMAGE_NAME, TEXT_NAME = "image", "text"  # Label Studio object tags (the control is FROM_NAME)


def _sample_name(rank: int, sample_id) -> str:
    return f"{int(rank):05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', str(sample_id))[:80]}.png"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _as_picture(value, spec) -> np.ndarray:
    """A pool row's data as the ``(C, H, W)`` uint8 picture a person sees: stored pixels
    as they are, image bytes upright (EXIF) in RGB, or grayscale when they are."""
    from PIL import Image

    from tidal_ray.data.decode import decode_image

    if spec.format == "pixels":
        return np.frombuffer(value, dtype=np.uint8).reshape(spec.shape)
    with Image.open(io.BytesIO(value)) as img:
        channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
    return decode_image(value, channels)


def _selected_rows(selection: pa.Table, spec, columns: list[str]) -> pa.Table:
    """``id`` and ``columns`` of the selected rows: read at the positions the selection
    records (so an export's cost follows k, not the pool), by id where it has none."""
    from tidal_ray.campaign.state import positions_of
    from tidal_ray.data.lookup import rows_of

    return rows_of(spec, selection.column("id").to_pylist(), columns, positions_of(selection))


def render_samples(selection: pa.Table, spec, out_uri: str) -> dict:
    """One PNG per selected row of a parquet ``pixels``/``image`` pool, under
    ``out_uri/samples/``; returns ``{id: uri}``. Only the selected rows are read."""
    from concurrent.futures import ThreadPoolExecutor

    rows = _selected_rows(selection, spec, [spec.column]).to_pylist()
    data = {row["id"]: row[spec.column] for row in rows}
    rank = dict(zip(selection.column("id").to_pylist(), selection.column("rank").to_pylist()))
    targets = {}
    for sample_id, value in data.items():
        if value is None:
            continue
        try:
            picture = _as_picture(value, spec)
        except ValueError:
            continue  # an undecodable image is never selected; nothing to show
        if picture.shape[0] not in (1, 3):
            picture = picture[:1]
        targets[sample_id] = (storage.join(out_uri, SAMPLES_DIR, _sample_name(rank[sample_id], sample_id)), picture)
    with ThreadPoolExecutor(max_workers=8) as pool:  # many small PUTs on S3
        list(pool.map(lambda item: storage.write_bytes(item[0], _png(item[1])), targets.values()))
    return {sample_id: uri for sample_id, (uri, _) in targets.items()}


def sample_refs(selection: pa.Table, spec, out_uri: str) -> list[dict]:
    """Per selected row, what the labeler is shown: ``{"image": uri}`` (the original
    object, or a rendered PNG), else ``{"text": id}`` plus any ``uri``/``source``."""
    ids = selection.column("id").to_pylist()
    if spec.format == "files":
        return [{IMAGE_NAME: spec.key_uri(str(i))} for i in ids]
    if spec.format in ("pixels", "image"):
        rendered = render_samples(selection, spec, out_uri)
        return [{IMAGE_NAME: rendered[i]} if i in rendered else {TEXT_NAME: str(i)} for i in ids]
    table = _selected_rows(selection, spec, list(REFERENCE_COLUMNS))
    refs = {name: dict(zip(table.column("id").to_pylist(), table.column(name).to_pylist()))
            for name in REFERENCE_COLUMNS if name in table.column_names}
    return [{TEXT_NAME: str(i), **{name: refs[name].get(i) for name in refs}} for i in ids]


def presign(uri: str, seconds: int) -> str:
    """An HTTPS URL for an ``s3://`` object, valid ``seconds`` (boto3, the AWS chain)."""
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    return boto3.client("s3").generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                     ExpiresIn=int(seconds))


def class_name(index, class_names) -> str:
    return class_names[index] if class_names and 0 <= index < len(class_names) else str(index)


def ground_truth_manifest(selection: pa.Table, refs: list[dict]) -> str:
    lines = []
    for row, ref in zip(selection.to_pylist(), refs):
        pointer = ref.get(IMAGE_NAME) or next((ref[c] for c in REFERENCE_COLUMNS if ref.get(c)), None)
        if pointer and str(pointer).startswith(("s3://", "/", "http")):
            entry = {"source-ref": pointer}
        else:
            entry = {"source": str(pointer or row["id"])}
        entry.update({ID_FIELD: row["id"], "tidal-ray-rank": row["rank"], "tidal-ray-score": row["score"]})
        lines.append(json.dumps(entry))
    return "\n".join(lines) + "\n"


def label_studio_tasks(selection: pa.Table, refs: list[dict], class_names=None, presign_seconds=None,
                       serving: label_studio.LocalFiles | None = None) -> str:
    """Label Studio tasks: local pictures as Local Files URLs (with ``serving``), ``s3://``
    ones presigned (with ``presign_seconds``) or as they are (an S3 storage resolves them)."""
    tasks = []
    for row, ref in zip(selection.to_pylist(), refs):
        data = dict(ref)
        image = str(data.get(IMAGE_NAME, ""))
        if presign_seconds and image.startswith("s3://"):
            data[IMAGE_NAME] = presign(image, presign_seconds)
        elif serving and image and not image.startswith(("s3://", "http://", "https://")):
            data[IMAGE_NAME] = serving.url(image)
        data[ID_FIELD] = row["id"]
        task = {"data": data, "meta": {"rank": row["rank"], "score": row["score"],
                                       "predicted_class": row["predicted_class"]}}
        if row["predicted_class"] is not None and row["predicted_class"] >= 0:
            task["predictions"] = [{"model_version": f"tidal-ray {row['strategy']}", "result": [{
                "from_name": FROM_NAME, "to_name": IMAGE_NAME if IMAGE_NAME in data else TEXT_NAME,
                "type": "choices", "value": {"choices": [class_name(row["predicted_class"], class_names)]}}]}]
        tasks.append(task)
    return json.dumps(tasks, indent=1) + "\n"


def ground_truth_label_categories(class_names) -> str:
    return json.dumps({"document-version": "2018-11-28", "labels": [{"label": n} for n in class_names]}, indent=1) + "\n"


def label_studio_config(class_names, has_image: bool) -> str:
    shown = (f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}"/>' if has_image
             else f'  <Text name="{TEXT_NAME}" value="${TEXT_NAME}"/>')
    choices = "\n".join(f"    <Choice value={quoteattr(n)}/>" for n in class_names)
    return (f"<View>\n{shown}\n  <Choices name=\"{FROM_NAME}\" toName=\"{IMAGE_NAME if has_image else TEXT_NAME}\" "
            f"choice=\"single\" showInLine=\"true\">\n{choices}\n  </Choices>\n</View>\n")


def selection_csv(selection: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = ["rank", "id", "score", "strategy", "predicted_class"]
    writer.writerow(columns)
    for row in selection.select(columns).to_pylist():
        writer.writerow([row[c] for c in columns])
    return buf.getvalue()


def image_dir(spec, out_uri: str, samples_home: str | None = None) -> str | None:
    """The local directory holding the pictures a labeler sees (the pool's for image
    files; ``samples_home``, by default ``out_uri``, for rendered samples), else None."""
    if spec.format == "files":
        return None if storage.is_s3(spec.uri) else spec.root
    if spec.format in ("pixels", "image") and not storage.is_s3(out_uri):
        return samples_home or out_uri
    return None


def write_exports(selection: pa.Table, spec, out_uri: str, class_names=None, presign_seconds=None,
                  document_root: str | None = None, samples_home: str | None = None, log=None) -> list[str]:
    """Every export of a selection under ``out_uri``; returns the files written
    (manifests, configs and README.txt; the rendered samples go under ``samples/``).
    Local pictures reach Label Studio through its Local Files serving under
    ``document_root`` (default: the parent of the pictures' directory, ``image_dir``);
    README.txt says how, and ``log`` gets the settings."""
    local = image_dir(spec, out_uri, samples_home)
    serving = label_studio.local_files(local, document_root) if local else None
    refs = sample_refs(selection, spec, out_uri)
    s3_images = any(str(ref.get(IMAGE_NAME, "")).startswith("s3://") for ref in refs)
    settings = label_studio.settings_lines(serving, s3_images, presign_seconds)
    files = {
        "ground-truth-input.manifest": ground_truth_manifest(selection, refs),
        "label-studio-tasks.json": label_studio_tasks(selection, refs, class_names, presign_seconds, serving),
        "selection.csv": selection_csv(selection),
        "README.txt": label_studio.readme(settings, serving, bool(class_names)),
    }
    if class_names:
        files["ground-truth-label-categories.json"] = ground_truth_label_categories(class_names)
        files["label-studio-config.xml"] = label_studio_config(class_names, spec.format != "features")
    for line in settings if log else ():
        log(f"Label Studio: {line}")
    written = []
    for name, text in files.items():
        storage.write_bytes(storage.join(out_uri, name), text.encode())
        written.append(storage.join(out_uri, name))
    return written


# ---- labels coming back -------------------------------------------------------------------

def is_skip(value) -> bool:
    """A ``skip`` column's value: true/1 (any case) marks a sample nobody could label."""
    return value is True or str(value).strip().lower() in ("true", "1")


def _ground_truth_failure(entry: dict) -> str | None:
    """Why a Ground Truth output line carries no label: its ``<job>-metadata`` names a
    failure, or the metadata is there without the label; None for a labeled line."""
    for key, value in entry.items():
        if key.endswith("-metadata") and isinstance(value, dict):
            if value.get("failure-reason"):
                return str(value["failure-reason"])
            if key[: -len("-metadata")] not in entry:
                return "no label in the Ground Truth output"
    return None


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


def _read_json_array(text: str, uri: str) -> list[dict]:
    """Label Studio's JSON export (tasks with ``data`` and ``annotations``; an all-cancelled
    task is a skip), its JSON_MIN export, or an array of ``{"id", "label"}`` objects."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{uri}: not valid JSON ({e})") from None
    objects = [e for e in entries if isinstance(e, dict)]
    if objects:
        fields = set().union(*objects, *(e["data"] for e in objects if isinstance(e.get("data"), dict)))
        label_studio.check_shape(uri, fields)
    rows = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            rows.append({"id": None, "label": None, "line": i + 1, "error": "not a JSON object"})
        elif "data" in entry:
            rows.append(label_studio.task_row(entry, i + 1))
        else:
            rows.append(label_studio.flat_row(entry, i + 1))
    return rows


def labels_by_name(rows: list[dict], class_names, uri: str) -> list[dict]:
    """Class names in ``label`` become their index. With class names, a label that is
    neither a name nor an integer is bad input for the whole file (nothing is merged)."""
    if not class_names:
        return rows
    index = {name: i for i, name in enumerate(class_names)}
    unknown = []
    for row in rows:
        label = row["label"]
        if isinstance(label, str) and label.strip() in index:
            row["label"] = index[label.strip()]
        elif label is not None and as_label(label) is None:
            unknown.append(str(label))
    if unknown:
        names = sorted(set(unknown))
        raise BadInput(f"{uri}: unknown class name(s) {', '.join(repr(n) for n in names[:6])}"
                       f"{' ...' if len(names) > 6 else ''}; the classes are {', '.join(class_names)}")
    return rows


def read_labels(uri: str, pool_uri: str | None = None, class_names=None) -> list[dict]:
    """Rows ``{"id", "label", "line"}`` from CSV, JSON Lines (plain or Ground Truth output),
    a JSON array (Label Studio's export) or parquet; class names become indices. Values
    are otherwise kept as read; validation happens in ``validate_labels``. A row may
    carry ``"skip": True`` (and a ``"reason"``): a ``skip`` column of true/1 in CSV,
    JSON Lines or parquet, or a Ground Truth failure record; read it with ``row.get``."""
    return labels_by_name(_read_label_rows(uri, pool_uri), class_names, uri)


def _csv_row(row: dict, line: int) -> dict:
    skip = is_skip(row.get("skip"))
    label = row.get("label")
    return {"id": row["id"], "label": (label or None) if skip else label, "line": line, "skip": skip,
            "reason": row.get("reason") or None}


def _read_label_rows(uri: str, pool_uri: str | None) -> list[dict]:
    if uri.endswith(".parquet"):
        table = storage.read_parquet(uri)
        if "label" not in table.column_names and "skip" in table.column_names:
            table = table.append_column("label", pa.nulls(table.num_rows, pa.int64()))
        missing = {"id", "label"} - set(table.column_names)
        if missing:
            raise BadInput(f"{uri}: missing column(s) {sorted(missing)}; need id,label (or id,skip)")
        extra = [c for c in ("skip", "reason") if c in table.column_names]
        return [{"id": r["id"], "label": r["label"], "line": i + 1, "skip": is_skip(r.get("skip")),
                 "reason": r.get("reason")} for i, r in enumerate(table.select(["id", "label", *extra]).to_pylist())]
    text = storage.read_bytes(uri).decode()
    if text.lstrip().startswith("["):
        return _read_json_array(text, uri)
    if uri.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        fields = set(reader.fieldnames or ())
        if label_studio.ID_FIELD in fields:
            return [label_studio.flat_row(r, i + 2) for i, r in enumerate(reader)]
        label_studio.check_shape(uri, fields | ({"label"} if "skip" in fields else set()))
        return [_csv_row(r, i + 2) for i, r in enumerate(reader)]
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            rows.append({"id": None, "label": None, "line": i + 1, "error": "not valid JSON"})
            continue
        if "id" in entry and ("label" in entry or "skip" in entry):
            rows.append({"id": entry["id"], "label": entry.get("label"), "line": i + 1,
                         "skip": is_skip(entry.get("skip")), "reason": entry.get("reason")})
        else:
            failure = _ground_truth_failure(entry)
            rows.append({"id": _id_from_ground_truth(entry, pool_uri), "label": _ground_truth_label(entry),
                         "line": i + 1, "skip": failure is not None, "reason": failure})
    return rows


def validate_labels(rows: list[dict], selected_ids, num_classes: int, pool_has_id,
                    id_type: pa.DataType = pa.int64(), already=frozenset(), skips: list | None = None,
                    already_skipped=frozenset()) -> tuple[pa.Table, list[dict]]:
    """Split imported rows into good ``(id, label)`` rows and a list of problems.

    ``selected_ids``: ids this cycle sent out for labeling (same type as pool ids).
    ``pool_has_id``: callable telling whether an id exists in the pool. ``already``:
    keys (``str(id)``) labeled by an earlier delivery, not merged again. Rows marked
    ``skip`` (no label) are appended to ``skips`` as ``{"id", "reason"}``, or are
    problems when ``skips`` is None; ``already_skipped``: keys skipped before."""
    selected = {str(i): i for i in selected_ids}
    good_ids, good_labels, problems, seen = [], [], [], set()
    for row in rows:
        key = None if row["id"] is None else str(row["id"]).strip()
        reason = row.get("error")
        if reason is None:
            if key is None or key == "":
                reason = "missing id"
            elif key in seen:
                reason = "duplicate id in this import"
            elif key not in selected:
                reason = "not selected in this cycle" if pool_has_id(key) else "unknown id"
            elif key in already:
                reason = "already labeled"
            elif key in already_skipped:
                reason = "already skipped"
            elif row.get("skip"):
                reason = ("a skip is not a label here" if skips is None
                          else "both a label and skip" if row["label"] not in (None, "") else None)
            else:
                reason = label_problem(row["label"], num_classes)
        if reason:
            problems.append({"line": row["line"], "id": row["id"], "label": row["label"], "reason": reason})
            continue
        seen.add(key)
        if row.get("skip"):
            skips.append({"id": selected[key], "reason": str(row.get("reason") or "skipped")})
            continue
        good_ids.append(selected[key])
        good_labels.append(as_label(row["label"]))
    table = pa.table({"id": pa.array(good_ids, type=id_type), "label": pa.array(good_labels, type=pa.int64())})
    return table, problems
