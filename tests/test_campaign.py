"""Labeling campaigns end to end: S3 state, the oracle, crashes, imports, the lock."""
import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from tidal_ray.campaign import cycle as campaign
from tidal_ray.data import storage
from tidal_ray.cli import main
from tidal_ray.demo import write_digits_split

FAST = dict(num_classes=10, backbone="small_cnn", epochs=4, batch_size=32, seed=0)


def all_labels(root):
    table = campaign.labeled_table(root)
    return table.column("id").to_pylist(), table.column("label").to_pylist()


def test_three_oracle_cycles_on_s3(ray_local, s3_bucket, capsys):
    pool, test = write_digits_split(f"{s3_bucket}/data")
    root = f"{s3_bucket}/campaigns/digits"
    config = campaign.CampaignConfig(pool=pool, test=test, k=40, cycles=3, initial_labels=30, oracle=True,
                                     trainer="ray", workers=1, **FAST)
    campaign.init(root, config)
    state = campaign.run(root)
    assert state["status"] == "done" and state["cycle"] == 3

    ids, _ = all_labels(root)
    assert len(ids) == len(set(ids)) == 30 + 3 * 40                     # no id labeled twice
    selections = [storage.read_parquet(campaign.cycle_uri(root, c, "selection.parquet")) for c in range(3)]
    chosen = [s.column("id").to_pylist() for s in selections]
    assert all(len(c) == 40 for c in chosen)
    assert len(set(sum(chosen, []))) == 120                              # no id selected twice
    initial = storage.read_parquet(campaign.labels_uri(root, 0)).column("id").to_pylist()
    assert not set(initial) & set(sum(chosen, []))                       # labeled ids never selected
    labeled_counts = [storage.read_json(campaign.cycle_uri(root, c, "metrics.json"))["labeled"] for c in range(4)]
    assert labeled_counts == [30, 70, 110, 150]                          # grows by k each cycle

    manifest = storage.read_bytes(campaign.cycle_uri(root, 0, "export", "ground-truth-input.manifest")).decode()
    assert [json.loads(line)["tidal-ray-id"] for line in manifest.splitlines()] == chosen[0]

    report = storage.read_bytes(f"{root}/report/report.md").decode()
    assert "| 3 | 150 |" in report
    png = storage.read_bytes(f"{root}/report/learning_curve.png")
    local_png = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"curve-{os.getpid()}.png")
    with open(local_png, "wb") as f:
        f.write(png)
    with Image.open(local_png) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert not storage.exists(f"{root}/lock.json")                       # released


def run_driver(root, kill_at=None):
    env = dict(os.environ)
    env.pop(campaign.KILL_AT_ENV, None)
    if kill_at:
        env[campaign.KILL_AT_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "tidal_ray.cli", "campaign", "run", root],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_driver_killed_at_two_steps_resumes_without_duplicates(tmp_path):
    pool, test = write_digits_split(str(tmp_path / "data"))
    root = str(tmp_path / "campaign")
    config = campaign.CampaignConfig(pool=pool, test=test, k=25, cycles=3, initial_labels=20, oracle=True,
                                     trainer="local", **FAST)
    campaign.init(root, config)

    first = run_driver(root, kill_at="1:select")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert campaign.load_state(root)["cycle"] == 1 and campaign.load_state(root)["step"] == "select"
    assert storage.exists(f"{root}/lock.json")                           # left behind by the killed driver

    second = run_driver(root, kill_at="2:wait-for-labels")
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert campaign.load_state(root)["step"] == "wait-for-labels"

    last = run_driver(root)
    assert last.returncode == 0, last.stderr[-2000:]
    assert campaign.load_state(root)["status"] == "done"
    ids, _ = all_labels(root)
    assert len(ids) == len(set(ids)) == 20 + 3 * 25
    chosen = sum((storage.read_parquet(campaign.cycle_uri(root, c, "selection.parquet")).column("id").to_pylist()
                  for c in range(3)), [])
    assert len(chosen) == len(set(chosen)) == 75


