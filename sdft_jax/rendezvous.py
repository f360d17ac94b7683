"""The processes of a multi-process run meeting before JAX's own handshake, to fail with a clear error.

JAX's coordination service, when a process never arrives, aborts after its timeout with a bare
DEADLINE_EXCEEDED that names neither the coordinator nor the missing process. This small protocol
runs first (`meet`): every process announces itself to process 0, which answers once all have
arrived. A process that never starts, a coordinator port already taken, two processes claiming one
id, or hosts running different programs each end in a `RendezvousError` that names the coordinator
and the processes concerned, on every process, within the timeout.

The protocol: one JSON line each way over TCP, at the coordinator's own port. Process 0 listens on
the port JAX's coordination service will use and closes it before JAX binds it, so no second port
has to be opened between hosts. A peer sends `{"process_id", "num_processes", "fingerprint"}`;
process 0 answers every peer `{"ok": true}` once all have arrived, or `{"error": "..."}` as soon as
one is refused or the deadline passes. Peers close their side first (after reading the reply), which
keeps the coordinator's port free of TIME_WAIT connections for JAX.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from typing import Any

_log = logging.getLogger(__name__)

# A peer that finds no coordinator listening yet tries again after this pause (seconds), until its deadline.
RETRY_S = 0.2
# The longest a single connection attempt of a peer may take (seconds).
CONNECT_TIMEOUT_S = 5.0
# How long process 0 waits for the message of a new connection (seconds): a stray connection (a port
# scanner, a health check) that sends nothing must not hold up the processes behind it.
HELLO_TIMEOUT_S = 10.0
# Process 0 gives its verdict at its own deadline, which is about a peer's: a peer waits this much
# longer (seconds) for it before deciding that process 0 is gone.
VERDICT_GRACE_S = 10.0
# After answering, process 0 waits at most this long (seconds) for each peer to close its side first.
CLOSE_WAIT_S = 5.0
# Bytes read per `recv`, and the longest message accepted: anything longer is not one of ours.
RECV_BYTES = 4096
MAX_MESSAGE_BYTES = 65536


class RendezvousError(RuntimeError):
    """The processes did not all meet: one is missing, unreachable or mismatched."""


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets (`[::1]:8482`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Meeting:
    """What one process knows about the meeting it is part of."""

    host: str  # the coordinator (process 0)
    port: int
    num_processes: int
    process_id: int
    deadline: float  # time.monotonic() value by which everyone must have met
    timeout_s: float  # the timeout the deadline came from, for messages
    fingerprint: str  # equal on every process running the same program
    port_hint: str  # where the user chooses the coordinator port, for the port-in-use message

    @property
    def where(self) -> str:
        return address(self.host, self.port)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def meet(host: str, port: int, *, num_processes: int, process_id: int, timeout_s: float,
               fingerprint: str, port_hint: str = "the coordinator address") -> None:
    """Blocks until all `num_processes` processes have arrived at `host:port` (process 0's address).

    Every process must pass an equal `fingerprint` (e.g. versions and program name). `port_hint` says
    where the user sets the coordinator address, for the error when its port is already taken.
    Raises RendezvousError, on every process that is still there, if they have not all arrived
    within `timeout_s`, or as soon as one is refused (a duplicate id, another process count or
    fingerprint).
    """
    meeting = _Meeting(host=host, port=port, num_processes=num_processes, process_id=process_id,
                       deadline=time.monotonic() + timeout_s, timeout_s=timeout_s, fingerprint=fingerprint,
                       port_hint=port_hint)
    if process_id == 0:
        _coordinate(meeting)
    else:
        _join(meeting)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the peer is gone; it has its own error to report


def _read_message(conn: socket.socket, deadline: float) -> dict[str, Any] | None:
    """One JSON object line from `conn`, or None on EOF, garbage, an overlong message or the deadline."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(RECV_BYTES)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_MESSAGE_BYTES:
            return None
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _listen(meeting: _Meeting) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", meeting.port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", meeting.port))
    except OSError as e:
        raise RendezvousError(
            f"process 0 cannot listen on the coordinator port {meeting.port} ({meeting.where}): {e.strerror or e}. "
            f"Another program (or an earlier run still shutting down) holds it; choose another port in "
            f"{meeting.port_hint}.") from e


