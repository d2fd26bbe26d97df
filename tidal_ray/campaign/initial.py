"""A campaign's initial draw (``campaign init --initial-labels N --initial-draw random|typical``).

``typical`` is TypiClust (Hacohen et al., ICML 2022; ``method.batch.typical_rows``) over an
embedding of a bounded sample of the pool (``SAMPLE_ROWS`` rows drawn by position with the
seed: ``lookup.rows_by_position``, or for an image-file prefix ``lookup.image_ids_by_position``
and those files alone; the pool never comes to the driver whole):
- the ``--weights`` model's features when given (its last feature layer, pooled);
- a features pool's own vectors (standardised, then projected as below when longer than
  ``method.embedding.DIMS``: k-means with K = N costs rows x N x dims);
- otherwise the label-free embedding of ``method.embedding`` (8x8 grayscale thumbnail,
  standardised, seeded random projection to 32-d; the module says why).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from tidal_ray.data import ids as id_utils
from tidal_ray.data.lookup import image_ids_by_position, labels_of, rows_by_position
from tidal_ray.errors import BadInput

DRAWS = ("random", "typical")
SAMPLE_ROWS = 20_000
EMBED_CHUNK = 256
PROGRESS_SECONDS = 10.0   # a progress line at most this often while the sample is read and embedded


def random_ids(spec, n: int, seed: int) -> list:
    """``n`` random ids of the pool (no labels needed): rows drawn by position."""
    if spec.format == "files":
        return image_ids_by_position(spec, n, seed)
    return rows_by_position(spec, n, seed, ["id"]).column("id").to_pylist()


def model_features(backbone: str, num_classes: int, input_shape, weights: str, feature_layers=None,
                   normalize: str = "none"):
    """The ``--weights`` model's embedding, as a function of a chunk of decoded rows: its
    last feature layer, pooled (``models.stage_embedding``, as the cluster batch mode
    embeds), which any model has, a factory's own included."""
    import torch

    from tidal_ray.models import build_model, prepare_input, stage_embedding
    from tidal_ray.models.spec import apply_weights
    from tidal_ray.train.checkpoint import read_weights

    net = build_model(backbone, num_classes, tuple(input_shape), feature_layers, normalize)
    apply_weights(net.backbone, read_weights(weights), num_classes, weights)
    net.eval()

    def embed(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            _, features = net.backbone(net.input_norm(prepare_input(torch.from_numpy(np.ascontiguousarray(x)))))
            return stage_embedding(features[-1]).float().numpy()
    return embed


def typical_ids(spec, n: int, seed: int, input_shape, backbone: str, num_classes: int, weights: str | None = None,
                feature_layers=None, normalize: str = "none", sample_rows: int = SAMPLE_ROWS, log=None) -> list:
    """TypiClust's ``n`` ids, in pick order, from a sample of the pool. BadInput (one line)
    when no embedding can be built from it. ``log`` gets a progress line every
    ``PROGRESS_SECONDS`` while the sample is read (on S3 an image prefix's sample is
    20,000 GETs).

    The sample is decoded and embedded ``EMBED_CHUNK`` rows at a time, so the driver holds
    the sample's stored bytes and its embedding, never the sample at the model's input
    size (20,000 rows of 3x224x224 would be 12 GB)."""
    from tidal_ray.data.decode import decode_batch
    from tidal_ray.data.loader import image_tables
    from tidal_ray.method.batch import typical_rows
    from tidal_ray.method.embedding import label_free_embedding, thumbnail

    if spec.format == "files":  # the drawn files alone, asked for by key
        drawn = image_ids_by_position(spec, max(sample_rows, n), seed)
        chunks, total = image_tables([spec.key_uri(key) for key in drawn], EMBED_CHUNK), len(drawn)
    else:
        table = rows_by_position(spec, max(sample_rows, n), seed, ["id", spec.column])
        chunks = (table.slice(start, EMBED_CHUNK) for start in range(0, table.num_rows, EMBED_CHUNK))
        total = table.num_rows
    if weights:
        embed = model_features(backbone, num_classes, input_shape, weights, feature_layers, normalize)
    else:  # per row here; standardised and projected over the whole sample below
        embed = thumbnail if len(input_shape) == 3 else lambda x: np.asarray(x, np.float32)
    parts, keys, seen = [], [], 0
    started = reported = time.perf_counter()
    for chunk in chunks:
        good, _ = decode_batch(chunk, spec, input_shape)
        if len(good["id"]):
            parts.append(embed(np.asarray(good["x"])))
            keys.append(id_utils.to_numpy(good["id"], spec.id_type))
        seen += chunk.num_rows
        if log and time.perf_counter() - reported >= PROGRESS_SECONDS:
            reported = time.perf_counter()
            log(f"initial draw: read and embedded {seen:,}/{total:,} sample rows, {reported - started:.0f}s")
    decoded = sum(len(k) for k in keys)
    if decoded < n:
        raise BadInput(f"--initial-draw typical: only {decoded} decodable rows in a sample of the pool {spec.uri} "
                       f"for {n} initial labels")
    embedding, keys = np.concatenate(parts), np.concatenate(keys)
    if not weights:
        embedding = label_free_embedding(embedding, seed)
    if not np.isfinite(embedding).all():
        raise BadInput(f"--initial-draw typical: the embedding of the pool {spec.uri} is not finite")
    return keys[typical_rows(embedding, keys, n, seed)].tolist()


def initial_draw(spec, config, input_shape, log=None) -> pa.Table:
    """``--initial-labels N`` drawn at random or typical: with --oracle ``id, label`` (the
    oracle's labels), else a selection to export (``rank, id, score, strategy, predicted_class``).
    ``log``: the typical draw's progress lines."""
    if config.initial_labels > spec.rows:
        raise BadInput(f"--initial-labels {config.initial_labels} is more than the pool's {spec.rows} rows")
    if config.initial_draw == "typical":
        if log:
            log(f"initial draw: the most typical row of each of {config.initial_labels} clusters of a "
                f"{min(max(SAMPLE_ROWS, config.initial_labels), spec.rows):,}-row sample of the pool "
                f"(--initial-draw typical)")
        ids = typical_ids(spec, config.initial_labels, config.seed, input_shape, config.backbone, config.num_classes,
                          config.weights, config.feature_layers, config.normalize, log=log)
    else:
        ids = random_ids(spec, config.initial_labels, config.seed)
    if config.oracle:
        ids, labels = labels_of(spec, ids, input_shape)
        return pa.table({"id": pa.array(ids.tolist(), spec.id_type), "label": pa.array(labels, pa.int64())})
    n = len(ids)
    return pa.table({"rank": pa.array(np.arange(n), pa.int64()), "id": pa.array(ids, spec.id_type),
                     "score": pa.array(np.zeros(n)), "strategy": pa.array([config.initial_draw] * n),
                     "predicted_class": pa.array(np.full(n, -1), pa.int64())})
