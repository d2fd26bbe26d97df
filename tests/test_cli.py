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


def test_demo_prints_a_topk_table(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "top-5 by tidal-entropy" in out
    table = out.split("top-5 by tidal-entropy")[1].strip().splitlines()[2:7]
    assert [int(line.split()[0]) for line in table] == [1, 2, 3, 4, 5]
    scores = [float(line.split()[2]) for line in table]
    assert scores == sorted(scores, reverse=True)


def test_bad_k_is_one_line_exit_2(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--k", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "k must be a positive integer" in err
