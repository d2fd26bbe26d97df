"""Fashion-MNIST arms of issue 19 (benchmarks/al_arms.py) on a tiny idx set: names, batch modes,
warm start, a typical initial set, per-run JSONs and their merge."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import al_arms  # noqa: E402
import al_quality  # noqa: E402
from test_fashion_mnist import write_fashion_dir  # noqa: E402


@pytest.mark.parametrize("name, parts", [
    ("margin", ("margin", "topk", None, False, False, False, False)),
    ("tidal-margin-power-warm", ("tidal-margin", "power", None, False, True, False, False)),
    ("margin-power2-subset10k", ("margin", "power", 2.0, True, False, False, False)),
    ("margin-cluster50-typical", ("margin", "cluster", 50.0, False, False, True, False)),
    ("least-confidence-subset10k", ("least-confidence", "topk", None, True, False, False, False)),
    ("margin-quota-warm", ("margin", "topk", None, False, True, False, True)),
    ("margin-power-quota-warm", ("margin", "power", None, False, True, False, True)),
])
def test_arm_names(name, parts):
    arm = al_arms.parse_arm(name)
    assert (arm["strategy"], arm["mode"], arm["param"], arm["subset"], arm["warm"], arm["typical"],
            arm["quota"]) == parts


@pytest.mark.parametrize("bad", ["margin-warm-subset10k", "bald-power", "margin-topk3", "power",
                                 "margin-cluster-quota", "random-quota", "margin-warm-quota"])
def test_bad_arm_names(bad):
    with pytest.raises(ValueError, match="arm"):
        al_arms.parse_arm(bad)


def test_cluster_covers_every_cluster_where_topk_does_not():
    from tidal_ray.models import build_model

    # Two looks (left half bright, right half bright) in the model's own embedding; the top
    # scores all lie in the first, the top M = 10 k candidates span both.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 20, size=(40, 1, 28, 28)).astype(np.uint8)
    pixels[:20, :, :, :14] = 230
    pixels[20:, :, :, 14:] = 230
    ids = np.arange(40)
    data = {"ids": ids, "pixels": pixels}
    scored = {"id": ids, "margin": np.where(ids < 20, -0.1, -0.5) - ids * 1e-4}
    net = build_model("small_cnn", 10, (1, 28, 28))
    topk = al_arms.select(al_arms.parse_arm("margin"), scored, "margin", 4, 0, 0, net, data, ids)
    cluster = al_arms.select(al_arms.parse_arm("margin-cluster2"), scored, "margin", 4, 0, 0, net, data, ids)
    assert set(topk) == {0, 1, 2, 3}
    assert len(set(cluster)) == 4 and (cluster < 20).sum() == 2 and (cluster >= 20).sum() == 2
    assert set(cluster) == {0, 1, 20, 21}           # best first within each cluster
    power = al_arms.select(al_arms.parse_arm("margin-power1"), scored, "margin", 4, 0, 0)
    assert len(set(power)) == 4


def test_quota_spreads_a_batch_over_the_predicted_classes():
    # The 6 best rows are all predicted class 0; a quota of ceil(6 / 3) = 2 per class takes
    # each class's best 2, under top-k and under power alike.
    ids = np.arange(30)
    scored = {"id": ids, "margin": -ids * 0.01, "predicted_class": np.where(ids < 10, 0, np.where(ids < 20, 1, 2))}
    topk = al_arms.select(al_arms.parse_arm("margin"), scored, "margin", 6, 0, 0)
    quota = al_arms.select(al_arms.parse_arm("margin-quota"), scored, "margin", 6, 0, 0, num_classes=3)
    assert set(topk) == set(range(6))
    assert set(quota) == {0, 1, 10, 11, 20, 21}
    power = al_arms.select(al_arms.parse_arm("margin-power-quota"), scored, "margin", 6, 3, 1, num_classes=3)
    assert len(set(power)) == 6 and np.bincount(scored["predicted_class"][power], minlength=3).tolist() == [2, 2, 2]


def test_runs_write_their_own_json_and_merge(tmp_path):
    data_dir = str(write_fashion_dir(tmp_path / "fashion", n_train=80, n_test=20))
    spec = dict(al_quality.FASHION_REGIMES["cold"], initial=10, k=6, cycles=2, subset=15)
    recipe = dict(al_quality.FASHION_RECIPE, epochs=1, min_steps=2)
    runs = str(tmp_path / "runs")
    arms = ["margin", "margin-power-warm", "margin-cluster3", "random-typical", "margin-subset10k",
            "margin-subset10k-warm"]
    paths = al_arms.run_many("cold", arms, [0], spec, recipe, data_dir, "cpu", runs, jobs=1)
    records = {json.load(open(p))["arm"]: json.load(open(p))["record"] for p in paths}
    for arm, record in records.items():
        assert record["labeled"] == [10, 16, 22] and record["epochs"] == [2, 2, 2]  # 1 batch an epoch: 2 steps
        assert [sum(c) for c in record["selected_class_counts"]] == [6, 6]
    assert records["margin-subset10k"]["scored_rows"] == records["margin-subset10k-warm"]["scored_rows"] == [15, 15]
    assert records["margin"]["accuracy"][0] == records["margin-cluster3"]["accuracy"][0]  # same initial set
    assert records["margin"]["environment"]["torch"] == torch.__version__
    assert records["margin"]["environment"]["threads"] == torch.get_num_threads()
    # an earlier result of another recipe is kept, marked, and no longer summarised
    out = tmp_path / "results"
    out.mkdir()
    old = {"dataset": "fashion-mnist", "regime": "cold", "spec": spec, "recipe": {"steps": 300}, "seeds": 1,
           "cycles": 2, "seconds": 1.0, "summary": {"entropy": {"auc_mean": 0.5}}, "runs": []}
    (out / "fashion-mnist-cold.json").write_text(json.dumps(old))
    merged = al_arms.merge_runs(runs, str(out), "cold", plot=False)
    assert set(merged["summary"]) == set(arms)
    assert {"auc_mean", "auc_per_seed", "final_mean", "seeds"} <= merged["summary"]["margin"].keys()
    saved = json.loads((out / "fashion-mnist-cold.json").read_text())
    assert saved["old_recipe"]["recipe"] == {"steps": 300} and "entropy" in saved["old_recipe"]["summary"]
    assert "margin-power-warm − margin" in [d["pair"] for d in saved["paired_differences"]]
    assert all("environment" in r for r in saved["runs"])  # which runs pair stays readable after the merge
    # a finished run is not redone
    before = os.path.getmtime(paths[0])
    al_arms.run_many("cold", arms[:1], [0], spec, recipe, data_dir, "cpu", runs)
    assert os.path.getmtime(paths[0]) == before
