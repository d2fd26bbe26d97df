"""The selection-quality protocol at a tiny size, so CI keeps it working."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import al_quality  # noqa: E402


def test_tiny_protocol_runs_and_reports(tmp_path):
    recipe = dict(al_quality.RECIPE, epochs=3)
    result = al_quality.run_regime("imbalanced", seeds=1, cycles=2, strategies=["tidal-margin", "random"],
                                   out_dir=str(tmp_path), processes=1, recipe=recipe)
    saved = json.loads((tmp_path / "imbalanced.json").read_text())
    assert saved["summary"].keys() == {"tidal-margin", "random"}
    for run in saved["runs"]:
        assert run["labeled"] == [60, 90, 120]                      # +k per cycle
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"]) and len(run["accuracy"]) == 3
        assert [sum(c) for c in run["selected_class_counts"]] == [30, 30]
    assert result["runs"][0]["pool_size"] < 1397 * 0.5               # the imbalanced pool is smaller
    assert (tmp_path / "imbalanced.png").stat().st_size > 1000
    assert "| tidal-margin |" in (tmp_path / "imbalanced.md").read_text()
