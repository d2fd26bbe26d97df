"""What the benchmarks here share: the machine they ran on, a process's peak RSS, a
loopback S3 server, and writing their results."""
from __future__ import annotations

import json
import os
import platform
import socket


def machine(**extra) -> dict:
    """Platform, Python, CPU count and model, load average now, plus ``extra``."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {**info, **extra}


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). Not ``ru_maxrss``: Linux carries it over
    an exec from the spawning process, so a child would report at least its parent's RSS."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def start_s3(bucket: str) -> str:
    """A loopback S3 server (moto's) in this process, reached through the AWS environment
    like a real endpoint, so child processes inherit it; returns ``s3://bucket``."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def write_results(result: dict, path: str) -> None:
    """``result`` as JSON at ``path`` (its folder made), with the load average at the end."""
    if isinstance(result.get("machine"), dict):
        result["machine"]["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
