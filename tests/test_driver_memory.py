"""DESIGN §1, tested: the rows a campaign trains on go from the pool to the Ray Train
workers on Ray Data, never through the driver process.

A fresh driver process joined to the session's Ray runs two campaigns' training steps
on the same pool: first one with 64 labels (which pays for everything a first training
costs a driver: lazy imports, Ray Train and Ray Data start-up), then one with 4,096,
whose rows decode to 64 MiB of float32 features (the pool's file holds 96 MiB). A driver
that read the pool or held the labeled rows (``load_rows`` + ``from_arrow``, as before)
would grow its peak RSS and its bytes read in the second step by at least 64 MiB. We
allow a quarter of that.
"""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa

from tidal_ray.campaign import cycle as campaign
from tidal_ray.data import storage

ROWS, LABELED, DIM = 6144, 4096, 4096
LABELED_BYTES = LABELED * DIM * 4

DRIVER = r"""
import json, sys
import ray, torch  # imported before the baseline: what the step adds is what we measure
from tidal_ray.campaign import cycle as campaign
from tidal_ray.train import ingest as labeled
from tidal_ray.train import on_ray as train_ray
from tidal_ray.data import lookup

def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    with open("/proc/self/io") as f:
        io = dict(line.split(":", 1) for line in f)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "hwm": int(fields["VmHWM"].split()[0]) * 1024,
            "rchar": int(io["rchar"])}

ray.init(address=sys.argv[3], log_to_driver=False)
figures = {}
for name, root in (("small", sys.argv[1]), ("large", sys.argv[2])):
    state = campaign.load_state(root)
    campaign.step_train(root, campaign.config_of(state), 0, lambda line: print(line, file=sys.stderr))
    figures[name] = status()
print(json.dumps(figures))
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
    pool = tmp_path / "pool"
    write_feature_pool(str(pool / "part-00000.parquet"))
    roots = [str(tmp_path / "small"), str(tmp_path / "large")]
    for root, labels in zip(roots, (64, LABELED)):
        config = campaign.CampaignConfig(pool=str(pool), num_classes=2, k=10, cycles=1, backbone="mlp", epochs=1,
                                         batch_size=512, initial_labels=labels, oracle=True, trainer="ray", workers=1,
                                         initial_draw="random")  # what is measured is training's read
        campaign.init(root, config, log=lambda _: None)

    out = subprocess.run([sys.executable, "-c", DRIVER, *roots, ray_local.get_runtime_context().gcs_address],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = figures["small"], figures["large"]

    metrics = storage.read_json(campaign.cycle_uri(roots[1], 0, "metrics.json"))
    assert metrics["labeled"] == LABELED and metrics["labeled_rejected"] == 0
    assert metrics["train_history"][-1]["epoch"] == 1
    grew, read = large["hwm"] - small["hwm"], large["rchar"] - small["rchar"]
    print(f"driver peak RSS {small['hwm'] / 2**20:.0f} MiB after 64 labels, grew {grew / 2**20:.1f} MiB and read "
          f"{read / 2**20:.1f} MiB for {LABELED_BYTES / 2**20:.0f} MiB of labeled rows")
    assert grew < LABELED_BYTES / 4, figures
    assert read < LABELED_BYTES / 4, figures
