"""Credentials and permission errors on an s3:// URI: exit 2 and one line naming the URI and
what to configure, never the secret. The CLI runs in a child process with the AWS
environment it is given (a fresh boto3 and pyarrow: no client cached from other tests)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow as pa
import pytest

SECRET = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tidal_ray.data.datasets import DIGITS_SHAPE, load_digits
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    ids, pixels, labels = load_digits()
    _, _, session = train_in_process(TrainConfig(num_classes=10, input_shape=DIGITS_SHAPE, epochs=1),
                                     ids[:32], pixels[:32], labels[:32])
    return save_checkpoint(session.last_state, str(tmp_path_factory.mktemp("ck")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True  # any HTTP answer: the server is up
    except OSError:
        return False
    return True


def _score(pool: str, checkpoint: str, out: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([sys.executable, "-m", "tidal_ray.cli", "score", "--pool", pool, "--checkpoint",
                           checkpoint, "--k", "5", "--out", out], env={**base, **env}, capture_output=True,
                          text=True, timeout=300)


def test_no_credentials_is_exit_2_naming_the_pool(s3_bucket, checkpoint, tmp_path):
    from tidal_ray.data import storage

    storage.write_parquet(f"{s3_bucket}/pool/part-0.parquet", pa.table({"id": [1, 2], "features": [[0.5], [1.0]]}))
    empty = tmp_path / "empty"
    empty.write_text("")
    out = _score(f"{s3_bucket}/pool", checkpoint, str(tmp_path / "out"),
                 {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_REGION": "us-east-1",
                  "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_CONFIG_FILE": str(empty),
                  "AWS_EC2_METADATA_DISABLED": "true"})
    err = out.stderr.strip()
    assert out.returncode == 2, err
    assert err.count("\n") == 0 and f"{s3_bucket}/pool: no AWS credentials found" in err, err
    assert "AWS_PROFILE" in err and "AWS_ENDPOINT_URL" in err
    assert not (tmp_path / "out").exists()


def test_access_denied_is_exit_2_without_the_secret(checkpoint, tmp_path):
    """moto with its IAM checks on (INITIAL_NO_AUTH_ACTION_COUNT=0) answers 403 to a key it
    does not know, on list and get alike."""
    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}/"):
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.5)
        out = _score("s3://locked/pool", checkpoint, str(tmp_path / "out"),
                     {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
                      "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEUNKNOWN", "AWS_SECRET_ACCESS_KEY": SECRET,
                      "AWS_EC2_METADATA_DISABLED": "true"})
    finally:
        server.terminate()
        server.wait(timeout=30)
    err = out.stderr.strip()
    assert out.returncode == 2, err
    assert err.count("\n") == 0 and "s3://locked/pool: access denied (403)" in err, err
    assert SECRET not in err and "AWS_PROFILE" in err
