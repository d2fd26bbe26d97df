"""Label Studio, both ways: how its tasks reach the pictures, what the labeler is told to
set up (the export's README.txt), and reading its JSON, JSON_MIN and CSV exports.

Local pictures are served by Label Studio's Local Files serving: a task's image is
``/data/local-files/?d=<path relative to the document root>``, and Label Studio serves
it only below a Local Files storage of the project, a strict subdirectory of the
document root. The storage is the directory that holds the pictures (the campaign
directory for rendered samples, the pool directory for image-file pools); the default
document root is its parent, the narrowest root that Label Studio accepts for it.

Exports come back with our id in ``tidal-ray-id``. JSON_MIN and CSV also carry Label
Studio's own task ``id``, which is never a pool id; they drop skipped tasks, which only
the full JSON export carries (an annotation with ``was_cancelled``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from urllib.parse import quote

from tidal_ray.errors import BadInput

ID_FIELD = "tidal-ray-id"
FROM_NAME = "label"                      # the Choices control: JSON_MIN and CSV name the label column after it
LOCAL_FILES_URL = "/data/local-files/?d="
LS_ONLY_FIELDS = ("annotation_id", "annotator")   # in every JSON_MIN / CSV row of Label Studio


@dataclass(frozen=True)
class LocalFiles:
    """Label Studio's Local Files settings for pictures under ``storage_path``."""
    document_root: str
    storage_path: str

    def url(self, path: str) -> str:
        return LOCAL_FILES_URL + quote(os.path.relpath(os.path.abspath(path), self.document_root))


def local_files(image_dir: str, document_root: str | None = None) -> LocalFiles:
    """The settings for pictures under ``image_dir`` (a local directory); ``document_root``
    must hold it strictly (Label Studio refuses a storage equal to the root)."""
    storage_path = os.path.abspath(image_dir)
    root = os.path.abspath(document_root) if document_root else os.path.dirname(storage_path)
    if storage_path == root or not storage_path.startswith(root.rstrip("/") + "/"):
        raise BadInput(f"--document-root {document_root or root}: the pictures under {storage_path} must be in a "
                       f"subdirectory of Label Studio's document root")
    return LocalFiles(root, storage_path)


def settings_lines(serving: LocalFiles | None, s3_images: bool, presign_seconds: int | None) -> list[str]:
    """What Label Studio needs to show these tasks' pictures, one setting a line."""
    if serving:
        return ["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true",
                f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={serving.document_root}",
                f"Local Files storage to add to the project (do not sync it): {serving.storage_path}"]
    if s3_images and presign_seconds:
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + presign_seconds))
        return [f"images are presigned HTTPS URLs, valid until {until}; 'tidal-ray campaign export' makes fresh ones"]
    if s3_images:
        return ["images are s3:// URIs: add an Amazon S3 source storage for their bucket to the project "
                "(Use pre-signed URLs on; do not sync it), or init the campaign with --presign SECONDS"]
    return []


def readme(settings: list[str], serving: LocalFiles | None, has_config: bool) -> str:
    """The export's README.txt: how to label these tasks in Label Studio and bring the labels back."""
    config = ("paste label-studio-config.xml (Settings > Labeling Interface > Code)" if has_config
              else "a Choices control named \"label\" on the image (or text), one Choice per class")
    start = (f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="
             f"{serving.document_root} label-studio start" if serving else "label-studio start")
    lines = [
        "Label these samples in Label Studio",
        "",
        "label-studio-tasks.json: one task per selected sample. data.image is the picture (data.text the id",
        f"when there is none), data.{ID_FIELD} the pool id (import-labels reads labels by it), and the",
        "model's guess is a prediction (a pre-annotation the labeler can accept or change).",
        "",
        "Settings:",
        *[f"  {line}" for line in settings or ["none needed"]],
        "",
        f"1. Start Label Studio: {start}",
        f"2. Create a project; labeling interface: {config}.",
    ]
    if serving:
        lines += ["3. Settings > Cloud Storage > Add Source Storage > Local files, absolute local path",
                  f"   {serving.storage_path} ; save it without syncing (a sync adds a task per file,",
                  "   without our id). It lets Label Studio serve the pictures below it."]
    else:
        lines += ["3. (S3 storage: see Settings above.)"]
    lines += [
        "4. Import label-studio-tasks.json (Import > Upload Files).",
        "5. Label. Skip a sample you cannot label: the JSON export records it as a skip.",
        "6. Export > JSON (JSON_MIN and CSV work too, but they leave skipped tasks out), then",
        "   tidal-ray campaign import-labels CAMPAIGN_URI EXPORT_FILE",
        "   Partial exports add up; the cycle moves on when every selected sample is in.",
    ]
    return "\n".join(lines) + "\n"


# ---- exports coming back -------------------------------------------------------------------

def _choice(task: dict):
    """The class chosen in a full-export task: the last annotation not cancelled; None and
    whether every annotation was cancelled (a skip) when there is none."""
    annotations = task.get("annotations") or []
    for annotation in reversed(annotations):
        if annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            choices = (result.get("value") or {}).get("choices")
            if choices:
                return choices[0], False
    return None, bool(annotations) and all(a.get("was_cancelled") for a in annotations)


def task_row(task: dict, line: int) -> dict:
    """A row of the full JSON export (``data``, ``annotations``)."""
    sample_id = (task.get("data") or {}).get(ID_FIELD)
    label, skipped = _choice(task)
    if sample_id is None:
        return {"id": None, "label": label, "line": line,
                "error": f"Label Studio task {task.get('id')} has no data.{ID_FIELD}"}
    if skipped:
        return {"id": sample_id, "label": None, "line": line, "skip": True}
    return {"id": sample_id, "label": label, "line": line,
            **({"error": "no choice in its annotations"} if label is None else {})}


def min_label(value):
    """JSON_MIN writes one choice as a string, several as ``{"choices": [...]}``."""
    if isinstance(value, dict):
        value = value.get("choices")
    if isinstance(value, list):
        return value[0] if value else None
    return value


def flat_row(entry: dict, line: int) -> dict:
    """A JSON_MIN row (or a CSV row as a dict), or a plain ``{"id", "label"}`` object."""
    if ID_FIELD in entry:
        return {"id": entry[ID_FIELD], "label": min_label(entry.get(FROM_NAME)), "line": line}
    if any(field in entry for field in LS_ONLY_FIELDS):
        return {"id": None, "label": None, "line": line,
                "error": f"Label Studio task {entry.get('id')} has no {ID_FIELD}"}
    return {"id": entry.get("id"), "label": entry.get("label"), "line": line}


def check_shape(uri: str, fields: set) -> None:
    """Refuse a file that carries neither our id nor a plain ``id,label`` shape; a Label
    Studio export whose only id is Label Studio's own is refused too."""
    if ID_FIELD in fields:
        return
    if "data" in fields:
        raise BadInput(f"{uri}: Label Studio tasks without data.{ID_FIELD}: not tasks exported by tidal-ray")
    if any(field in fields for field in LS_ONLY_FIELDS):
        raise BadInput(f"{uri}: a Label Studio export without {ID_FIELD}: its 'id' is Label Studio's task id, "
                       f"not a pool id; import the tasks from label-studio-tasks.json")
    if not {"id", "label"} <= fields:
        raise BadInput(f"{uri}: neither {ID_FIELD} nor id,label: not a labels file")
