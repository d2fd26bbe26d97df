"""The console script: commands listed, plain errors, exit codes."""
import subprocess
import sys

import pytest

from tidal_ray.cli import main

COMMANDS = ["demo", "make-pool", "train", "score", "campaign", "report"]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "tidal_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_demo_runs_a_small_campaign(ray_local, tmp_path, capsys):
    argv = ["demo", "--workdir", str(tmp_path), "--initial", "20", "--k", "10", "--cycles", "1", "--epochs", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    curve = out.split("learning curve (tidal-entropy")[1].strip().splitlines()[2:4]
    assert [line.split()[:2] for line in curve] == [["0", "20"], ["1", "30"]]
    assert all(0.0 <= float(line.split()[2]) <= 1.0 for line in curve)
    assert (tmp_path / "campaign" / "report" / "learning_curve.png").stat().st_size > 1000
    assert main(argv) == 0  # a second run finds the finished campaign and only reports
    assert "continuing the demo campaign" in capsys.readouterr().out


def test_bad_k_is_one_line_exit_2(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--k", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--k 0: must be a positive integer" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_internal_error_is_exit_1_with_a_debug_hint(tmp_path, capsys):
    """A pool file whose footer is sound but whose data pages are garbage passes every
    check before work; pyarrow's error while reading the rows (a ValueError or OSError
    from inside pyarrow) is an internal error, not bad input."""
    import numpy as np
    import pyarrow as pa

    from tidal_ray.data import storage
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
    from tidal_ray.data.pool import SHAPE_KEY
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    ids, pixels, labels = load_digits()
    _, _, session = train_in_process(TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=1),
                                     ids[:32], pixels[:32], labels[:32])
    checkpoint = save_checkpoint(session.last_state, str(tmp_path / "ck"))
    pool = tmp_path / "pool" / "part-0.parquet"
    table = pa.table({"id": ids, "pixels": pa.array([p.tobytes() for p in pixels], pa.binary())})
    import pyarrow.parquet as pq

    pool.parent.mkdir()
    pq.write_table(table.replace_schema_metadata({SHAPE_KEY: b"1x8x8"}), pool, compression="none")
    data = bytearray(pool.read_bytes())
    data[4:len(data) // 2] = np.random.default_rng(0).integers(0, 256, len(data) // 2 - 4, dtype=np.uint8).tobytes()
    pool.write_bytes(bytes(data))

    argv = ["score", "--checkpoint", checkpoint, "--pool", str(pool.parent), "--k", "5",
            "--out", str(tmp_path / "out"), "--in-process"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rerun with --debug for the traceback" in err, err
    assert main(["--debug", *argv]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert not storage.exists(str(tmp_path / "out" / "selection.json"))


def test_test_hooks_stay_off_the_user_facing_flags():
    out = subprocess.run([sys.executable, "-m", "tidal_ray.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--epochs" in out.stdout
    assert "--fail-at-epoch" not in out.stdout and "test-only" not in out.stdout.lower()


def test_every_job_is_a_call_of_the_cli():
    import ast
    import os

    jobs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
    for name in ("train.py", "score.py", "campaign.py"):
        tree = ast.parse(open(os.path.join(jobs, name)).read())
        calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert "main" in calls, name
        assert not any(isinstance(n, ast.Try) for n in ast.walk(tree)), f"{name} handles errors itself"
