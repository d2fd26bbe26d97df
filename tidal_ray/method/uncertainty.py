"""Uncertainty scores: pure functions over logits and probability arrays (NumPy, no I/O).

Higher score = more uncertain = selected first. Every function is safe on one-hot
and near-zero probabilities: ``0 * log 0`` is taken as 0, never NaN.
"""
from __future__ import annotations

import numpy as np

from tidal_ray.errors import BadInput
from tidal_ray.method.hashing import hash64

STRATEGIES = ("tidal-entropy", "tidal-margin", "entropy", "margin", "least-confidence", "bald", "random")
# What `score`, `campaign init` and the library use unless told: margin led every
# Fashion-MNIST regime, and tidal-entropy with top-k trailed random (benchmarks/README.md).
DEFAULT_STRATEGY = "margin"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    """-sum_c p_c log p_c over the last axis."""
    logp = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logp).sum(axis=-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """-(p_(1) - p_(2)): the gap between the two largest probabilities, negated."""
    top2 = np.partition(probs, -2, axis=-1)[..., -2:]
    return -(top2[..., 1] - top2[..., 0])


def least_confidence(probs: np.ndarray) -> np.ndarray:
    return 1.0 - probs.max(axis=-1)


def margin_at_class(probs: np.ndarray, predicted_class: np.ndarray) -> np.ndarray:
    """-(p_yhat - max_{c != yhat} p_c): the TiDAL margin, at the backbone's predicted class."""
    rows = np.arange(len(probs))
    at_pred = probs[rows, predicted_class]
    others = probs.copy()
    others[rows, predicted_class] = -np.inf
    return -(at_pred - others.max(axis=-1))


def bald(mc_probs: np.ndarray) -> np.ndarray:
    """Mutual information from T Monte-Carlo passes, ``mc_probs`` shaped (T, N, C):
    H(mean_t p_t) - mean_t H(p_t)."""
    return entropy(mc_probs.mean(axis=0)) - entropy(mc_probs).mean(axis=0)


def random_scores(ids, seed: int) -> np.ndarray:
    """Uniform [0, 1) from a hash of (seed, id) (``hashing.hash64``, top 53 bits): the same
    for an id on any number of shards."""
    return (hash64(np.asarray(ids), seed) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def score(
    names,
    logits: np.ndarray,
    td_logits: np.ndarray,
    ids,
    seed: int = 0,
    mc_probs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The scores of the strategies ``names`` for a batch (only those are computed),
    plus the backbone's predicted class. ``bald`` needs ``mc_probs``."""
    names = tuple(names)
    predicted = logits.argmax(axis=-1)
    out = {"predicted_class": predicted.astype(np.int64)}
    if any(n in names for n in ("entropy", "margin", "least-confidence")):
        probs = softmax(logits.astype(np.float64))
    if any(n in names for n in ("tidal-entropy", "tidal-margin")):
        td_probs = softmax(td_logits.astype(np.float64))
    for name in names:
        if name == "tidal-entropy":
            out[name] = entropy(td_probs)
        elif name == "tidal-margin":
            out[name] = margin_at_class(td_probs, predicted)
        elif name == "entropy":
            out[name] = entropy(probs)
        elif name == "margin":
            out[name] = margin(probs)
        elif name == "least-confidence":
            out[name] = least_confidence(probs)
        elif name == "random":
            out[name] = random_scores(ids, seed)
        elif name == "bald":
            if mc_probs is None:
                raise ValueError("bald needs MC-dropout probabilities")
            out[name] = bald(mc_probs.astype(np.float64))
        else:
            check_strategy(name)
    return out


def score_all(
    logits: np.ndarray,
    td_logits: np.ndarray,
    ids,
    seed: int = 0,
    mc_probs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every strategy's score for a batch (bald only with ``mc_probs``), plus the
    backbone's predicted class."""
    names = [n for n in STRATEGIES if n != "bald" or mc_probs is not None]
    return score(names, logits, td_logits, ids, seed, mc_probs)


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise BadInput(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return name
