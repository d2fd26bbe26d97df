"""Joining (or starting) Ray: the one place that calls ``ray.init``.

Our own lines (epoch lines from Ray Train's rank 0, the scoring progress, campaign
steps) reach the terminal and ``ray job logs``; Ray's internal logs stay in its log
files under the session directory unless ``--debug`` sets ``DEBUG``.
"""
from __future__ import annotations

import os

DEBUG = False  # set by ``cli.main`` from --debug


def local_runtime_env() -> dict:
    """A local Ray started by a command run in the user's directory: its workers (Ray
    Train, scorer actors) import the user's ``MODULE:FACTORY`` from there, as the driver
    does. PYTHONPATH rather than a ``working_dir``: nothing is copied (the directory may
    hold the photos). A cluster gets the module from the job's ``--working-dir``."""
    paths = [os.getcwd(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it), else
    start a local Ray; a Ray already initialised in this process is used as it is."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=None if os.environ.get("RAY_ADDRESS") else local_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = DEBUG
