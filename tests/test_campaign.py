"""Labeling campaigns end to end: S3 state, the oracle, crashes, imports, the lock."""
import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pytest
from PIL import Image

from tidal_ray.campaign import cycle as campaign
from tidal_ray.campaign import state as campaign_state
from tidal_ray.campaign.labeling import read_labels, validate_labels
from tidal_ray.campaign.lock import read_lease
from tidal_ray.data import storage
from tidal_ray.data.make_pool import make_pool
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
                                     trainer="ray", workers=1, warm_start=True, **FAST)
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
    metrics = [storage.read_json(campaign.cycle_uri(root, c, "metrics.json")) for c in range(4)]
    assert [m["labeled"] for m in metrics] == [30, 70, 110, 150]        # grows by k each cycle
    assert all(0 < m["read_seconds"] < m["train_seconds"] for m in metrics)  # the read is part of training
    # warm start: each cycle's Ray workers began at the previous cycle's checkpoint on S3
    assert [m["started_from"] for m in metrics] == [None] + [m["checkpoint"] for m in metrics[:3]]
    out = capsys.readouterr().out
    for c, m in enumerate(metrics[:3]):  # each selection said what it scored, read and set aside
        sel = storage.read_json(campaign.cycle_uri(root, c, "selection.json"))
        assert sel["rows_read"] == sel["rows_scored"] + m["labeled"]
        assert (f"cycle {c}: selected 40 of {sel['rows_scored']:,} scored rows in" in out
                and f"({sel['rows_read']:,} read, 0 rejected, {m['labeled']:,} excluded)" in out)

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
    assert read_lease(root)["holder"] is None                            # released
    assert campaign.run(root)["status"] == "done"                        # a rerun finds it finished
    assert campaign.load_state(root)["status"] == "done"


def test_a_campaign_that_runs_out_of_rows_ends_instead_of_failing(ray_local, tmp_path, capsys):
    pool = str(tmp_path / "pool")
    make_pool(pool, "digits", rows=60)
    root = str(tmp_path / "campaign")
    config = campaign.CampaignConfig(pool=pool, k=60, cycles=2, initial_labels=10, oracle=True, trainer="local",
                                     initial_draw="random", min_steps=0, **{**FAST, "epochs": 1})
    campaign.init(root, config)
    assert "10 initial + 2 cycles of 60 = 130 samples, more than the pool's 60 rows" in capsys.readouterr().out
    state = campaign.run(root)
    out = capsys.readouterr().out
    assert "cycle 0: selected 50 of 50 scored rows" in out                # fewer than k: it takes what is left
    assert "cycle 1: " in out and "no row to select from (60 read, 0 rejected, 60 excluded); the campaign ends here" in out
    assert (state["status"], state["step"], state["cycle"]) == ("done", "done", 1)
    ids, _ = all_labels(root)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 60             # every row labeled once
    status = campaign.status(root)
    assert status["status"] == "done" and status["ended_early"]["cycle"] == 1 and "error" not in status
    assert "(ended at cycle 1: no row left to select" in storage.read_bytes(f"{root}/report/report.md").decode()
    assert campaign.run(root)["status"] == "done"                        # a rerun finds it finished


