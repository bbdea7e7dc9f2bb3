"""Tests for tempest.systemd: the sd_notify protocol over a real socket."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tempest.systemd import Notifier

pytestmark = pytest.mark.timeout(10)

RECV_TIMEOUT = 5.0


def _receiver(address: str) -> socket.socket:
    """Bind a datagram socket at ``address`` standing in for systemd."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT)
    return sock


def _recv(sock: socket.socket) -> str:
    """Return the next datagram on ``sock`` as text, failing after a timeout."""
    return sock.recv(65536).decode("utf-8")


def _drain(sock: socket.socket) -> int:
    """Read every datagram already queued on ``sock``; return how many."""
    count = 0
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.recv(65536)
            except BlockingIOError:
                return count
            count += 1
    finally:
        sock.settimeout(RECV_TIMEOUT)


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    """A short socket path inside the test's temporary directory."""
    return str(tmp_path / "n.sock")


@pytest.fixture
def listener(socket_path: str) -> Iterator[socket.socket]:
    """A bound receiver at ``socket_path``."""
    sock = _receiver(socket_path)
    yield sock
    sock.close()


@pytest.fixture
def notifier(socket_path: str, listener: socket.socket) -> Iterator[Notifier]:
    """A notifier built from an environment pointing at ``listener``."""
    n = Notifier.from_environ({"NOTIFY_SOCKET": socket_path})
    yield n
    n.close()


def test_ready_with_status(notifier: Notifier, listener: socket.socket) -> None:
    """ready(status) sends READY=1 and STATUS in a single datagram."""
    assert notifier.enabled
    assert notifier.ready(status="4 workers up") is True
    assert _recv(listener) == "READY=1\nSTATUS=4 workers up"
    assert notifier.failures == 0


def test_ready_without_status(notifier: Notifier, listener: socket.socket) -> None:
    """ready() with no status sends just READY=1."""
    notifier.ready()
    assert _recv(listener) == "READY=1"


def test_status(notifier: Notifier, listener: socket.socket) -> None:
    """status(text) sends a STATUS= line."""
    notifier.status("3 running, 7 queued")
    assert _recv(listener) == "STATUS=3 running, 7 queued"


def test_status_newlines_cannot_inject_fields(
    notifier: Notifier, listener: socket.socket
) -> None:
    """Newlines (and NULs) in a status become spaces, so no extra field is sent."""
    notifier.status("bad\nREADY=1\r\nSTOPPING=1\rx\0y")
    message = _recv(listener)
    assert message == "STATUS=bad READY=1 STOPPING=1 x y"
    assert message.splitlines() == [message]


def test_ready_and_stopping_status_are_cleaned(
    notifier: Notifier, listener: socket.socket
) -> None:
    """The optional status of ready() and stopping() is newline-stripped too."""
    notifier.ready(status="up\nWATCHDOG=1")
    assert _recv(listener) == "READY=1\nSTATUS=up WATCHDOG=1"
    notifier.stopping(status="bye\nREADY=1")
    assert _recv(listener) == "STOPPING=1\nSTATUS=bye READY=1"


def test_very_long_status_is_truncated(
    notifier: Notifier, listener: socket.socket
) -> None:
    """An over-long status is cut so the message fits systemd's 4 KiB buffer."""
    notifier.ready(status="é" * 10_000)
    message = _recv(listener)
    assert message.startswith("READY=1\nSTATUS=éé")
    assert len(message.encode("utf-8")) < 4096


def test_stopping(notifier: Notifier, listener: socket.socket) -> None:
    """stopping() sends STOPPING=1."""
    notifier.stopping()
    assert _recv(listener) == "STOPPING=1"


def test_watchdog(notifier: Notifier, listener: socket.socket) -> None:
    """watchdog() sends WATCHDOG=1."""
    notifier.watchdog()
    assert _recv(listener) == "WATCHDOG=1"


@pytest.mark.parametrize(
    ("seconds", "usec"),
    [(1.5, "1500000"), (30, "30000000"), (0.1, "100000"), (0, "0")],
)
def test_extend_timeout_in_microseconds(
    notifier: Notifier, listener: socket.socket, seconds: float, usec: str
) -> None:
    """extend_timeout(seconds) sends EXTEND_TIMEOUT_USEC in whole microseconds."""
    notifier.extend_timeout(seconds)
    assert _recv(listener) == f"EXTEND_TIMEOUT_USEC={usec}"


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_extend_timeout_rejects_bad_values(notifier: Notifier, seconds: float) -> None:
    """extend_timeout() refuses negative, NaN and infinite durations."""
    with pytest.raises(ValueError, match="non-negative"):
        notifier.extend_timeout(seconds)


def test_send_raw_state(notifier: Notifier, listener: socket.socket) -> None:
    """send() delivers the given KEY=value lines unchanged."""
    assert notifier.send("STATUS=a\nWATCHDOG=1") is True
    assert _recv(listener) == "STATUS=a\nWATCHDOG=1"


def test_abstract_socket_name() -> None:
    """An @name NOTIFY_SOCKET reaches the abstract socket of that name."""
    name = f"tempest-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.enabled
        assert n.ready(status="abstract") is True
        assert _recv(sock) == "READY=1\nSTATUS=abstract"
        assert n.failures == 0
    finally:
        n.close()
        sock.close()


