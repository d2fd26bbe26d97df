"""Load a page in headless Chromium and list what went wrong (stdlib only).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
NUL-terminated JSON, we write to its fd 3 and read its fd 4). ``page_problems(url)``
returns console errors, uncaught exceptions, error log entries, failed loads and HTTP
errors; an empty list means the page loaded cleanly.
"""
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM = "chromium"  # Debian's package (`apt-get install chromium`)


def chromium_path():
    return shutil.which(CHROMIUM)


class _Pipe:
    def __init__(self, write_fd, read_fd):
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer, self.next_id, self.events = b"", 0, []

    def send(self, method, params=None, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        return self.next_id

    def receive(self, deadline):
        """The next message, or None when nothing comes before ``deadline``."""
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                return None
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method, deadline, params=None, session=None):
        wanted = self.send(method, params, session)
        while True:
            message = self.receive(deadline)
            if message is None:
                raise TimeoutError(f"chromium did not answer {method}")
            if message.get("id") == wanted:
                return message.get("result", message.get("error"))
            self.events.append(message)


def _load(pipe, url, deadline, settle):
    target = pipe.call("Target.createTarget", deadline, {"url": "about:blank"})["targetId"]
    session = pipe.call("Target.attachToTarget", deadline, {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
        pipe.call(domain, deadline, session=session)
    pipe.call("Page.navigate", deadline, {"url": url}, session=session)
    loaded = None
    while True:  # until the load event, then ``settle`` seconds of late messages
        message = pipe.receive(min(deadline, loaded + settle) if loaded else deadline)
        if message is None:
            if loaded:
                return
            raise TimeoutError(f"{url} did not load")
        pipe.events.append(message)
        if message.get("method") == "Page.loadEventFired":
            loaded = time.monotonic()


def _problem(message):
    method, p = message.get("method"), message.get("params", {})
    if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
        return f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
    if method == "Runtime.exceptionThrown":
        details = p["exceptionDetails"]
        return "exception: " + (details.get("exception", {}).get("description") or details["text"]).splitlines()[0]
    if method == "Log.entryAdded" and p["entry"]["level"] == "error":
        return f"log[{p['entry']['source']}]: {p['entry']['text']} {p['entry'].get('url', '')}"
    if method == "Network.loadingFailed":
        return f"loading failed: {p['errorText']} ({p.get('type')})"
    if method == "Network.responseReceived" and p["response"]["status"] >= 400:
        return f"http {p['response']['status']}: {p['response']['url']}"
    return None


def page_problems(url, timeout=60.0, settle=0.5):
    """Open ``url`` in a fresh headless Chromium; returns the list of problems seen."""
    chromium_in, to_chromium = os.pipe()
    chromium_out, from_chromium = os.pipe()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")

    def in_child():
        # Chromium reads fd 3 and writes fd 4. Copy the pipe ends there by way of fds >= 10
        # (either end may itself be 3 or 4); dup2's copies stay open across exec, and every
        # other fd of ours closes there (Python opens them close-on-exec).
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (chromium_in, from_chromium)]
        for target, fd in zip((3, 4), high):
            os.dup2(fd, target)
            os.close(fd)

    proc = subprocess.Popen(
        [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
         f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
        close_fds=False, preexec_fn=in_child, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(chromium_in)
    os.close(from_chromium)
    pipe = _Pipe(to_chromium, chromium_out)
    try:
        _load(pipe, url, time.monotonic() + timeout, settle)
    finally:
        try:
            os.write(to_chromium, json.dumps({"id": 10**6, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_chromium)
        os.close(chromium_out)
        shutil.rmtree(profile, ignore_errors=True)
    return [p for p in map(_problem, pipe.events) if p]
