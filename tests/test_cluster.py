"""Scoring on real multi-node Ray clusters on this one machine.

- ``ray job submit`` of ``jobs/score.py`` to a ``ray start --head`` + ``ray start`` worker
  cluster with token authentication, the repo uploaded as the job's working_dir.
- ``ray job submit`` of a campaign step whose model is the user's own module, shipped in the
  job's working_dir, to a token-auth ``ray start --head``.
- A worker node killed while ``score_pool`` runs on ``ray.cluster_utils.Cluster``: the job
  still finishes (Ray Data retries tasks and restarts its actors) with the clean run's selection.
- A node running a Ray Train worker killed mid-epoch on ``ray.cluster_utils.Cluster``: the
  run resumes from its last checkpoint, trains every epoch once, and counts a preemption.

Isolation from the session's in-process Ray (``ray_local``) and from any other Ray on the
machine: every cluster here lives in child processes with their own ``RAY_TMPDIR``, free
ports and token, and is torn down by killing exactly the processes that carry this test's
marker in their environment (never ``ray stop``, which stops every Ray on the machine).
Nothing is set in this process's ``os.environ``.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
MARKER = "TIDAL_RAY_TEST_CLUSTER"
EXCLUDES = [".venv", ".git", "benchmarks/out", "tidal-demo", ".pytest_cache", "__pycache__", "*.egg-info"]


# ---- helpers shared by both tests -------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_env(temp_root: str, token: str, marker: str) -> dict:
    """The environment of every process of a test cluster (and of its clients): a private
    Ray temp dir, token auth with this cluster's own token, this venv first on PATH (the
    job entrypoint's ``python``), and the marker that teardown finds processes by."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_TMPDIR": temp_root,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        # Seen on this (loaded, 2-core) machine: the worker's `ray start` gave up after the
        # default 30 s with "GCS cannot find the node ... Try increase RAY_raylet_start_wait_time_s".
        "RAY_raylet_start_wait_time_s": "120",
        MARKER: marker,
    })
    return env


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER=marker``: every process a test
    cluster started, however deep and in whatever process group (Ray's workers have their own)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            pass
    return found


def _kill_marked(marker: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of the test cluster until none is left (like ``ray stop
    --force``, but only these). Returns the pids still alive after ``timeout`` (none, we hope)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _marked_pids(marker)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"<{path}: {e}>"


def _run_scenario(module: str, main: str, args: list[str], log: Path, result_path: Path, timeout: float,
                  extra_env: dict | None = None) -> tuple[int | None, dict, str, list[int]]:
    """Runs ``module.main(*args)`` in a fresh process with its own Ray test cluster
    (``_cluster_env``), kills whatever it leaves, and returns (exit code or None on
    timeout, the JSON it wrote to ``result_path``, details for a failure message, the
    pids that had to be killed)."""
    root = Path(tempfile.mkdtemp(prefix="trn-", dir="/tmp"))
    marker = secrets.token_hex(8)
    env = {**_cluster_env(str(root), secrets.token_hex(32), marker), **(extra_env or {})}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {module}; "
            f"{module}.{main}(*sys.argv[1:])")
    try:
        with open(log, "wb") as handle:
            proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=REPO, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
    finally:
        left = _kill_marked(marker)
        shutil.rmtree(root, ignore_errors=True)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    details = f"exit {rc}\n--- result ---\n{json.dumps(result, indent=1)[-6000:]}\n--- log ---\n{_tail(log, 8000)}"
    return rc, result, details, left


def _make_checkpoint(path: Path, input_shape, epochs: int = 2) -> str:
    """A small trained checkpoint: digits for 1x8x8, class-conditional synthetic data otherwise."""
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.data.datasets import load_digits
    from tidal_ray.data.make_pool import synthetic_rows
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    if tuple(input_shape) == (1, 8, 8):
        ids, x, y = load_digits()
        ids, x, y = ids[:1000], x[:1000], y[:1000]
    else:
        ids = np.arange(1000)
        x, y = synthetic_rows(ids, input_shape, 10, seed=99)
    config = TrainConfig(num_classes=10, input_shape=tuple(input_shape), epochs=epochs, batch_size=64)
    _, _, session = train_in_process(config, ids, x, y)
    save_checkpoint(session.last_state, str(path))
    return str(path)


def _check_selection(out: Path, k: int, rows: int) -> tuple[list, list]:
    selection = pq.read_table(out / "selection.parquet")
    summary = json.loads((out / "selection.json").read_text())
    ids = selection.column("id").to_pylist()
    scores = selection.column("score").to_pylist()
    assert selection.num_rows == k, selection.num_rows
    assert selection.column("rank").to_pylist() == list(range(1, k + 1))
    assert len(set(ids)) == k, "duplicate ids in the selection"
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert summary["selected"] == k and summary["k"] == k and summary["ray"] is True
    assert summary["rows_read"] == rows
    assert summary["rows_scored"] + summary["rows_rejected"] + summary["rows_excluded"] == summary["rows_read"]
    assert summary["rows_rejected"] == 0 and summary["rows_excluded"] == 0
    return ids, scores


# ---- 1. ray job submit to a `ray start` head + worker, with token auth --------------------------


class RayStartCluster:
    """``ray start --head --block`` plus one ``ray start --address --block`` worker, as
    child processes of this test, with a private temp dir, free ports and a fresh token."""

    def __init__(self, root: Path, num_cpus: int = 1):
        self.root = root
        self.token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
        self.marker = secrets.token_hex(8)
        self.env = _cluster_env(str(root), self.token, self.marker)
        ports = _free_ports(11)
        self.gcs, self.dashboard, self.client_port = ports[:3]
        self.head_ports, self.worker_ports = ports[3:7], ports[7:]
        self.num_cpus = num_cpus
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _start(self, name: str, args: list[str]) -> None:
        self.logs[name] = self.root / f"{name}.log"
        with open(self.logs[name], "wb") as log:
            self.procs[name] = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={self.num_cpus}",
                 "--node-ip-address=127.0.0.1", "--object-store-memory=150000000", *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)

    def _agent_ports(self, ports) -> list[str]:
        listen, grpc, metrics, runtime_env = ports
        return [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]

    def start(self, timeout: float = 120.0, worker: bool = True) -> None:
        self._start("head", ["--head", f"--port={self.gcs}", f"--temp-dir={self.root / 'ray'}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={self.client_port}",
                             *self._agent_ports(self.head_ports)])
        self._wait(lambda: self.api("/api/version"), "the head's dashboard", timeout)
        if not worker:
            self._wait(lambda: len(self.alive_nodes()) == 1 or None, "the head node", timeout)
            return
        # The worker node gets a temp dir of its own, as it would on its own machine: sharing the
        # head's, its runtime-env agent unpacks the job's working_dir into the very directory the
        # head's job driver runs in, replacing it under the driver (whose getcwd() then fails;
        # torch's MKL dies with "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so").
        self._start("worker", [f"--address=127.0.0.1:{self.gcs}", f"--temp-dir={self.root / 'ray-worker'}",
                               *self._agent_ports(self.worker_ports)])
        self._wait(lambda: len(self.alive_nodes()) == 2 or None, "two alive nodes", timeout)

    def _wait(self, probe, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` ({name}) exited {proc.returncode} while waiting for {what}:\n"
                                       f"{self.diagnostics()}")
            try:
                if probe():
                    return
            except (OSError, ValueError, KeyError) as e:
                last = e
            time.sleep(1.0)
        raise TimeoutError(f"no {what} after {timeout:.0f}s (last error: {last!r}):\n{self.diagnostics()}")

    def api(self, path: str, token: str | None = None):
        """GET the dashboard's HTTP API with the cluster's token; returns the decoded JSON."""
        request = urllib.request.Request(self.address + path,
                                         headers={"Authorization": f"Bearer {token or self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def job_info(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.api(f"/api/jobs/{submission_id}/logs")["logs"]
        except (OSError, ValueError, KeyError) as e:
            return f"<no job logs: {e!r}>"

    def cli(self, *args: str, env: dict | None = None, timeout: float = 240.0) -> subprocess.CompletedProcess:
        """A `ray` CLI command as a client of this cluster (the cluster's token in its environment)."""
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, submission_id: str, entrypoint: list[str], timeout: float = 240.0, working_dir: Path = REPO):
        """``ray job submit`` with the repo (or ``working_dir``) as working_dir; waits for the
        job (the CLI tails its logs until it ends). Returns (CLI result, job info from the REST API)."""
        try:
            result = self.cli("job", "submit", "--address", self.address, "--submission-id", submission_id,
                              "--working-dir", str(working_dir), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                              "--", *entrypoint, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.cli("job", "stop", "--address", self.address, "--no-wait", submission_id, timeout=60)
            raise AssertionError(f"job {submission_id} still running after {timeout:.0f}s; its logs:\n"
                                 f"{self.job_logs(submission_id)}\n{self.diagnostics()}") from e
        info = self.job_info(submission_id)
        if result.returncode != 0 or info.get("status") != "SUCCEEDED":
            raise AssertionError(
                f"job {submission_id}: CLI exit {result.returncode}, status {info.get('status')} "
                f"({info.get('message')})\n--- ray job submit stdout ---\n{result.stdout[-6000:]}\n"
                f"--- stderr ---\n{result.stderr[-4000:]}\n--- job logs ---\n{self.job_logs(submission_id)}\n"
                f"{self.diagnostics()}")
        return result, info

    def diagnostics(self) -> str:
        parts = [f"--- {name} (`ray start`) log ---\n{_tail(path)}" for name, path in self.logs.items()]
        sessions = sorted((self.root / "ray").glob("session_2*/logs"))
        if sessions:
            for name in ("raylet.out", "gcs_server.out", "dashboard.log"):
                parts.append(f"--- {name} ---\n{_tail(sessions[-1] / name, 2000)}")
        return "\n".join(parts)

    def stop(self) -> list[int]:
        left = _kill_marked(self.marker)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return left


def _started_cluster(prefix: str, options: dict | None = None, **start):
    """Yields a started ``RayStartCluster``; stops it and fails the test if any of its
    processes survive. A short path of its own: Ray's unix sockets live under it
    (108-byte limit)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    cluster = RayStartCluster(root, **(options or {}))
    try:
        cluster.start(**start)
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    if left:
        pytest.fail(f"test cluster processes survived teardown: {left}")


@pytest.fixture
def ray_start_cluster():
    yield from _started_cluster("trc-")


@pytest.fixture
def ray_start_head():
    """A token-auth ``ray start --head`` alone (2 CPUs): a job's driver, Ray Train
    worker and scorer actors all on it."""
    yield from _started_cluster("trh-", {"num_cpus": 2}, worker=False)


@pytest.mark.slow
def test_ray_job_submit_scores_a_pool_on_a_token_auth_cluster(ray_start_cluster, tmp_path):
    from tidal_ray.data.make_pool import make_pool

    cluster = ray_start_cluster
    started = time.monotonic()
    pool, out = tmp_path / "pool", tmp_path / "out"
    make_pool(str(pool), "digits", fmt="pixels", shards=3)
    checkpoint = _make_checkpoint(tmp_path / "checkpoint", (1, 8, 8))
    nodes = cluster.alive_nodes()
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]

    # Token auth is on: a client without the token, or with another one, is refused.
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for env, expected in [(no_token, "Missing authentication token"), (wrong, "Invalid authentication token")]:
        refused = cluster.cli("job", "list", "--address", cluster.address, env=env, timeout=60)
        assert expected in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    with pytest.raises(urllib.error.HTTPError) as e:
        cluster.api("/api/jobs/", token="not-the-token")
    assert e.value.code in (401, 403)

    # The job runs the uploaded checkout: cwd is the unpacked working_dir, which is also on
    # PYTHONPATH (so `python jobs/score.py` imports tidal_ray from it), and .venv/.git stayed behind.
    probe = ("import os, tidal_ray; print('PROBE', os.getcwd(), os.environ.get('PYTHONPATH', ''), "
             "tidal_ray.__file__, os.path.exists('.venv'), os.path.exists('.git'))")
    result, _ = cluster.submit("probe", ["python", "-c", probe], timeout=180)
    line = next(x for x in cluster.job_logs("probe").splitlines() if x.startswith("PROBE "))
    cwd, pythonpath, module, venv, git = line.split()[1:]
    assert "runtime_resources" in cwd and cwd in pythonpath.split(os.pathsep), line
    assert module == os.path.join(cwd, "tidal_ray", "__init__.py"), line
    assert (venv, git) == ("False", "False"), line

    submitted = time.monotonic()
    result, info = cluster.submit("score", ["python", "jobs/score.py", "--checkpoint", checkpoint,
                                            "--pool", str(pool), "--k", "50", "--out", str(out)])
    job_seconds = time.monotonic() - submitted
    logs = cluster.job_logs("score")
    assert "selected 50 of 1,797 scored rows" in logs, logs
    ids, scores = _check_selection(out, 50, 1797)

    # The cluster's selection is the one the same code makes in-process, with the CLI's
    # default strategy (margin, as campaign init's).
    from tidal_ray.score.pipeline import score_pool

    assert json.loads((out / "selection.json").read_text())["strategy"] == "margin"
    score_pool(checkpoint, str(pool), 50, str(tmp_path / "local"), strategy="margin", use_ray=False, progress=False)
    local = pq.read_table(tmp_path / "local" / "selection.parquet")
    assert local.column("id").to_pylist() == ids
    np.testing.assert_array_equal(local.column("score").to_numpy(), np.array(scores))
    print(f"\njob submit: score job {job_seconds:.1f}s, test body {time.monotonic() - started:.1f}s")


USER_MODULE = """
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def factory(num_classes):
    return Net(num_classes)
"""


@pytest.mark.slow
def test_ray_job_submit_runs_a_campaign_step_with_a_user_module(ray_start_head, tmp_path, monkeypatch):
    """The user's directory (their module beside the code) goes up as the job's working_dir:
    the job's driver, its Ray Train worker and its scorer actors all import the module."""
    from tidal_ray.campaign import cycle as campaign
    from tidal_ray.data.datasets import load_digits
    from tidal_ray.data.make_pool import make_pool

    cluster = ray_start_head
    job_dir = tmp_path / "job"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "tidal_ray", job_dir / "tidal_ray", ignore=ignore)
    shutil.copytree(REPO / "jobs", job_dir / "jobs", ignore=ignore)
    (job_dir / "user_net.py").write_text(USER_MODULE)
    pool, root = tmp_path / "pool", tmp_path / "campaign"
    make_pool(str(pool), "digits", rows=300, fmt="pixels")
    ids, _, labels = load_digits()
    (tmp_path / "seed.csv").write_text("id,label\n" + "".join(f"{i},{y}\n" for i, y in zip(ids[:30], labels[:30])))
    monkeypatch.chdir(job_dir)  # init imports the module from the user's directory, as the CLI would
    config = campaign.CampaignConfig(pool=str(pool), num_classes=10, k=10, cycles=1, backbone="user_net:factory",
                                     feature_layers=("body", "body.0"), epochs=1, batch_size=16, workers=1)
    campaign.init(str(root), config, str(tmp_path / "seed.csv"))

    result, _ = cluster.submit("campaign", ["python", "jobs/campaign.py", "run", str(root)], working_dir=job_dir)
    logs = cluster.job_logs("campaign")
    assert "waiting for labels" in logs and "campaign waiting-for-labels: cycle 0" in logs, logs
    summary = json.loads((root / "cycles" / "000" / "selection.json").read_text())
    assert summary["selected"] == 10 and summary["rows_excluded"] == 30 and summary["rows_scored"] == 270
    metrics = json.loads((root / "cycles" / "000" / "metrics.json").read_text())
    import torch

    state = torch.load(Path(metrics["checkpoint"]) / "model.pt", weights_only=True)
    assert state["config"]["backbone"] == "user_net:factory"


# ---- 2. a worker node dies while the pool is scored -----------------------------------------------

POOL_ROWS = 30_000
SHAPE = (3, 8, 8)
K = 200
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@contextlib.contextmanager
def _cluster_of_workers(workers: int):
    """A ``Cluster`` whose head has no CPUs (so everything runs on the workers) and
    ``workers`` 1-CPU worker nodes whose loss is noticed within seconds; this process's
    Ray connected to it for the block, then both shut down."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _actors(class_name: str) -> list[dict]:
    """The cluster's actors of a class: id, node, state, restarts."""
    from ray._private import state

    return [{"id": a["ActorID"], "node": a["Address"]["NodeID"], "state": a["State"], "restarts": a["NumRestarts"]}
            for a in state.actors().values() if class_name in a["ActorClassName"]]


def _node_failure_main(pool: str, checkpoint: str, out: str, result_path: str) -> None:
    """Runs in its own process (the session's ``ray_local`` stays untouched): a head with
    no CPUs and two 1-CPU workers. A clean run, then a run in which the node holding the
    scorer actor is killed (SIGKILL, no drain) as soon as the first scored batch reaches
    the driver."""
    import ray

    from tidal_ray.score import pipeline as score

    result = {"events": []}
    with _cluster_of_workers(2) as cluster:
        try:
            started = time.monotonic()
            clean = score.score_pool(checkpoint, pool, K, f"{out}/clean", progress=False)
            result["clean_seconds"] = time.monotonic() - started
            result["clean_actors"] = _actors("BatchScorer")

            add = score.Reduction.add

            def add_then_kill_a_node(reduction, batch):
                add(reduction, batch)
                if "removed_at_rows" in result:
                    return
                alive = [a for a in _actors("BatchScorer") if a["state"] == "ALIVE"]
                workers = {n.node_id: n for n in cluster.worker_nodes}
                victim = next((workers[a["node"]] for a in alive if a["node"] in workers), None)
                if victim is None:
                    result["events"].append(f"no live scorer actor on a worker at {reduction.rows_read} rows: {alive}")
                    return
                result["removed_at_rows"] = reduction.rows_read
                result["removed_node"] = victim.node_id
                result["actors_before"] = alive
                cluster.remove_node(victim, allow_graceful=False)
                result["removed_at_seconds"] = time.monotonic() - started

            score.Reduction.add = add_then_kill_a_node
            started = time.monotonic()
            failed = score.score_pool(checkpoint, pool, K, f"{out}/failed", progress=False)
            result["failed_seconds"] = time.monotonic() - started
            score.Reduction.add = add
            result["actors_after"] = _actors("BatchScorer")
            result["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            result["summaries"] = {"clean": clean, "failed": failed}
        finally:
            Path(result_path).write_text(json.dumps(result, indent=1, default=str))


@pytest.mark.slow
def test_scoring_survives_a_worker_node_dying_mid_job(tmp_path):
    from tidal_ray.data.make_pool import make_pool

    pool, out, result_path = tmp_path / "pool", tmp_path / "out", tmp_path / "result.json"
    make_pool(str(pool), "synthetic", rows=POOL_ROWS, fmt="pixels", shards=6, shape=SHAPE, seed=1)
    checkpoint = _make_checkpoint(tmp_path / "checkpoint", SHAPE)

    rc, result, details, left = _run_scenario("test_cluster", "_node_failure_main",
                                              [str(pool), checkpoint, str(out), str(result_path)],
                                              tmp_path / "node_failure.log", result_path, timeout=240)
    assert rc == 0, details
    assert not left, f"test cluster processes survived teardown: {left}\n{details}"

    # The failure really happened mid-job, on the node running the scorer actor.
    assert 0 < result["removed_at_rows"] < POOL_ROWS // 2, details
    assert result["removed_node"] not in result["alive_nodes"], details
    assert result["removed_node"] in {a["node"] for a in result["actors_before"]}, details
    # Ray Data's actor pool brought the scorer back (max_restarts=-1 by default) on a node that lives.
    clean_actors = {a["id"] for a in result["clean_actors"]}
    run_actors = [a for a in result["actors_after"] if a["id"] not in clean_actors]
    assert any(a["node"] != result["removed_node"] and a["node"] in result["alive_nodes"] for a in run_actors), details
    # ... and the job finished with exactly the clean run's selection and row accounting.
    clean_ids, clean_scores = _check_selection(out / "clean", K, POOL_ROWS)
    ids, scores = _check_selection(out / "failed", K, POOL_ROWS)
    assert ids == clean_ids, details
    np.testing.assert_array_equal(np.array(scores), np.array(clean_scores))
    assert pq.read_table(out / "failed" / "selection.parquet").equals(pq.read_table(out / "clean" / "selection.parquet"))
    print(f"\nnode failure: clean {result['clean_seconds']:.1f}s, with a node killed at "
          f"{result['removed_at_rows']} rows ({result['removed_at_seconds']:.1f}s) {result['failed_seconds']:.1f}s; "
          f"scorer actors after: {result['actors_after']}")


# ---- 3. a training worker's node dies mid-epoch -------------------------------------------------

TRAIN_ROWS, TRAIN_EPOCHS = 256, 4


def _latest_checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of the last checkpoint Ray Train's controller has registered (its
    snapshot, written after the checkpoint is uploaded and recorded), 0 if none yet."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    if isinstance(snapshot, str):
        snapshot = json.loads(snapshot)
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or "epoch-0000"
    return int(latest.rsplit("-", 1)[1])


def _training_node_failure_main(out: str, result_path: str) -> None:
    """Runs in its own process: a head with no CPUs and three 1-CPU workers; two Ray Train
    workers of one CPU each (so on two nodes). As soon as the epoch-1 checkpoint is
    registered, a driver thread kills (SIGKILL, no drain) a node that hosts a Ray Train worker."""
    import threading

    import ray

    from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.on_ray import train_arrays_on_ray

    result = {"events": []}
    with _cluster_of_workers(3) as cluster:
        try:
            run_dir = Path(out) / "lost"
            started = time.monotonic()

            def kill_a_training_node():
                while time.monotonic() - started < 180:
                    if _latest_checkpoint_epoch(run_dir) >= 1:
                        break
                    time.sleep(0.1)
                else:
                    result["events"].append("no epoch-1 checkpoint within 180 s")
                    return
                workers = {n.node_id: n for n in cluster.worker_nodes}
                alive = [a for a in _actors("RayTrainWorker") if a["state"] == "ALIVE"]
                victim = next((workers[a["node"]] for a in alive if a["node"] in workers), None)
                if victim is None:
                    result["events"].append(f"no live Ray Train worker on a worker node: {alive}")
                    return
                result["workers_before"] = alive
                result["removed_node"] = victim.node_id
                result["checkpoint_at_removal"] = _latest_checkpoint_epoch(run_dir)
                cluster.remove_node(victim, allow_graceful=False)
                result["removed_at_seconds"] = time.monotonic() - started

            killer = threading.Thread(target=kill_a_training_node, daemon=True)
            killer.start()
            ids, pixels, labels = load_digits()
            config = TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, backbone="small_cnn", epochs=TRAIN_EPOCHS,
                                 batch_size=32, seed=0, checkpoint_every=1)
            trained = train_arrays_on_ray(config, ids[:TRAIN_ROWS], pixels[:TRAIN_ROWS], labels[:TRAIN_ROWS], out,
                                          num_workers=2, max_failures=1, name="lost", cpus_per_worker=1)
            result["train_seconds"] = time.monotonic() - started
            killer.join(timeout=10)
            result["workers_after"] = _actors("RayTrainWorker")
            result["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            result["metrics"] = trained.metrics
            result["checkpoint_uri"] = trained.checkpoint_uri
            result["failures"], result["preemptions"] = trained.failures, trained.preemptions
        finally:
            Path(result_path).write_text(json.dumps(result, indent=1, default=str))


@pytest.mark.slow
def test_training_survives_a_worker_node_dying_mid_epoch(tmp_path):
    from tidal_ray.train.checkpoint import load_checkpoint

    out, result_path = tmp_path / "runs", tmp_path / "result.json"
    rc, result, details, left = _run_scenario("test_cluster", "_training_node_failure_main",
                                              [str(out), str(result_path)], tmp_path / "train_node_failure.log",
                                              result_path, timeout=300)
    assert rc == 0, details
    assert not left, f"test cluster processes survived teardown: {left}\n{details}"

    # The node really died mid-run, after the epoch-1 checkpoint and before the last one,
    # and it was running a Ray Train worker.
    assert 1 <= result["checkpoint_at_removal"] < TRAIN_EPOCHS, details
    assert result["removed_node"] in {a["node"] for a in result["workers_before"]}, details
    assert result["removed_node"] not in result["alive_nodes"], details
    # The run resumed from a checkpoint of this run and finished all its epochs, none twice.
    history = result["metrics"]
    assert [m["epoch"] for m in history] == list(range(1, TRAIN_EPOCHS + 1)), details
    resumed = max(m["resumed_from_epoch"] for m in history)
    assert resumed >= 1, details
    assert all(m["resumed_from_epoch"] == 0 for m in history[:resumed]), details
    state = load_checkpoint(result["checkpoint_uri"])
    assert state["epoch"] == TRAIN_EPOCHS and state["td_table"]["count"].tolist() == [TRAIN_EPOCHS] * TRAIN_ROWS
    # Ray said a worker was lost (its node died), not that the training code raised.
    assert (result["failures"], result["preemptions"]) == (0, 1), details
    assert json.loads((out / "lost" / "interruptions.json").read_text()) == {"failures": 0, "preemptions": 1}
    print(f"\ntraining node failure: node removed at {result['removed_at_seconds']:.1f}s "
          f"(checkpoint epoch {result['checkpoint_at_removal']}), run resumed from epoch {resumed}, "
          f"finished in {result['train_seconds']:.1f}s")
