"""One driver per campaign: ``lock.json`` under the campaign, created conditionally
(an exclusive create locally, a conditional PUT on S3)."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from tidal_ray.data import storage
from tidal_ray.errors import Refused


class CampaignLocked(Refused):
    """Another driver holds the campaign."""


class CampaignLock:
    """``lock.json`` created conditionally; a lock left by a dead process on this host
    (a killed driver) is taken over, any other is refused."""

    def __init__(self, root: str):
        self.uri = storage.join(root, "lock.json")
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def __enter__(self):
        body = json.dumps(self.owner).encode()
        if storage.put_if_absent(self.uri, body):
            return self
        try:
            holder = storage.read_json(self.uri)
        except (FileNotFoundError, json.JSONDecodeError):
            holder = {}
        if holder and self._is_stale(holder):
            storage.delete(self.uri)
            if storage.put_if_absent(self.uri, body):
                return self
            holder = storage.read_json(self.uri)
        raise CampaignLocked(
            f"campaign is in use by another driver (pid {holder.get('pid')} on {holder.get('host')} "
            f"since {holder.get('since')}); if no driver is running, delete {self.uri}"
        )

    def __exit__(self, *exc):
        try:
            if storage.read_json(self.uri).get("token") == self.owner["token"]:
                storage.delete(self.uri)
        except FileNotFoundError:
            pass
