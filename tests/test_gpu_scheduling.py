"""``score --use-gpu`` on a cold cluster: the scorer actors ask for a GPU before any GPU
node is up, wait for one, and land on the node that advertises a GPU when it joins.

Runs on ``ray.cluster_utils.Cluster`` in a child process (the session's ``ray_local``
stays untouched), torn down like ``test_cluster.py``'s clusters. There is no CUDA here:
the GPU node advertises ``num_gpus=1`` and the test-only ``TIDAL_RAY_TEST_GPU_AS_CPU=1``
(tests/README.md) makes the scorer that was given it run its model on the CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_cluster import _make_checkpoint, _run_scenario

SHAPE = (1, 8, 8)
K = 40


def _gpu_main(pool: str, checkpoint: str, out: str, result_path: str) -> None:
    """A head with 2 CPUs and no GPU; scoring starts with ``use_gpu=True`` in a thread;
    once its scorer actor is waiting, a node with 1 CPU and 1 GPU joins."""
    import threading

    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from tidal_ray.score.pipeline import score_pool

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    result: dict = {"head": cluster.head_node.node_id}
    try:
        ray.init(address=cluster.address, log_to_driver=False)

        def scorer_actors() -> list[dict]:
            return [{"id": a["ActorID"], "node": a["Address"]["NodeID"], "state": a["State"]}
                    for a in state.actors().values() if "BatchScorer" in a["ActorClassName"]]

        outcome: dict = {}

        def run():
            try:
                outcome["summary"] = score_pool(checkpoint, pool, K, f"{out}/gpu", use_gpu=True, progress=False)
            except BaseException as e:  # reported to the test through the result file
                outcome["error"] = repr(e)

        started = time.monotonic()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while time.monotonic() - started < 120 and not scorer_actors():
            time.sleep(0.5)
        time.sleep(5)  # a GPU actor has nowhere to go yet: the job must still be waiting
        result["before_gpu"] = scorer_actors()
        result["finished_before_gpu"] = not thread.is_alive()
        result["gpu_joined_at"] = time.monotonic() - started
        result["gpu_node"] = cluster.add_node(num_cpus=1, num_gpus=1).node_id
        thread.join(timeout=300)
        result["seconds"] = time.monotonic() - started
        result["after_gpu"] = scorer_actors()
        result["error"] = outcome.get("error")
        result["summary"] = outcome.get("summary")
    finally:
        Path(result_path).write_text(json.dumps(result, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_use_gpu_scorer_waits_for_and_lands_on_a_gpu_node_that_joins_later(tmp_path):
    from tidal_ray.data.make_pool import make_pool
    from tidal_ray.score.pipeline import score_pool

    pool, out, result_path = tmp_path / "pool", tmp_path / "out", tmp_path / "result.json"
    make_pool(str(pool), "digits", shards=3)
    checkpoint = _make_checkpoint(tmp_path / "checkpoint", SHAPE, epochs=1)

    rc, result, details, left = _run_scenario("test_gpu_scheduling", "_gpu_main",
                                              [str(pool), checkpoint, str(out), str(result_path)],
                                              tmp_path / "gpu.log", result_path, timeout=480,
                                              extra_env={"TIDAL_RAY_TEST_GPU_AS_CPU": "1"})
    assert rc == 0 and not left, details
    # Before the GPU node: a scorer actor exists but is not alive anywhere, and the job waits.
    assert result["before_gpu"] and all(a["state"] != "ALIVE" for a in result["before_gpu"]), details
    assert result["finished_before_gpu"] is False, details
    # After: the job finished, its scorer actors ran on the GPU node and nowhere else.
    assert result["error"] is None and result["summary"]["rows_read"] == 1797, details
    assert {a["node"] for a in result["after_gpu"]} == {result["gpu_node"]}, details
    # ... with the selection the same code makes in-process.
    score_pool(checkpoint, str(pool), K, str(tmp_path / "local"), use_ray=False, progress=False)
    local = pq.read_table(tmp_path / "local" / "selection.parquet")
    assert pq.read_table(out / "gpu" / "selection.parquet").column("id").equals(local.column("id")), details
