"""The campaign lease: compare-and-swap takeover (local version files, S3 If-Match on
moto's server), renewal, a dead local holder, and refusals that name the holder."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tidal_ray.campaign.lock import CampaignLock, CampaignLocked, read_lease, store_of


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "campaign")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/lease-{os.getpid()}-{time.time_ns()}"


def put_lease(root, host, expires_in):
    store = store_of(root)
    _, version = store.read()
    expires = time.time() + expires_in
    record = {"holder": {"host": host, "pid": 4242, "token": "elsewhere"}, "since": "2026-01-01T00:00:00Z",
              "expires": expires, "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))}
    assert store.swap(version, record) is not None
    return record


def wait_for(predicate, what, limit=60.0):
    deadline = time.time() + limit
    while not predicate():
        assert time.time() < deadline, f"never saw {what}"
        time.sleep(0.05)


def test_expired_lease_of_another_host_is_taken_over_and_a_live_one_refused(root):
    put_lease(root, "replaced-head-node", expires_in=-1)
    with CampaignLock(root) as lease:
        held = read_lease(root)
        assert held["holder"]["token"] == lease.holder["token"] and held["expires"] > time.time()
    assert read_lease(root)["holder"] is None                             # released, never deleted

    record = put_lease(root, "other-host", expires_in=600)
    with pytest.raises(CampaignLocked) as refused:
        with CampaignLock(root):
            pass
    line = str(refused.value)
    assert "pid 4242 on other-host" in line and f"until {record['until']}" in line and "\n" not in line
    assert read_lease(root)["holder"]["host"] == "other-host"             # untouched


def test_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(root):
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\nfrom tidal_ray.campaign.lock import CampaignLock\n"
         "with CampaignLock(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)\n", root], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left = read_lease(root)
    assert left["holder"] is not None and left["expires"] > time.time()  # a live lease, left behind
    with CampaignLock(root) as lease:                                     # not after 2 minutes: now
        assert read_lease(root)["holder"]["token"] == lease.holder["token"]


def test_renewal_moves_the_expiry_and_a_lost_lease_stops_the_driver(root):
    with CampaignLock(root, ttl_s=600, renew_s=0.2) as lease:
        first = read_lease(root)["expires"]
        wait_for(lambda: read_lease(root)["expires"] > first, "a renewal")
        # Another driver took the lease (this one was stalled past its expiry).
        with lease._mutex:
            taken = store_of(root).swap(lease.version, {"holder": {"host": "h2", "pid": 1, "token": "t2"},
                                                        "expires": time.time() + 600})
        assert taken is not None
        wait_for(lambda: lease.lost, "the renewal failing")
        with pytest.raises(CampaignLocked, match="another driver took it"):
            lease.check()
    assert read_lease(root)["holder"]["token"] == "t2"                    # the loser did not release it


RACER = """
import sys, time
from tidal_ray.campaign.lock import CampaignLock, CampaignLocked
root, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    with CampaignLock(root):
        print("won", flush=True)
        time.sleep(float(sys.argv[3]))
except CampaignLocked as e:
    print("refused", e, flush=True)
"""


def test_two_drivers_race_for_an_expired_lease_and_exactly_one_wins(root):
    put_lease(root, "replaced-head-node", expires_in=-1)
    start = time.time() + 6  # both processes imported and waiting by then
    racers = [subprocess.Popen([sys.executable, "-c", RACER, root, str(start), "3"], stdout=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outs = [r.communicate(timeout=120)[0].strip() for r in racers]
    assert sorted(o.split()[0] for o in outs) == ["refused", "won"], outs
    winner = racers[[o.split()[0] for o in outs].index("won")]
    assert f"pid {winner.pid} on " in next(o for o in outs if o.startswith("refused"))
    assert read_lease(root)["holder"] is None