def test_a_cycle_trains_the_same_model_whatever_order_its_labels_arrived_in(ray_local, tmp_path):
    """The labeled table is in arrival order, which the oracle's reads do not fix; the Ray
    trainer numbers samples in the order it is given them, so before training sorted them,
    the same seeded cycle trained different models (tests/test_s3_faults.py saw it)."""
    pool, test = write_digits_split(str(tmp_path / "data"))
    config = campaign.CampaignConfig(pool=pool, test=test, k=10, cycles=1, initial_labels=30, oracle=True,
                                     initial_draw="random", trainer="ray", workers=1, min_steps=0,
                                     **{**FAST, "epochs": 2, "batch_size": 8})
    histories = []
    for name, reverse in (("arrived", False), ("reversed", True)):
        root = str(tmp_path / name)
        campaign.init(root, config)
        if reverse:
            labels = storage.read_parquet(campaign.labels_uri(root, 0))
            storage.write_parquet(campaign.labels_uri(root, 0), labels.take(list(range(labels.num_rows))[::-1]))
        assert campaign.labeled_table(root).num_rows == 30
        campaign.step_train(root, campaign.config_of(campaign.load_state(root)), 0, log=lambda line: None)
        metrics = storage.read_json(campaign.cycle_uri(root, 0, "metrics.json"))
        histories.append([(m["loss"], m["kl"]) for m in metrics["train_history"]])
    assert len(histories[0]) == 2 and histories[0] == histories[1]


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
    assert read_lease(root)["holder"] is not None                        # left behind by the killed driver

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

    # A step that raises leaves `failed` with the step and the error; the next run retries it.
    os.rename(pool, pool + ".away")
    assert main(["campaign", "run", root]) == 2
    state = campaign.load_state(root)
    assert state["status"] == "failed" and state["error"]["step"] == "train" and state["error"]["cycle"] == 0
    assert "pool.away" not in state["error"]["message"] and "pool" in state["error"]["message"]
    assert read_lease(root)["holder"] is None
    os.rename(pool + ".away", pool)
    assert main(["campaign", "run", root]) == 0
    state = campaign.load_state(root)
    assert state["status"] == "waiting-for-labels" and "error" not in state
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
    assert (f"merged 9 labels and 0 skips for cycle 0 (9 of 10 selected samples labeled, 0 skipped; waiting for 1: "
            f"{selected[9]}); 1 rows not merged; 1 still to label") in out
    assert main(["campaign", "run", root]) == 0                          # a partial delivery: still waiting
    assert "waiting for labels (9 of 10 selected samples labeled, 0 skipped; waiting for 1" in capsys.readouterr().out
    assert campaign.status(root)["waiting_for"] == {"count": 1, "first": [selected[9]], "selected": 10,
                                                    "labeled": 9, "skipped": 0}
    assert campaign.load_state(root)["cycle"] == 0
    last = tmp_path / "last.csv"
    last.write_text(f"id,label\n{selected[0]},{truth[selected[0]]}\n{selected[9]},{truth[selected[9]]}\n")
    assert main(["campaign", "import-labels", root, str(last)]) == 0
    out = capsys.readouterr().out
    assert "already labeled" in out and "merged 1 labels" in out and "(10 of 10 selected samples labeled" in out
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
    merged = storage.read_parquet(campaign_state.delivery_uri(root, 2, 0)).to_pylist()
    assert merged == [{"id": i, "label": truth[i]} for i in selected1[:8]]
    assert main(["campaign", "import-labels", root, str(labels_csv)]) == 0  # the same delivery again
    assert "merged 0 labels" in capsys.readouterr().out
    assert not storage.exists(campaign_state.delivery_uri(root, 2, 1))    # nothing new, nothing rewritten
    assert storage.read_parquet(campaign_state.delivery_uri(root, 2, 0)).to_pylist() == merged

    # The last two nobody can label: a skip column, and a Ground Truth failure record.
    skips = tmp_path / "skips.jsonl"
    skips.write_text(json.dumps({"id": selected1[8], "skip": True, "reason": "blurry"}) + "\n"
                     + json.dumps({"source": str(selected1[9]), "tidal-ray-id": selected1[9],
                                   "digits-job-metadata": {"failure-reason": "ClientError: no worker response",
                                                           "type": "groundtruth/image-classification"}}) + "\n")
    assert main(["campaign", "import-labels", root, str(skips)]) == 0
    out = capsys.readouterr().out
    assert "merged 0 labels and 2 skips for cycle 1 (8 of 10 selected samples labeled, 2 skipped; waiting for 0)" in out
    assert storage.read_parquet(campaign_state.skips_uri(root, 2, 0)).to_pylist() == [
        {"id": selected1[8], "reason": "blurry"}, {"id": selected1[9], "reason": "ClientError: no worker response"}]
    assert campaign.status(root)["waiting_for"]["count"] == 0
    assert main(["campaign", "run", root]) == 0                          # moves on: every id labeled or skipped
    state = campaign.load_state(root)
    assert state["status"] == "done" and state["cycle"] == 2
    metrics = storage.read_json(campaign.cycle_uri(root, 2, "metrics.json"))
    assert metrics["skipped"] == 2 and metrics["labeled"] == 30 + 10 + 8
    assert campaign.status(root)["skipped"] == 2 and campaign.status(root)["cycles"][-1]["skipped"] == 2
    assert "| 2 | 48 | 2 |" in storage.read_bytes(f"{root}/report/report.md").decode()
    assert main(["campaign", "run", root]) == 0 and campaign.load_state(root)["status"] == "done"


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


