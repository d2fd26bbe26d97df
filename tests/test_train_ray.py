"""Ray Train on a real local Ray (2 CPUs) and a real loopback S3 server: the TD table under
DDP matches in-process training, checkpoints on S3 read back into the same model, a worker
that dies resumes from the last checkpoint, and bad input is exit code 2 before any work."""
import os

import pyarrow as pa
import pytest
import torch

from tidal_ray.data import storage
from tidal_ray.train.checkpoint import load_checkpoint, model_from_checkpoint
from tidal_ray.cli import main
from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
from tidal_ray.models import prepare_input
from tidal_ray.train.config import TrainConfig
from tidal_ray.train.loop import train_in_process
from tidal_ray.train.on_ray import FAIL_AT_EPOCH_ENV, train_arrays_on_ray

N, EPOCHS = 128, 8


def digits(n):
    ids, pixels, labels = load_digits()
    return ids[:n], pixels[:n], labels[:n]


def write_labeled(uri, ids, pixels, labels):
    """The pool's fast format: raw uint8 ``pixels`` with the shape in the schema metadata."""
    table = pa.table({"id": ids, "label": labels, "pixels": [p.tobytes() for p in pixels]})
    shape = "x".join(map(str, pixels.shape[1:])).encode()
    storage.write_parquet(uri, table.replace_schema_metadata({b"tidal_ray.shape": shape}))


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_endpoint):
    """One 2-worker run with its storage on the loopback S3 server, shared by two tests."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="train-ray-ddp")
    ids, pixels, labels = digits(N)
    # batch_size = N: one full-batch step per epoch, in-process and under DDP alike.
    config = TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, backbone="small_cnn",
                         epochs=EPOCHS, batch_size=N, lr=3e-3, seed=0, checkpoint_every=1)
    result = train_arrays_on_ray(config, ids, pixels, labels, "s3://train-ray-ddp/runs", num_workers=2, name="ddp")
    return config, (ids, pixels, labels), result


def test_td_table_under_ddp_matches_in_process(s3_run):
    """Why the means match within a tolerance and not bit for bit: with full-batch steps
    and equal shards, DDP's average of the two ranks' mean losses is the full-batch mean,
    so both runs take the same optimiser steps. What no batching can align is that each
    rank's BatchNorm normalises its half with that half's statistics (SyncBatchNorm has no
    CPU kernel) and each rank draws its own dropout masks. So ids and counts must be equal
    exactly; the means must be close, far closer than to the same table with rows shuffled
    (which is what a sample filed under the wrong TD row would look like)."""
    config, (ids, pixels, labels), result = s3_run
    state = load_checkpoint(result.checkpoint_uri)
    _, local, _ = train_in_process(config, ids, pixels, labels)

    assert state["labeled_ids"] == ids.tolist()
    assert state["td_table"]["epoch"] == EPOCHS
    assert torch.equal(state["td_table"]["count"], local.count)
    assert state["td_table"]["count"].tolist() == [EPOCHS] * N  # N is even: the equal split drops nothing

    ray_mean = state["td_table"]["sum"] / state["td_table"]["count"].unsqueeze(1)
    diff = (ray_mean - local.mean).abs()
    shuffled = (ray_mean - local.mean[torch.randperm(N, generator=torch.Generator().manual_seed(0))]).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.25, (diff.mean(), diff.max())
    assert diff.mean() < shuffled.mean() / 4, (diff.mean(), shuffled.mean())
    assert (ray_mean.argmax(1) == local.mean.argmax(1)).float().mean() > 0.9


def test_checkpoint_on_s3_reads_back_into_the_same_model(s3_run):
    import ray.train

    _, (ids, pixels, labels), result = s3_run
    assert result.checkpoint_uri == f"s3://train-ray-ddp/runs/ddp/epoch-{EPOCHS:04d}"
    state = load_checkpoint(result.checkpoint_uri)  # torch.load(weights_only=True)
    assert {"model", "optimizer", "scheduler", "td_table", "epoch", "config"} <= set(state)
    assert state["epoch"] == EPOCHS and state["config"]["backbone"] == "small_cnn"
    assert state["config"]["num_classes"] == 10 and state["scheduler"]["last_epoch"] == EPOCHS

    x = prepare_input(torch.from_numpy(pixels))
    with torch.no_grad():
        logits, td_logits = model_from_checkpoint(state)(x)
        # The checkpoint Ray Train registered, fetched through Ray's own Checkpoint API.
        checkpoint = ray.train.Checkpoint(result.checkpoint_uri[len("s3://"):], filesystem=storage.s3_filesystem())
        with checkpoint.as_directory() as directory:
            again = torch.load(os.path.join(directory, "model.pt"), weights_only=True)
        logits2, td_logits2 = model_from_checkpoint(again)(x)
        previous, _ = model_from_checkpoint(load_checkpoint(f"s3://train-ray-ddp/runs/ddp/epoch-{EPOCHS - 1:04d}"))(x)
    assert torch.equal(logits, logits2) and torch.equal(td_logits, td_logits2)
    assert not torch.allclose(logits, previous)  # the last epoch's weights, not an earlier epoch's
    assert not storage.exists(f"s3://train-ray-ddp/runs/ddp/epoch-{EPOCHS - 2:04d}")  # two kept

    history = storage.read_json(result.history_uri)
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1)) == [m["epoch"] for m in result.metrics]
    assert {"loss", "ce", "kl", "train_accuracy", "samples_per_s"} <= set(history[-1])
    assert history[-1]["train_accuracy"] > 0.8


def test_worker_failure_resumes_from_the_last_checkpoint(ray_local, s3_bucket, capsys, monkeypatch):
    """One worker raises at the start of epoch index 2 of 4 (after two checkpoints); the
    group restarts, resumes at epoch 2 with the TD table from the checkpoint, and finishes."""
    ids, pixels, labels = digits(96)
    labeled, out = f"{s3_bucket}/labeled/cycle-000.parquet", f"{s3_bucket}/runs"
    write_labeled(labeled, ids, pixels, labels)

    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")  # test-only fault injection (tests/README.md)
    code = main(["train", "--labeled", labeled, "--out", out, "--name", "crash", "--epochs", "4",
                 "--workers", "2", "--batch-size", "32", "--max-failures", "1", "--checkpoint-every", "1"])
    assert code == 0, capsys.readouterr().err
    assert f"checkpoint: {out}/crash/epoch-0004" in capsys.readouterr().out

    assert storage.exists(f"{out}/crash/fault-markers/failed-at-epoch-2")  # the failure did happen
    # Ray said a worker raised (not that it was lost): a failure, not a preemption.
    assert storage.read_json(f"{out}/crash/interruptions.json") == {"failures": 1, "preemptions": 0}
    history = storage.read_json(f"{out}/crash/metrics.json")
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]  # no epoch trained twice
    assert [m["resumed_from_epoch"] for m in history] == [0, 0, 2, 2]
    state = load_checkpoint(f"{out}/crash/epoch-0004")
    td = state["td_table"]
    assert td["count"].tolist() == [4] * 96 and td["epoch"] == 4  # every sample once per epoch
    assert not any("fail" in key for key in state["config"])  # no test field in what users load


@pytest.mark.parametrize("args, message", [
    (["--labeled", "{tmp}/missing.parquet"], "labeled set not found"),
    (["--num-classes", "5"], "labels are outside 0..4"),
    (["--workers", "4"], "6 labeled samples are too few for 4 workers"),
    (["--model", "vgg"], "unknown model 'vgg'"),
    (["--backbone", "mlp"], "backbone 'mlp' takes feature vectors"),
])
def test_bad_input_is_exit_2_with_one_line(tmp_path, capsys, args, message):
    ids, pixels, labels = digits(6)
    write_labeled(str(tmp_path / "labeled.parquet"), ids, pixels, labels)
    argv = ["train", "--labeled", str(tmp_path / "labeled.parquet"), "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tidal-ray train: error:") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_job_entrypoint_trains_features_with_its_own_local_ray(tmp_path):
    """``python jobs/train.py`` as ``ray job submit`` runs it, but without RAY_ADDRESS, so
    ``ray.init()`` starts a local Ray: an MLP on feature vectors, local storage."""
    import subprocess
    import sys

    ids, pixels, labels = digits(64)
    features = pa.FixedSizeListArray.from_arrays(pa.array((pixels.reshape(64, -1) / 255.0).ravel(), pa.float32()), 64)
    table = pa.table({"id": ids, "label": labels, "features": features})
    storage.write_parquet(str(tmp_path / "labeled.parquet"), table.replace_schema_metadata({b"tidal_ray.num_classes": b"10"}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "jobs", "train.py"), "--labeled", str(tmp_path / "labeled.parquet"),
         "--out", str(tmp_path / "out"), "--backbone", "mlp", "--epochs", "3", "--workers", "2", "--batch-size", "16"],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint: {tmp_path / 'out' / 'train' / 'epoch-0003'}" in out.stdout
    state = load_checkpoint(str(tmp_path / "out" / "train" / "epoch-0003"))
    assert state["config"]["backbone"] == "mlp" and state["config"]["input_shape"] == (64,)
    assert state["config"]["num_classes"] == 10 and state["td_table"]["count"].tolist() == [3] * 64
    assert "epoch 3: loss" in out.stdout + out.stderr  # rank 0's per-epoch line reached the driver
    for chatter in ("Starting execution", "Reporting training result", "Execution plan"):
        assert chatter not in out.stdout + out.stderr  # Ray's own logs stay in its log files


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a)


@pytest.mark.slow
def test_same_seed_gives_identical_checkpoints_on_ray_and_in_process(ray_local, tmp_path):
    """Shards and batch orders are a function of the seed and the ids (RayTrainSession), so
    two 2-worker runs with one seed end with equal tensors, whatever order Ray Data's tasks
    deliver rows in; the in-process trainer repeats itself as well. Odd row count and a
    batch size that leaves a tail, so the uneven shards are exercised too."""
    ids, pixels, labels = digits(75)
    config = TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=3, batch_size=16, seed=7,
                         checkpoint_every=3, augment=True)
    states = [load_checkpoint(train_arrays_on_ray(config, ids, pixels, labels, str(tmp_path / "runs"),
                                                  num_workers=2, name=f"run-{i}").checkpoint_uri)
              for i in range(2)]
    assert _same_state(states[0]["model"], states[1]["model"])
    assert _same_state(states[0]["td_table"], states[1]["td_table"])
    assert states[0]["td_table"]["count"].sum() > 0

    local = [train_in_process(config, ids, pixels, labels)[0].state_dict() for _ in range(2)]
    assert _same_state(local[0], local[1])
