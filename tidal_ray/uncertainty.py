"""Uncertainty scores: pure functions over logits and probability arrays (NumPy, no I/O).

Higher score = more uncertain = selected first. Every function is safe on one-hot
and near-zero probabilities: ``0 * log 0`` is taken as 0, never NaN.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .errors import BadInput

STRATEGIES = ("tidal-entropy", "tidal-margin", "entropy", "margin", "least-confidence", "bald", "random")


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
    """Uniform [0, 1) from a hash of (seed, id): the same for an id on any number of shards."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, sample_id in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def score_all(
    logits: np.ndarray,
    td_logits: np.ndarray,
    ids,
    seed: int = 0,
    mc_probs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every strategy's score for a batch, plus the backbone's predicted class."""
    probs = softmax(logits.astype(np.float64))
    td_probs = softmax(td_logits.astype(np.float64))
    predicted = logits.argmax(axis=-1)
    scores = {
        "predicted_class": predicted.astype(np.int64),
        "tidal-entropy": entropy(td_probs),
        "tidal-margin": margin_at_class(td_probs, predicted),
        "entropy": entropy(probs),
        "margin": margin(probs),
        "least-confidence": least_confidence(probs),
        "random": random_scores(ids, seed),
    }
    if mc_probs is not None:
        scores["bald"] = bald(mc_probs.astype(np.float64))
    return scores


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise BadInput(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return name
