"""The engine under systemd: sd_notify datagrams from a real ``tempest run`` process.

Each test binds an AF_UNIX datagram socket standing in for systemd and points
the engine's NOTIFY_SOCKET at it. tests/test_systemd.py covers the Notifier
itself; this is the engine's side: when it says READY, STATUS, WATCHDOG,
STOPPING and EXTEND_TIMEOUT_USEC.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .test_signals import SCRIPTS, Running, clean_env

pytestmark = pytest.mark.timeout(30)


class Systemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[tuple[float, str]] = []

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.received.append((time.monotonic(), data.decode("utf-8")))
        return True

    def wait(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The first datagram from now on that satisfies *predicate*; fail after *timeout*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._recv(deadline - time.monotonic()) and predicate(self.received[-1][1]):
                return self.received[-1][1]
        raise AssertionError(f"no matching datagram in {timeout}s; got {self.received[-5:]}")

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        """Every datagram that arrives in the next *seconds*."""
        start = len(self.received)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._recv(deadline - time.monotonic())
        return self.received[start:]

    def close(self) -> None:
        self.sock.close()


def fields(datagram: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.splitlines())


@contextmanager
def under_systemd(tmp_path: Path, *flags: str, notify_socket: str | None = None,
                  **env: str) -> Iterator[tuple[Running, Systemd]]:
    """Bind the socket, start ``tempest run sig_app:SigEngine`` against it; kill both after."""
    if notify_socket is None:
        notify_socket = str(tmp_path / "notify.sock")
    address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    systemd = Systemd(address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tempest", "run", "sig_app:SigEngine",
         "--log-dir", str(tmp_path / "logs"), *flags],
        cwd=SCRIPTS, env=clean_env(SIG_DIR=str(tmp_path), NOTIFY_SOCKET=notify_socket, **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield Running(proc, tmp_path), systemd
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
        systemd.close()
    assert err == "", err


def test_ready_status_watchdog_and_stopping(tmp_path):
    """READY=1 with a STATUS, STATUS updates, WATCHDOG=1 at half WATCHDOG_USEC, STOPPING=1."""
    with under_systemd(tmp_path, WATCHDOG_USEC="200000") as (run, systemd):
        ready = fields(systemd.wait(lambda d: "READY=1" in d))
        assert ready["STATUS"] == ("0 processed, 0 running, 0 queued, 0 scheduled, 0 failed, "
                                   "0 timed out")
        assert systemd.received[0][1].startswith("READY=1")  # nothing before READY
        window = systemd.collect(2.5)
        pings = [t for t, d in window if d == "WATCHDOG=1"]
        assert 15 <= len(pings) <= 40  # every 0.1 s: half of WATCHDOG_USEC
        assert max(b - a for a, b in itertools.pairwise(pings)) < 0.5
        assert [d for _, d in window if d.startswith("STATUS=")]  # every 2 s
        run.send(signal.SIGTERM)
        stopping = fields(systemd.wait(lambda d: "STOPPING=1" in d))
        assert stopping["STATUS"] == "stopping: SIGTERM received"
        assert run.exit_code() == 0
        systemd.collect(0.1)  # anything still in flight
        sent = [d for _, d in systemd.received]
        after = sent[next(i for i, d in enumerate(sent) if "STOPPING=1" in d):]
        assert "WATCHDOG=1" not in after  # systemd's stop timeout rules from here


def test_extend_timeout_while_draining(tmp_path):
    """While a task drains, EXTEND_TIMEOUT_USEC (and a draining STATUS) keep systemd waiting."""
    with under_systemd(tmp_path, SIG_SHUTDOWN="10", SIG_TASKS="sleep:1.5") as (run, systemd):
        systemd.wait(lambda d: "READY=1" in d)
        run.wait_started("t0")
        run.send(signal.SIGTERM)
        systemd.wait(lambda d: "STOPPING=1" in d)
        extend = int(fields(systemd.wait(lambda d: "EXTEND_TIMEOUT_USEC" in d))[
            "EXTEND_TIMEOUT_USEC"])
        assert 10_000_000 <= extend <= 12_000_000  # the drain left, plus a margin
        status = fields(systemd.wait(lambda d: d.startswith("STATUS=draining")))["STATUS"]
        assert re.fullmatch(r"draining: 1 running, \d+s left", status)
        assert run.exit_code() == 0
        assert "task_id=t0 task=SigSleeper outcome=success" in run.read(run.main)


def test_abstract_socket_name(tmp_path):
    """An abstract NOTIFY_SOCKET (@name) works: READY=1 and STOPPING=1 on a --burst run."""
    name = f"@tempest-test-{uuid.uuid4().hex}"
    with under_systemd(tmp_path, "--burst", notify_socket=name,
                       SIG_TASKS="sleep:0.1") as (run, systemd):
        systemd.wait(lambda d: "READY=1" in d)
        assert fields(systemd.wait(lambda d: "STOPPING=1" in d))["STATUS"] == (
            "stopping: drained")
        assert run.exit_code() == 0


def test_wedged_dispatcher_stops_watchdog_pings(tmp_path):
    """A dispatcher stuck in dequeue stops the WATCHDOG=1 pings while the process lives on."""
    with under_systemd(tmp_path, SIG_QUEUE="wedge", SIG_THREADS="1",
                       WATCHDOG_USEC="200000") as (run, systemd):
        systemd.wait(lambda d: "READY=1" in d)
        assert sum(d == "WATCHDOG=1" for _, d in systemd.collect(0.5)) >= 3
        (tmp_path / "wedge").touch()  # the next dequeue (within 0.25 s) never returns
        wedged = time.monotonic()
        last_ping = wedged
        while time.monotonic() - last_ping < 2.5:  # until 2.5 s without a ping
            assert time.monotonic() - wedged < 12, "the watchdog pings never stopped"
            for t, d in systemd.collect(0.1):
                if d == "WATCHDOG=1":
                    last_ping = t
        assert run.proc.poll() is None  # alive, so only systemd's watchdog would restart it
        # ...and its control loop too: STATUS updates go on without the pings.
        assert [d for t, d in systemd.received if t > last_ping and d.startswith("STATUS=")]
