"""DESIGN §1, tested: the rows a campaign trains on go from the pool to the Ray Train
workers on Ray Data, never through the driver process.

A campaign's training step runs in a fresh driver process joined to the session's Ray.
The labeled rows decode to 64 MiB of float32 features (the pool's files hold 96 MiB); a
driver that read the pool or held the labeled rows (``load_rows`` + ``from_arrow``, as
before) would grow its peak RSS and its bytes read by at least that. We allow a quarter.
"""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa

from tidal_ray import campaign, storage

ROWS, LABELED, DIM = 6144, 4096, 4096
LABELED_BYTES = LABELED * DIM * 4

DRIVER = r"""
import json, sys
import ray, torch  # imported before the baseline: what the step adds is what we measure
from tidal_ray import campaign, labeled, train_ray, lookup

def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    with open("/proc/self/io") as f:
        io = dict(line.split(":", 1) for line in f)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "hwm": int(fields["VmHWM"].split()[0]) * 1024,
            "rchar": int(io["rchar"])}

root = sys.argv[1]
ray.init(address=sys.argv[2], log_to_driver=False)
before = status()
state = campaign.load_state(root)
campaign.step_train(root, campaign.config_of(state), 0, lambda line: print(line, file=sys.stderr))
after = status()
print(json.dumps({"before": before, "after": after}))
"""


def write_feature_pool(uri):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, ROWS)
    features = rng.random((ROWS, DIM), dtype=np.float32) + labels[:, None].astype(np.float32)
    table = pa.table({"id": pa.array(np.arange(ROWS), pa.int64()),
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), DIM),
                      "label": pa.array(labels, pa.int64())})
    storage.write_parquet(uri, table)


def test_training_rows_never_pass_through_the_driver(ray_local, tmp_path):
    pool, root = str(tmp_path / "pool" / "part-00000.parquet"), str(tmp_path / "campaign")
    write_feature_pool(pool)
    config = campaign.CampaignConfig(pool=str(tmp_path / "pool"), num_classes=2, k=10, cycles=1,
                                     backbone="mlp", epochs=1, batch_size=512, initial_labels=LABELED,
                                     oracle=True, trainer="ray", workers=1)
    campaign.init(root, config, log=lambda _: None)
    assert campaign.labeled_table(root).num_rows == LABELED

    out = subprocess.run([sys.executable, "-c", DRIVER, root, ray_local.get_runtime_context().gcs_address],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = figures["before"], figures["after"]

    metrics = storage.read_json(campaign.cycle_uri(root, 0, "metrics.json"))
    assert metrics["labeled"] == LABELED and metrics["labeled_rejected"] == 0
    assert metrics["train_history"][-1]["epoch"] == 1
    grew, read = after["hwm"] - before["rss"], after["rchar"] - before["rchar"]
    print(f"driver peak RSS grew {grew / 2**20:.1f} MiB and read {read / 2**20:.1f} MiB "
          f"for {LABELED_BYTES / 2**20:.0f} MiB of labeled rows")
    assert grew < LABELED_BYTES / 4, figures
    assert read < LABELED_BYTES / 4, figures
