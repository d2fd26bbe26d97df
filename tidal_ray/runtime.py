"""Joining (or starting) Ray: the one place that calls ``ray.init``.

Our own lines (epoch lines from Ray Train's rank 0, the scoring progress, campaign
steps) reach the terminal and ``ray job logs``; Ray's internal logs stay in its log
files under the session directory unless ``--debug`` sets ``DEBUG``.
"""
from __future__ import annotations

DEBUG = False  # set by ``cli.main`` from --debug


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it), else
    start a local Ray; a Ray already initialised in this process is used as it is."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = DEBUG
