"""Joining (or starting) Ray: the one place that calls ``ray.init``.

Our own lines (epoch lines from Ray Train's rank 0, the scoring progress, campaign
steps) reach the terminal and ``ray job logs``; Ray's internal chatter stays in its log
files under the session directory (``logs/ray-data/``, ``logs/train/``) unless
``--debug`` sets ``DEBUG``. One C++ warning of Ray Data's actor pools ("constructor
arguments in the object store and max_restarts > 0") cannot be filtered from Python.

The knobs lean on Ray 2.60's internals (Ray Data's logging config, the file-path name
of Ray Train's reporting logger): check them when Ray is upgraded.
"""
from __future__ import annotations

import logging
import os
import tempfile

DEBUG = False  # set by ``cli.main`` from --debug


def ray_log_level() -> str:
    return "INFO" if DEBUG else "WARNING"


def local_pythonpath() -> dict:
    """A local Ray started by a command run in the user's directory: its workers (Ray
    Train, scorer actors) import the user's ``MODULE:FACTORY`` from there, as the driver
    does. PYTHONPATH rather than a ``working_dir``: nothing is copied (the directory may
    hold the photos). A cluster gets the module from the job's ``--working-dir``."""
    paths = [os.getcwd(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets it), else
    start a local Ray; a Ray already initialised in this process is used as it is."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    # Without the patch a worker's print reaches the driver once, not twice.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **({} if os.environ.get("RAY_ADDRESS") else local_pythonpath())}
    runtime_env = {"env_vars": env}
    if not DEBUG:
        env.update({"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                    # Its actor's constructor arguments trigger a core-worker error line.
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                    "PYTHONWARNINGS": "ignore::DeprecationWarning"})
        runtime_env["worker_process_setup_hook"] = quiet_ray_logs
        quiet_ray_logs()
        from ray.data._internal import logging as data_logging

        data_logging.configure_logging()  # ray.data is already imported here
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    os.environ.update(env)  # this driver, a local cluster it starts, Ray Train's controller
    ray.init(logging_config=ray.LoggingConfig(log_level=ray_log_level()), runtime_env=runtime_env)


def quiet_ray_logs() -> None:
    """In the driver and in every Ray worker process: Ray Data's console handler at
    ERROR (its files keep everything), and Ray Train's "Reporting training result" off."""
    import ray
    import yaml
    from ray.data._internal import logging as data_logging

    config = dict(data_logging.DEFAULT_CONFIG)
    config["handlers"] = {**config["handlers"], "console": {**config["handlers"]["console"], "level": "ERROR"}}
    path = os.path.join(tempfile.gettempdir(), "tidal-ray-data-logging.yaml")
    # Every Ray worker writes this file as it starts: write-then-rename, so none ever
    # reads it half written (seen: Ray Data's logging config loaded as None, tasks failed).
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tidal-ray-data-logging.")
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(config))
    os.replace(tmp, path)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = path
    # Ray 2.60 names this logger after its file's path, not its module.
    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution",
                                   "context.py")).setLevel(logging.WARNING)
    if ray.is_initialized():
        # Ray Train's placement-group cleaner looks its cluster up by address and fails
        # with a traceback when a machine runs more than one Ray; tell it which.
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
