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
    assert err.count("\n") == 0 and "must be positive" in err
    assert not any(tmp_path.iterdir())  # nothing written
