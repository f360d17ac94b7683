"""Processes meeting at the coordinator's port before JAX's handshake (threads stand in for processes).

Every failure (a process missing, a coordinator unreachable, a duplicate id, another program or
process count, the port taken) must end in an error naming the coordinator and the processes
concerned, on every side, within the timeout; a stray connection must not disturb the meeting.
"""

import contextlib
import socket
import threading
import time

import pytest

from sdft_jax import rendezvous
from sdft_jax.rendezvous import RendezvousError

FINGERPRINT = "test program"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_processes(port, ids, num_processes, timeout_s=10.0, fingerprints=None, delays=None):
    """Runs `meet` for each id in its own thread; returns {id: None or the exception}."""
    results = {}

    def one(pid):
        time.sleep((delays or {}).get(pid, 0.0))
        try:
            rendezvous.meet("localhost", port, num_processes=num_processes, process_id=pid, timeout_s=timeout_s,
                            fingerprint=(fingerprints or {}).get(pid, FINGERPRINT))
            results[pid] = None
        except RendezvousError as e:
            results[pid] = e

    threads = [threading.Thread(target=one, args=(pid,)) for pid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 20)
        assert not t.is_alive(), "meet did not return within its timeout"
    return results


def test_rendezvous_all_join_in_any_order():
    # Peers started before the coordinator keep retrying until it listens.
    results = run_processes(free_port(), [2, 1, 0], 3, delays={0: 0.5, 1: 0.2})
    assert results == {0: None, 1: None, 2: None}


def test_rendezvous_missing_process_fails_on_every_side():
    port = free_port()
    start = time.monotonic()
    results = run_processes(port, [0, 1], 3, timeout_s=1.5)
    assert time.monotonic() - start < 10
    message = str(results[0])
    assert f"coordinator localhost:{port}" in message and "process(es) [2] never joined" in message
    assert "process(es) [2] never joined" in str(results[1])  # told by the coordinator


def test_rendezvous_unreachable_coordinator():
    port = free_port()
    results = run_processes(port, [1], 2, timeout_s=1.0)
    assert f"could not reach the coordinator localhost:{port} (process 0) within 1 s" in str(results[1])


@pytest.mark.parametrize("case, match", [
    ("duplicate", "process id 1 was already taken"),
    ("fingerprint", "runs a different program"),
])
def test_rendezvous_refuses_mismatched_processes(case, match):
    port = free_port()
    if case == "duplicate":
        results = run_processes(port, [0, 1, 1], 3, timeout_s=5.0, delays={0: 0.3})
        failed = [r for r in results.values() if r is not None]
    else:
        results = run_processes(port, [0, 1], 2, timeout_s=5.0, fingerprints={1: "other program"})
        failed = [results[0], results[1]]
    assert failed and all(match in str(e) for e in failed)


def test_rendezvous_refuses_other_process_count():
    port = free_port()
    results = {}

    def peer():
        try:
            rendezvous.meet("localhost", port, num_processes=3, process_id=1, timeout_s=5, fingerprint=FINGERPRINT)
        except RendezvousError as e:
            results[1] = e

    t = threading.Thread(target=peer)
    t.start()
    with pytest.raises(RendezvousError, match="started with num_processes=3, process 0 with 2"):
        rendezvous.meet("localhost", port, num_processes=2, process_id=0, timeout_s=5, fingerprint=FINGERPRINT)
    t.join(timeout=10)
    assert "num_processes=3" in str(results[1])


def test_rendezvous_ignores_a_stray_connection():
    port = free_port()

    def stray():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return
            time.sleep(0.05)

    t = threading.Thread(target=stray)
    t.start()
    results = run_processes(port, [0, 1], 2, delays={1: 0.5})
    t.join(timeout=10)
    assert results == {0: None, 1: None}


def test_rendezvous_port_in_use():
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RendezvousError, match=f"cannot listen on the coordinator port {port}"):
            rendezvous.meet("localhost", port, num_processes=2, process_id=0, timeout_s=1, fingerprint=FINGERPRINT)
        with pytest.raises(RendezvousError, match="choose another port in the flag --coordinator"):
            rendezvous.meet("localhost", port, num_processes=2, process_id=0, timeout_s=1, fingerprint=FINGERPRINT,
                            port_hint="the flag --coordinator")


@pytest.mark.parametrize("host, port, expected", [("localhost", 1, "localhost:1"), ("::1", 99, "[::1]:99")])
def test_address_brackets_ipv6_hosts(host, port, expected):
    assert rendezvous.address(host, port) == expected
