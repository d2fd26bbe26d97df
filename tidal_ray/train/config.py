"""What a training run is: its config, and every check of the user's recipe and labeled set
made before any row is read or any worker starts (BadInput, one line)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tidal_ray.data.labels import check_labels
from tidal_ray.errors import BadInput
from tidal_ray.models import build_backbone
from tidal_ray.models.spec import apply_weights, name_list
from tidal_ray.train.checkpoint import read_weights


@dataclass
class TrainConfig:
    num_classes: int
    input_shape: tuple[int, ...]    # what decoding produces: (C, H, W) images, (D,) features
    backbone: str = "small_cnn"     # the model spec: a built-in name or MODULE:FACTORY
    feature_layers: tuple[str, ...] | None = None  # MODULE:FACTORY layers feeding the TD module
    weights: str | None = None      # initial state_dict (local or s3://), head re-initialised if it does not fit
    normalize: str = "none"         # none | imagenet | MEAN,STD, applied by the network (models.InputNorm)
    augment: bool = False           # random crop + horizontal flip of training batches
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lam: float = 1.0
    seed: int = 0
    # A checkpoint every this many epochs, and always after the last. Under Ray Train each
    # one is persisted to storage (about a second even for a small model), so not every epoch.
    checkpoint_every: int = 10
    optimizer: str = "adam"         # adam | sgd (momentum 0.9, the reference code's)
    lr_drop_at: float | None = None  # a x0.1 step at this fraction of the epochs; None = cosine decay
    # Warm start: the previous cycle's checkpoint (model.pt or its directory); the backbone
    # and TD module start from its weights, the optimizer and the TD table start fresh.
    init_checkpoint: str | None = None

OPTIMIZERS = ("adam", "sgd")
MIN_STEPS = 300


def scaled_epochs(labeled: int, batch_size: int, epochs: int, min_steps: int = MIN_STEPS) -> int:
    """The scaled recipe: at least ``epochs`` epochs and never fewer than ``min_steps``
    optimiser steps, so a small labeled set still trains enough and a large one is not cut
    to a fraction of an epoch."""
    batches = max(1, math.ceil(labeled / max(batch_size, 1)))
    return max(int(epochs), math.ceil(max(int(min_steps), 0) / batches), 1)


def resolve_recipe(spec, num_classes: int, model: str | None = None, feature_layers=None, weights=None,
                   image_size=None, channels=None, normalize: str = "none", log=print):
    """The input and the model for a pool (``pool.PoolSpec``) under the user's recipe,
    every part checked before any row is read: ``(model spec, input_shape)``. The
    model defaults to the pool's (``models.default_model``)."""
    from tidal_ray.models import default_model, parse_normalize
    from tidal_ray.data.pool import input_shape_for

    input_shape = input_shape_for(spec, image_size, channels)
    parse_normalize(normalize, input_shape[0] if len(input_shape) == 3 else None)
    model = model or default_model(input_shape)
    check_model(model, num_classes, input_shape, feature_layers, weights, log)
    return model, tuple(input_shape)


def validate_labeled(config: TrainConfig, ids, x, y, num_workers: int = 1):
    """Check a labeled set held as arrays against the config before anything starts;
    returns ``(ids, x, y)`` as arrays. Raises BadInput with a one-line message."""
    if ids is None or x is None or y is None or len(ids) == 0:
        raise BadInput("the labeled set is missing or empty")
    ids, x, y = np.asarray(ids), np.asarray(x), np.asarray(y)
    if not len(ids) == len(x) == len(y):
        raise BadInput(f"the labeled set has {len(ids)} ids, {len(x)} inputs and {len(y)} labels; they must match")
    if x.dtype not in (np.uint8, np.float32):
        raise BadInput(f"inputs must be uint8 pixels or float32 features, got {x.dtype}")
    if tuple(x.shape[1:]) != tuple(config.input_shape):
        raise BadInput(f"inputs have shape {tuple(x.shape[1:])} per sample, expected {tuple(config.input_shape)}")
    if x.dtype == np.float32 and not np.isfinite(x).all():
        raise BadInput("the labeled features contain NaN or inf")
    ids, y = validate_labels(config, ids, y, num_workers)
    return ids, x, y


def validate_labels(config: TrainConfig, ids, y, num_workers: int = 1):
    """Check the labeled ids and labels (the inputs stay in the pool) against the config
    before anything starts; returns ``(ids, y)`` as arrays. Raises BadInput with a one-line message."""
    if ids is None or y is None or len(ids) == 0:
        raise BadInput("the labeled set is missing or empty")
    build_backbone(config.backbone, config.num_classes, config.input_shape,  # unknown name, shape it can't take
                   config.feature_layers)
    ids, y = check_labels(ids, y, config.num_classes)
    if num_workers < 1:
        raise BadInput(f"workers must be at least 1, got {num_workers}")
    # Every worker trains on a shard; BatchNorm needs at least two rows in it.
    if len(ids) < 2 * num_workers:
        raise BadInput(f"{len(ids)} labeled samples are too few for {num_workers} workers (need 2 per worker)")
    if config.epochs < 1 or config.batch_size < 1:
        raise BadInput(f"epochs and batch size must be positive, got {config.epochs} and {config.batch_size}")
    if config.optimizer not in OPTIMIZERS:
        raise BadInput(f"optimizer {config.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
    if config.lr_drop_at is not None and not 0 < config.lr_drop_at <= 1:
        raise BadInput(f"lr_drop_at {config.lr_drop_at}: must be a fraction of the epochs in (0, 1]")
    return ids, y


def check_model(name: str, num_classes: int, input_shape, feature_layers=None, weights: str | None = None,
                log=print) -> None:
    """Everything about a model spec that can be bad input, before any data is read: the
    module imports, the factory returns an nn.Module whose logits are (batch, C) on a
    dummy batch, the feature layers exist, the weights fit (head aside, named in one
    warning line)."""
    backbone = build_backbone(name, num_classes, input_shape, feature_layers)
    if weights:
        head = apply_weights(backbone, read_weights(weights), num_classes, weights)
        if head:
            log(f"warning: --weights {weights}: classifier head {name_list(head)} does not fit {num_classes} "
                f"classes; re-initialised")
