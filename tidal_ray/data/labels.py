"""Labels: the one rule for what a label is (an integer class index 0..C-1), for labeled
sets given to ``train``, initial labels, and every import from a labeling tool."""
from __future__ import annotations

import numpy as np

from tidal_ray.data import ids as id_utils
from tidal_ray.errors import BadInput


def as_label(value) -> int | None:
    """A label typed by a person or a tool (``3``, ``"3"``, ``3.0``) as an int, else None."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        return None
    return int(as_float) if as_float.is_integer() else None


def label_problem(value, num_classes: int) -> str | None:
    """Why one imported label cannot be merged, or None when it can."""
    label = as_label(value)
    if label is None:
        return f"label {value!r} is not an integer"
    if not 0 <= label < num_classes:
        return f"label {label} out of range 0..{num_classes - 1}"
    return None


def check_labels(ids, labels, num_classes: int, where: str = "the labeled set") -> tuple[np.ndarray, np.ndarray]:
    """A whole labeled set at once: ``(ids, labels as int64)``, or BadInput with one line
    (empty, lengths differ, not integers, out of range, a repeated id)."""
    if ids is None or labels is None or len(ids) == 0:
        raise BadInput(f"{where} is missing or empty")
    ids, labels = np.asarray(ids), np.asarray(labels)
    if len(ids) != len(labels):
        raise BadInput(f"{where} has {len(ids)} ids and {len(labels)} labels; they must match")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise BadInput(f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise BadInput(f"{int(bad.sum())} labels are outside 0..{num_classes - 1} "
                       f"(e.g. label {labels[bad][0]} for id {ids[bad][0]})")
    id_utils.check_unique(ids, where)
    return ids, labels.astype(np.int64)