def test_skip_rows_in_every_label_format(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("id,label,skip\n1,3,\n2,,true\n3,,1\n4,5,false\n5,2,1\n")
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"id": 1, "label": 3}\n{"id": 2, "skip": true}\n'
                     '{"source-ref": "s3://b/p/3", "job-metadata": {"failure-reason": "timed out"}}\n'
                     '{"source-ref": "s3://b/p/4", "job": 1, "job-metadata": {"class-name": "1"}}\n')
    parquet = tmp_path / "labels.parquet"
    storage.write_parquet(str(parquet), pa.table({"id": [1, 2], "label": [3, None], "skip": [False, True]}))

    def view(rows):
        return [(str(r["id"]), r["label"], bool(r.get("skip"))) for r in rows]

    assert view(read_labels(str(csv_file))) == [("1", "3", False), ("2", None, True), ("3", None, True),
                                                ("4", "5", False), ("5", "2", True)]
    assert view(read_labels(str(jsonl), pool_uri="s3://b/p")) == [("1", 3, False), ("2", None, True),
                                                                  ("3", None, True), ("4", 1, False)]
    assert view(read_labels(str(parquet))) == [("1", 3, False), ("2", None, True)]

    skips = []
    table, problems = validate_labels(read_labels(str(csv_file)), [1, 2, 3, 4, 5], 10, lambda _: True,
                                      skips=skips, already_skipped={"3"})
    assert table.to_pylist() == [{"id": 1, "label": 3}, {"id": 4, "label": 5}]
    assert skips == [{"id": 2, "reason": "skipped"}]
    assert [(p["id"], p["reason"]) for p in problems] == [("3", "already skipped"), ("5", "both a label and skip")]
    _, problems = validate_labels(read_labels(str(parquet)), [1, 2], 10, lambda _: True)   # initial labels
    assert [p["reason"] for p in problems] == ["a skip is not a label here"]


IMPORTER = [sys.executable, "-m", "tidal_ray.cli", "campaign", "import-labels"]


def test_two_imports_at_once_merge_each_id_once(tmp_path):
    pool, _ = write_digits_split(str(tmp_path / "data"))
    root = str(tmp_path / "campaign")
    ids, labels = _pool_labels(pool, 60)
    initial = tmp_path / "initial.csv"
    initial.write_text("id,label\n" + "".join(f"{i},{label}\n" for i, label in zip(ids[:20], labels[:20])))
    assert main(["campaign", "init", root, "--pool", pool, "--num-classes", "10", "--k", "40", "--cycles", "1",
                 "--trainer", "local", "--initial-labels-file", str(initial)]) == 0
    # The state `run` leaves when it waits for cycle 0's labels (no training needed for this test).
    selected = ids[20:60]
    storage.write_parquet(campaign.cycle_uri(root, 0, "selection.parquet"),
                          pa.table({"rank": list(range(40)), "id": selected, "score": [1.0] * 40}))
    state = campaign.load_state(root)
    state.update(step="wait-for-labels", status="waiting-for-labels")
    campaign_state.save_state(root, state)
    truth = dict(zip(ids, labels))
    files = []
    for name, part in (("a", selected[:30]), ("b", selected[10:])):     # 20 ids in both deliveries
        files.append(tmp_path / f"{name}.csv")
        files[-1].write_text("id,label\n" + "".join(f"{i},{truth[i]}\n" for i in part))

    env = dict(os.environ, TIDAL_RAY_TEST_IMPORT_PAUSE="2")   # each import holds its merge open for 2 s
    importers = [subprocess.Popen(IMPORTER + [root, str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for f in files]
    outs = [p.communicate(timeout=300) for p in importers]
    assert [p.returncode for p in importers] == [0, 0], [err[-2000:] for _, err in outs]
    merged = campaign.labeled_table(root).column("id").to_pylist()
    assert len(merged) == len(set(merged)) == 20 + 40                     # each id merged once
    assert sorted(out.count("already labeled") for out, _ in outs) == [0, 20]
    assert campaign_state.cycle_label_progress(root, 0)["waiting"] == []