def test_imports_merge_good_rows_and_list_bad_ones(ray_local, tmp_path, capsys):
    pool, test = write_digits_split(str(tmp_path / "data"))
    root = str(tmp_path / "campaign")
    initial = tmp_path / "initial.csv"
    initial.write_text("id,label\n" + "".join(f"{i},{label}\n" for i, label in
                                              zip(*_pool_labels(pool, 30))))
    assert main(["campaign", "init", root, "--pool", pool, "--num-classes", "10", "--k", "10", "--cycles", "2",
                 "--epochs", "4", "--min-steps", "0", "--trainer", "local", "--initial-labels-file", str(initial)]) == 0

    assert main(["campaign", "run", root]) == 0
    assert campaign.load_state(root)["status"] == "waiting-for-labels"
    selected = storage.read_parquet(campaign.cycle_uri(root, 0, "selection.parquet")).column("id").to_pylist()
    truth = dict(zip(*_pool_labels(pool)))

    # Cycle 0 comes back as a SageMaker Ground Truth output manifest (one row with no label).
    output = tmp_path / "output.manifest"
    lines = [{"source": str(i), "tidal-ray-id": i, "digits-job": truth[i],
              "digits-job-metadata": {"class-name": str(truth[i]), "type": "groundtruth/image-classification"}}
             for i in selected[:9]]
    lines.append({"source": str(selected[9]), "tidal-ray-id": selected[9]})
    output.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    capsys.readouterr()
    assert main(["campaign", "import-labels", root, str(output)]) == 0
    out = capsys.readouterr().out
    assert "merged 9 labels for cycle 0 (9 of 10 selected samples labeled); 1 rows not merged; 1 still to label" in out
    assert main(["campaign", "run", root]) == 0                          # a partial delivery: still waiting
    assert "waiting for labels (9 of 10 selected samples labeled)" in capsys.readouterr().out
    assert campaign.load_state(root)["cycle"] == 0
    last = tmp_path / "last.csv"
    last.write_text(f"id,label\n{selected[0]},{truth[selected[0]]}\n{selected[9]},{truth[selected[9]]}\n")
    assert main(["campaign", "import-labels", root, str(last)]) == 0
    out = capsys.readouterr().out
    assert "already labeled" in out and "merged 1 labels" in out and "(10 of 10 selected samples labeled)" in out
    assert main(["campaign", "run", root]) == 0
    assert campaign.load_state(root)["cycle"] == 1

    # Cycle 1 comes back as a CSV with bad rows.
    selected1 = storage.read_parquet(campaign.cycle_uri(root, 1, "selection.parquet")).column("id").to_pylist()
    assert not set(selected1) & set(selected)                            # the unlabeled one stays excluded too
    not_selected = next(i for i in truth if i not in selected1)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("id,label\n"
                          + "".join(f"{i},{truth[i]}\n" for i in selected1[:8])
                          + "999999,3\n"                                # unknown id
                          + f"{selected1[8]},10\n"                      # label out of range
                          + f"{not_selected},1\n")                       # a pool id not selected
    capsys.readouterr()
    assert main(["campaign", "import-labels", root, str(labels_csv)]) == 0
    out = capsys.readouterr().out
    assert "999999" in out and "unknown id" in out
    assert "label out of range 0..9" in out.replace("label 10 out", "label out")
    assert "not selected in this cycle" in out
    merged = storage.read_parquet(campaign.delivery_uri(root, 2, 0)).to_pylist()
    assert merged == [{"id": i, "label": truth[i]} for i in selected1[:8]]
    assert main(["campaign", "import-labels", root, str(labels_csv)]) == 0  # the same delivery again
    assert "merged 0 labels" in capsys.readouterr().out
    assert not storage.exists(campaign.delivery_uri(root, 2, 1))          # nothing new, nothing rewritten
    assert storage.read_parquet(campaign.delivery_uri(root, 2, 0)).to_pylist() == merged


def _pool_labels(pool, n=None):
    from tidal_ray.data.loader import load_rows

    ids, _, labels, _ = load_rows(pool)
    return ids[:n].tolist(), labels[:n].tolist()


def test_second_driver_is_refused(s3_bucket, capsys):
    root = f"{s3_bucket}/campaigns/locked"
    storage.write_json(campaign.state_uri(root), {"config": {}, "cycle": 0, "step": "train", "status": "running"})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tidal_ray.campaign.lock import CampaignLock\n"
         "with CampaignLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", root],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["campaign", "run", root]) == 1
        err = capsys.readouterr().err.strip()
        assert "in use by another driver" in err and f"pid {holder.pid}" in err and err.count("\n") == 0
    finally:
        holder.kill()
        holder.wait()