def test_close_is_idempotent_and_sending_still_works(
    notifier: Notifier, listener: socket.socket
) -> None:
    """close() can be called twice, and a later message is still delivered."""
    notifier.status("before")
    assert _recv(listener) == "STATUS=before"
    notifier.close()
    notifier.close()
    notifier.status("after")
    assert _recv(listener) == "STATUS=after"


def test_disabled_without_notify_socket() -> None:
    """Without NOTIFY_SOCKET every method is a harmless no-op."""
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert n.enabled is False
    assert n.watchdog_interval is None
    assert n.ready(status="x") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.extend_timeout(5) is False
    assert n.send("READY=1") is False
    n.close()
    assert n.failures == 0


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234", "@"])
def test_unsupported_notify_socket_disables(value: str) -> None:
    """An empty, relative, vsock or bare-@ NOTIFY_SOCKET disables the notifier."""
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert n.enabled is False
    assert n.ready() is False
    assert n.failures == 0


def test_from_environ_reads_os_environ_and_leaves_it(
    monkeypatch: pytest.MonkeyPatch, socket_path: str, listener: socket.socket
) -> None:
    """from_environ() defaults to os.environ and leaves the variables set."""
    monkeypatch.setenv("NOTIFY_SOCKET", socket_path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_environ()
    try:
        n.ready()
        assert _recv(listener) == "READY=1"
        assert n.watchdog_interval == 1.0
    finally:
        n.close()
    assert os.environ["NOTIFY_SOCKET"] == socket_path
    assert os.environ["WATCHDOG_USEC"] == "2000000"
    assert os.environ["WATCHDOG_PID"] == str(os.getpid())


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    socket_path: str, extra: dict[str, str], interval: float | None
) -> None:
    """watchdog_interval is half of WATCHDOG_USEC in seconds, None if not for us."""
    n = Notifier.from_environ({"NOTIFY_SOCKET": socket_path, **extra})
    assert n.watchdog_interval == interval


def test_no_listener_does_not_raise(tmp_path: Path) -> None:
    """Sending to a socket path nobody listens on returns False and counts a failure."""
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    try:
        assert n.enabled
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.failures == 2
    finally:
        n.close()


def test_stale_socket_file_does_not_raise(socket_path: str) -> None:
    """A socket file whose listener has gone away counts a failure, no exception."""
    _receiver(socket_path).close()  # leaves the file behind, nobody bound
    n = Notifier.from_environ({"NOTIFY_SOCKET": socket_path})
    try:
        assert n.stopping() is False
        assert n.failures == 1
    finally:
        n.close()


def test_full_receiver_does_not_block(socket_path: str) -> None:
    """When systemd stops reading, sends fail fast instead of blocking the engine."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.bind(socket_path)
    sock.settimeout(RECV_TIMEOUT)
    n = Notifier.from_environ({"NOTIFY_SOCKET": socket_path})
    try:
        slowest = 0.0
        for _ in range(100_000):
            start = time.monotonic()
            delivered = n.status("x" * 1000)
            slowest = max(slowest, time.monotonic() - start)
            if not delivered:
                break
        assert n.failures == 1, "the receiver never filled up"
        # Once full, further sends keep returning promptly.
        start = time.monotonic()
        assert n.watchdog() is False
        slowest = max(slowest, time.monotonic() - start)
        assert n.failures == 2
        assert slowest < 1.0
        # After the receiver catches up, messages flow again.
        assert _drain(sock) > 0
        assert n.watchdog() is True
        assert _recv(sock) == "WATCHDOG=1"
    finally:
        n.close()
        sock.close()


def test_concurrent_senders_deliver_intact_datagrams(
    notifier: Notifier, listener: socket.socket
) -> None:
    """Many threads sending at once each get whole, uncorrupted datagrams through."""
    threads_count, per_thread = 8, 100
    expected = {
        f"STATUS=thread {t} message {i} " + "." * 200
        for t in range(threads_count)
        for i in range(per_thread)
    }
    received: list[str] = []
    senders_done = threading.Event()
    listener.settimeout(0.2)

    def read() -> None:
        deadline = time.monotonic() + RECV_TIMEOUT
        while time.monotonic() < deadline:
            try:
                received.append(_recv(listener))
            except TimeoutError:
                if senders_done.is_set():
                    return

    barrier = threading.Barrier(threads_count)

    def send(t: int) -> None:
        barrier.wait(timeout=RECV_TIMEOUT)
        for i in range(per_thread):
            notifier.status(f"thread {t} message {i} " + "." * 200)

    reader = threading.Thread(target=read)
    reader.start()
    senders = [threading.Thread(target=send, args=(t,)) for t in range(threads_count)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(timeout=RECV_TIMEOUT)
    senders_done.set()
    reader.join(timeout=RECV_TIMEOUT + 1)
    assert not reader.is_alive()
    assert not any(thread.is_alive() for thread in senders)

    assert received, "no datagram arrived"
    assert set(received) <= expected  # every datagram is one whole message
    assert len(received) == len(set(received))  # none duplicated
    # Best-effort: whatever was not delivered was counted, nothing vanished.
    assert len(received) + notifier.failures == threads_count * per_thread


def test_repr_shows_address(socket_path: str) -> None:
    """repr() names the socket (abstract ones with @) and the failure count."""
    assert socket_path in repr(Notifier.from_environ({"NOTIFY_SOCKET": socket_path}))
    text = repr(Notifier.from_environ({"NOTIFY_SOCKET": "@tempest-x"}))
    assert "'@tempest-x'" in text
    assert "failures=0" in text
