"""Scoring on a 1-CPU Ray must not deadlock (read tasks vs the scorer actor)."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, ray
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
    from tidal_ray.data.make_pool import make_pool
    from tidal_ray.score.pipeline import score_pool
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    d = sys.argv[1]
    make_pool(d + "/pool", source="digits", shards=3)
    ids, px, y = load_digits()
    _, _, s = train_in_process(TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=1), ids[:100], px[:100], y[:100])
    save_checkpoint(s.last_state, d + "/ck")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    summary = score_pool(d + "/ck", d + "/pool", 10, d + "/out", progress=False)
    print("scored", summary["rows_scored"])
""")


@pytest.mark.slow
def test_scoring_finishes_on_a_one_cpu_ray(tmp_path):
    # Seen with Ray 2.60's default parquet read: hung at 0 rows on one CPU.
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scored 1797" in out.stdout
