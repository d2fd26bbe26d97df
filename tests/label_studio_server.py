"""A real Label Studio server on 127.0.0.1 for slow tests (stdlib only).

Label Studio lives in its own virtual environment, never in the project's, with every
package pinned by tests/label-studio-constraints.txt:

    make label-studio

    with running_label_studio(document_root) as ls:
        pid = ls.create_project(config_xml)
        ls.add_local_files_storage(pid, document_root / "samples")  # needed to serve files
        ls.import_tasks(pid, tasks)
        ls.annotate(ls.tasks(pid)[0]["id"], "cat")
        data = ls.export(pid, "JSON")

Files are served as /data/local-files/?d=<path relative to document_root>, but only
below a Local Files storage of the project, which must be a strict subdirectory of
document_root. A first start (fresh database, migrations) takes about a minute.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

LABEL_STUDIO = Path(__file__).resolve().parent.parent / ".venv-label-studio" / "bin" / "label-studio"


class LabelStudio:
    def __init__(self, url, token):
        self.url = url
        self.token = token

    def request(self, method, path, body=None):
        """(status, bytes); HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Token {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path):
        return self.request("GET", path)

    def _json(self, method, path, body=None):
        status, data = self.request(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data) if data.strip() else None

    def create_project(self, config_xml, title="tidal-ray"):
        return self._json("POST", "/api/projects", {"title": title, "label_config": config_xml})["id"]

    def add_local_files_storage(self, project_id, path):
        """Allow /data/local-files/ to serve files under `path` (a subdirectory of the document root)."""
        body = {"project": project_id, "path": str(path), "title": Path(path).name}
        return self._json("POST", "/api/storages/localfiles", body)["id"]

    def import_tasks(self, project_id, tasks):
        return self._json("POST", f"/api/projects/{project_id}/import", tasks)

    def tasks(self, project_id):
        """Every task of the project, with data, predictions and annotations, by id."""
        out, page = [], 1
        while True:
            got = self._json("GET", f"/api/tasks?project={project_id}&fields=all&page={page}&page_size=100")
            out += got["tasks"]
            if not got["tasks"] or len(out) >= got["total"]:
                return sorted(out, key=lambda t: t["id"])
            page += 1

    def annotate(self, task_id, choice, from_name="label", to_name="image"):
        result = [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [choice]}}]
        return self._json("POST", f"/api/tasks/{task_id}/annotations", {"result": result})

    def skip(self, task_id):
        """What the Skip button does: a cancelled annotation with an empty result."""
        return self._json("POST", f"/api/tasks/{task_id}/annotations", {"result": [], "was_cancelled": True})

    def export(self, project_id, export_type="JSON", all_tasks=False):
        query = f"exportType={export_type}" + ("&download_all_tasks=true" if all_tasks else "")
        status, data = self.get(f"/api/projects/{project_id}/export?{query}")
        if status != 200:
            raise RuntimeError(f"export {export_type}: HTTP {status}: {data[:500]!r}")
        return data


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_label_studio(document_root, timeout=300.0, env=None):
    """Start Label Studio on a free loopback port, yield a LabelStudio client, stop it on exit."""
    if not LABEL_STUDIO.exists():
        raise RuntimeError(f"{LABEL_STUDIO} not found: `make label-studio` installs it")
    data_dir = tempfile.mkdtemp(prefix="label-studio-")
    port, token = _free_port(), secrets.token_hex(20)
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    full_env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": data_dir,
        "LABEL_STUDIO_USERNAME": "tidal-ray@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_hex(12),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(Path(document_root).resolve()),
        "SSRF_PROTECTION_ENABLED": "false",  # only so it can reach a loopback S3
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
    })
    full_env.update(env or {})
    log_path = Path(data_dir) / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
        env=full_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ls = LabelStudio(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                status = ls.get("/api/current-user/whoami")[0]
            except OSError:
                status = None
            if status == 200:
                break
            if status in (401, 403):
                raise RuntimeError(f"Label Studio rejected the API token (HTTP {status}):\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio did not answer on port {port} within {timeout:.0f}s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield ls
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _tail(path, n=40):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
