"""Every score against an independent NumPy computation, on awkward inputs too."""
import numpy as np
import pytest

from tidal_ray.method import uncertainty as U


def ref_entropy(p):
    out = np.zeros(len(p))
    for i, row in enumerate(p):
        out[i] = -sum(x * np.log(x) for x in row if x > 0)
    return out


def ref_margin(p):
    s = np.sort(p, axis=1)
    return -(s[:, -1] - s[:, -2])


def ref_margin_at(p, yhat):
    out = np.zeros(len(p))
    for i, row in enumerate(p):
        others = [row[c] for c in range(len(row)) if c != yhat[i]]
        out[i] = -(row[yhat[i]] - max(others))
    return out


def awkward_probs(rng, n=200, c=7):
    logits = rng.normal(size=(n, c)) * rng.choice([0.1, 1, 10, 100], size=(n, 1))
    p = U.softmax(logits)
    p[:10] = np.eye(c)[rng.integers(0, c, 10)]          # one-hot
    p[10:20] = 1.0 / c                                  # uniform: every class tied
    p[20:30, :2] = 0.5; p[20:30, 2:] = 0.0              # two-way tie, zeros elsewhere
    p[30:40] = np.eye(c)[0] * (1 - 1e-300) + 1e-301     # near-zero entries
    return p


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    p = awkward_probs(rng)
    yhat = rng.integers(0, p.shape[1], len(p))
    np.testing.assert_allclose(U.entropy(p), ref_entropy(p), atol=1e-12)
    np.testing.assert_allclose(U.margin(p), ref_margin(p), atol=1e-12)
    np.testing.assert_allclose(U.least_confidence(p), 1 - p.max(1), atol=1e-12)
    np.testing.assert_allclose(U.margin_at_class(p, yhat), ref_margin_at(p, yhat), atol=1e-12)
    for f in (U.entropy, U.margin, U.least_confidence):
        assert np.isfinite(f(p)).all()


def test_known_values():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(U.entropy(p), [0.0, np.log(2), np.log(3)])
    np.testing.assert_allclose(U.margin(p), [-1.0, 0.0, 0.0])
    np.testing.assert_allclose(U.margin_at_class(p, np.array([1, 1, 2])), [1.0, 0.0, 0.0])


def test_score_all_from_extreme_logits_has_no_nan():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)) * 1e4          # softmax saturates to one-hot
    td_logits = rng.normal(size=(50, 10)) * 1e4
    td_logits[:5] = -np.inf
    td_logits[:5, 3] = 0.0                             # exact one-hot through -inf logits
    out = U.score_all(logits, td_logits, ids=np.arange(50), seed=1)
    for name in ("tidal-entropy", "tidal-margin", "entropy", "margin", "least-confidence", "random"):
        assert np.isfinite(out[name]).all(), name
    np.testing.assert_array_equal(out["predicted_class"], logits.argmax(1))
    np.testing.assert_allclose(out["tidal-entropy"], ref_entropy(U.softmax(td_logits)), atol=1e-9)
    np.testing.assert_allclose(out["tidal-margin"], ref_margin_at(U.softmax(td_logits), logits.argmax(1)), atol=1e-9)


def test_bald_matches_reference():
    rng = np.random.default_rng(3)
    mc = U.softmax(rng.normal(size=(8, 30, 5)) * 3)
    mean = mc.mean(0)
    expected = ref_entropy(mean) - np.mean([ref_entropy(m) for m in mc], axis=0)
    np.testing.assert_allclose(U.bald(mc), expected, atol=1e-12)
    same = np.repeat(mc[:1], 8, axis=0)                # no disagreement between passes
    np.testing.assert_allclose(U.bald(same), 0.0, atol=1e-12)


def test_random_scores_depend_only_on_seed_and_id():
    ids = np.arange(1000)
    whole = U.random_scores(ids, seed=7)
    sharded = np.concatenate([U.random_scores(ids[:300], 7), U.random_scores(ids[300:], 7)])
    np.testing.assert_array_equal(whole, sharded)
    assert not np.array_equal(whole, U.random_scores(ids, seed=8))
    assert 0 <= whole.min() and whole.max() < 1 and abs(whole.mean() - 0.5) < 0.05
    assert U.random_scores(np.array(["a", "b"]), 0)[0] != U.random_scores(np.array(["a", "b"]), 0)[1]


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown strategy 'entropi'"):
        U.check_strategy("entropi")