def _coordinate(meeting: _Meeting) -> None:
    """Process 0: accepts a hello from every other process, then answers them all."""
    n = meeting.num_processes
    server = _listen(meeting)
    joined: dict[int, socket.socket] = {}
    try:
        while len(joined) < n - 1:
            left = meeting.left()
            if left <= 0:
                missing = sorted(set(range(1, n)) - set(joined))
                error = (f"process 0 of {n} waited {meeting.timeout_s:g} s at coordinator {meeting.where}, but "
                         f"process(es) {missing} never joined (joined: {sorted([0, *joined])}). Start the same "
                         f"program on every host with the same coordinator address, and check that port "
                         f"{meeting.port} is reachable from them.")
                for conn in joined.values():
                    _send(conn, {"error": error})
                raise RendezvousError(error)
            server.settimeout(left)
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            hello = _read_message(conn, min(meeting.deadline, time.monotonic() + HELLO_TIMEOUT_S))
            if hello is None:
                _log.warning("ignoring a connection from %s that sent no rendezvous message", peer[0])
                conn.close()
                continue
            problem = _check_hello(hello, meeting, joined)
            if problem is None:
                joined[hello["process_id"]] = conn
                _log.info("process %d of %d joined from %s", hello["process_id"], n, peer[0])
                continue
            error = f"coordinator {meeting.where} refused process {hello.get('process_id')!r} from {peer[0]}: {problem}"
            _send(conn, {"error": error})
            conn.close()
            for other in joined.values():
                _send(other, {"error": error})
            raise RendezvousError(error)
        for conn in joined.values():
            _send(conn, {"ok": True})
        for conn in joined.values():
            _read_message(conn, min(meeting.deadline, time.monotonic() + CLOSE_WAIT_S))  # returns at the peer's close
    finally:
        for conn in joined.values():
            conn.close()
        server.close()


def _check_hello(hello: dict[str, Any], meeting: _Meeting, joined: dict[int, socket.socket]) -> str | None:
    """Why process 0 refuses this hello, or None to accept it."""
    pid, n = hello.get("process_id"), hello.get("num_processes")
    if n != meeting.num_processes:
        return f"it was started with num_processes={n}, process 0 with {meeting.num_processes}"
    if not isinstance(pid, int) or not 0 < pid < meeting.num_processes:
        return f"process id {pid!r} is not in 1..{meeting.num_processes - 1}"
    if pid in joined:
        return f"process id {pid} was already taken by another process; every process needs its own id"
    if hello.get("fingerprint") != meeting.fingerprint:
        return (f"it runs a different program: {hello.get('fingerprint')!r}, process 0 runs {meeting.fingerprint!r}; "
                "install the same code on every host")
    return None


def _join(meeting: _Meeting) -> None:
    """Any other process: connects to process 0 (retrying until it listens), says hello, awaits the verdict."""
    who = f"process {meeting.process_id} of {meeting.num_processes}"
    last_error: OSError | None = None
    while True:
        left = meeting.left()
        if left <= 0:
            raise RendezvousError(
                f"{who} could not reach the coordinator {meeting.where} (process 0) within {meeting.timeout_s:g} s "
                f"({last_error}). Is process 0 running the same program, and is port {meeting.port} on "
                f"{meeting.host} reachable from this host?")
        try:
            conn = socket.create_connection((meeting.host, meeting.port), timeout=min(left, CONNECT_TIMEOUT_S))
            break
        except OSError as e:
            last_error = e
            time.sleep(min(RETRY_S, max(0.0, meeting.left())))
    with conn:
        _send(conn, {"process_id": meeting.process_id, "num_processes": meeting.num_processes,
                     "fingerprint": meeting.fingerprint})
        reply = _read_message(conn, meeting.deadline + VERDICT_GRACE_S)
    if reply is None:
        raise RendezvousError(
            f"{who}: the coordinator {meeting.where} did not confirm within {meeting.timeout_s:g} s that all "
            f"processes joined (it closed the connection or stopped answering)")
    if "error" in reply:
        raise RendezvousError(f"{who}: {reply['error']}")
