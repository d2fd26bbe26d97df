"""One driver per campaign: a lease with a holder (host, pid, random token) and an
expiry, renewed by the running driver.

Every change of the lease is a compare-and-swap on its version, so of two drivers
that find it free exactly one gets it, and nothing is ever deleted:
- on S3, ``lock.json``, written with If-None-Match: * (create) or If-Match on the
  ETag read (replace);
- locally, ``lock-NNNNNNNNN.json`` files, the highest version being the lease: the
  next version is created exclusively (never a rename), older ones are then pruned.
A lease is free when released, expired, or held by a dead process on this host (a
killed driver: taken over at once). Expiries are compared across hosts, so hosts'
clocks are assumed to agree to well within the lease's length.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid

from tidal_ray.data import storage
from tidal_ray.errors import Refused

TTL_S = 120.0
RENEW_S = 30.0


class CampaignLocked(Refused):
    """Another driver holds the campaign, or this one lost its lease."""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class S3Lease:
    """``lock.json`` on S3; its version is the ETag."""

    def __init__(self, root: str):
        self.uri = storage.join(root, "lock.json")

    def read(self) -> tuple[dict | None, str | None]:
        got = storage.read_with_etag(self.uri)
        return (None, None) if got is None else (json.loads(got[0]), got[1])

    def swap(self, version: str | None, lease: dict) -> str | None:
        return storage.put_conditional(self.uri, json.dumps(lease).encode(), version)


class LocalLease:
    """``lock-NNNNNNNNN.json`` under a local campaign; the highest version is the lease."""

    NAME = re.compile(r"^lock-(\d{9})\.json$")

    def __init__(self, root: str):
        self.dir = os.path.abspath(root)

    def _path(self, version: int) -> str:
        return os.path.join(self.dir, f"lock-{version:09d}.json")

    def versions(self) -> list[int]:
        names = os.listdir(self.dir) if os.path.isdir(self.dir) else []
        return sorted(int(m.group(1)) for m in map(self.NAME.match, names) if m)

    def read(self) -> tuple[dict | None, int | None]:
        while True:
            versions = self.versions()
            if not versions:
                return None, None
            try:
                with open(self._path(versions[-1])) as f:
                    return json.load(f), versions[-1]
            except FileNotFoundError:
                continue  # pruned by a newer version's writer: list again

    def swap(self, version: int | None, lease: dict) -> int | None:
        new = (version or 0) + 1
        if not storage.put_if_absent(self._path(new), json.dumps(lease).encode()):
            return None
        if self.versions()[-1] != new:
            # A writer that stalled past pruning can recreate an old version's name:
            # only the highest version counts, so this one lost.
            os.unlink(self._path(new))
            return None
        for old in self.versions():
            if old < new:
                try:
                    os.unlink(self._path(old))
                except FileNotFoundError:
                    pass
        return new


def store_of(root: str):
    return S3Lease(root) if storage.is_s3(root) else LocalLease(root)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def is_free(lease: dict | None, now: float) -> bool:
    holder = (lease or {}).get("holder")
    if not holder:
        return True
    if float(lease.get("expires", 0)) <= now:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def read_lease(root: str) -> dict | None:
    """The campaign's lease as stored (None if it never had one)."""
    return store_of(root).read()[0]


def holder_line(lease: dict) -> str:
    holder = lease["holder"]
    return f"pid {holder.get('pid')} on {holder.get('host')} since {lease.get('since')}, lease until {lease.get('until')}"


class CampaignLock:
    """Hold the campaign's lease for a ``with`` block, renewed every ``renew_s`` by a
    daemon thread. ``wait``: seconds to keep trying while another driver holds it.
    ``check()`` raises once a renewal found the lease taken (the driver was stalled
    past its expiry), so the driver stops before writing state."""

    def __init__(self, root: str, ttl_s: float = TTL_S, renew_s: float = RENEW_S, wait: float = 0.0):
        self.root, self.ttl_s, self.renew_s, self.wait = root, ttl_s, renew_s, wait
        self.store = store_of(root)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.version = None
        self.since = None
        self.lost = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def _record(self, held: bool = True) -> dict:
        now = time.time()
        if not held:
            return {"holder": None, "released": _iso(now)}
        return {"holder": self.holder, "since": self.since, "expires": now + self.ttl_s,
                "until": _iso(now + self.ttl_s)}

    def __enter__(self):
        deadline = time.time() + self.wait
        while True:
            lease, version = self.store.read()
            if is_free(lease, time.time()):
                self.since = _iso(time.time())
                new = self.store.swap(version, self._record())
                if new is not None:
                    self.version = new
                    break
                continue  # another driver swapped first: look at what it wrote
            if time.time() >= deadline:
                raise CampaignLocked(f"campaign {self.root} is in use by another driver ({holder_line(lease)}; "
                                     f"renewed every {self.renew_s:.0f}s while it runs, free once it expires)")
            time.sleep(0.5)
        self._thread = threading.Thread(target=self._renew_loop, name="campaign-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            with self._mutex:
                if self.lost:
                    return
                try:
                    new = self.store.swap(self.version, self._record())
                except Exception:  # a storage fault outlasting its retries: try again next time
                    continue
                if new is None:
                    self.lost = True
                    return
                self.version = new

    def check(self) -> None:
        if self.lost:
            raise CampaignLocked(f"campaign {self.root}: this driver's lease expired and another driver took it; "
                                 "stopping")

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if not self.lost:
                try:
                    self.store.swap(self.version, self._record(held=False))
                except Exception:  # not released: the lease expires by itself
                    pass
