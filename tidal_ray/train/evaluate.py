"""Test-set accuracy of a checkpoint, read in batches: memory stays within a batch
whatever the test set's size (DESIGN §1)."""
from __future__ import annotations

import pyarrow as pa
import torch

from tidal_ray.data import ids as id_utils
from tidal_ray.train.checkpoint import load_checkpoint, model_from_checkpoint
from tidal_ray.data.decode import column_array, decode_batch
from tidal_ray.errors import BadInput
from tidal_ray.data.loader import iter_tables
from tidal_ray.models import prepare_input
from tidal_ray.data.pool import describe_pool


def accuracy(checkpoint_uri: str, test_uri: str | None) -> float | None:
    """The checkpoint's accuracy on a labeled test set (None without one), streaming the
    set batch by batch; undecodable rows are left out, the first of duplicate ids wins."""
    if not test_uri:
        return None
    state = load_checkpoint(checkpoint_uri)
    net = model_from_checkpoint(state)
    spec = describe_pool(test_uri)
    if not spec.has_label:
        raise BadInput(f"test set {test_uri} has no label column")
    input_shape, seen, correct, total = tuple(state["config"]["input_shape"]), id_utils.SeenIds(), 0, 0
    with torch.no_grad():
        for table in iter_tables(spec, ["id", spec.column, "label"], batch_rows=512):
            good, _ = decode_batch(table, spec, input_shape)
            first = seen.first_seen(good["id"])
            labels = column_array(table, "label").take(pa.array(good["row"][first]))
            labels = labels.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
            logits, _ = net(prepare_input(torch.as_tensor(good["x"][first])))
            correct += int((logits.argmax(1).numpy() == labels).sum())
            total += len(labels)
    return correct / total if total else None
