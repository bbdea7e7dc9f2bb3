"""Tell systemd how the engine is doing, using the ``sd_notify`` protocol.

When a service runs with ``Type=notify`` (or has ``WatchdogSec=`` set),
systemd puts the address of a datagram socket in the ``NOTIFY_SOCKET``
environment variable. The service reports its state by sending small text
datagrams of newline-separated ``KEY=value`` lines to that socket, e.g.::

    READY=1
    STATUS=4 running, 12 queued

The fields this module sends are:

``READY=1``
    Start-up is finished; systemd considers the unit started only now.
``STATUS=...``
    A one-line human-readable status shown by ``systemctl status``.
``WATCHDOG=1``
    A keep-alive. If ``WatchdogSec=`` is set, systemd passes the interval in
    ``WATCHDOG_USEC`` and restarts (or kills) the service when no ping
    arrives in time.
``STOPPING=1``
    Shutdown has begun.
``EXTEND_TIMEOUT_USEC=...``
    Asks for more time before systemd gives up on the current start-up or
    shutdown, counted in microseconds from when the message arrives.

How the engine uses it: it sends ``READY=1`` once its worker threads are
up, then ``STATUS`` lines with live counts. It sends ``WATCHDOG=1`` every
:attr:`Notifier.watchdog_interval` seconds, but only while its dispatcher is
making progress, so a wedged engine stops pinging and systemd restarts it.
On shutdown it sends ``STOPPING=1`` and, while draining in-flight tasks,
``EXTEND_TIMEOUT_USEC`` so systemd does not kill it mid-drain.

You can drive a :class:`Notifier` yourself too::

    from tempest.systemd import Notifier

    notifier = Notifier.from_environ()
    notifier.ready(status="accepting work")
    ...
    notifier.stopping(status="draining")
    notifier.extend_timeout(30)
    ...
    notifier.close()

Notification is best-effort: when ``NOTIFY_SOCKET`` is unset (not running
under systemd, or not ``Type=notify``) every method is a cheap no-op, and a
failed send is counted in :attr:`Notifier.failures` instead of raising. Sends
never block: if systemd is slow to read, the message is dropped.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["Notifier"]

# systemd reads notification datagrams into a buffer of PIPE_BUF (4096)
# bytes and ignores a truncated message entirely, which would lose READY=1 or
# STOPPING=1 along with an over-long status. Status texts are cut to this many
# UTF-8 bytes so the whole datagram always fits.
_MAX_STATUS_BYTES = 2048


def _clean_status(text: str) -> str:
    """Return ``text`` made safe to send as the value of a ``STATUS=`` field.

    A newline would start a new ``KEY=value`` field (so a status could inject
    ``READY=1`` or ``STOPPING=1``), and systemd drops any message containing
    a NUL byte, so both become spaces. Over-long texts are truncated on a
    character boundary, and characters that cannot be encoded as UTF-8 (lone
    surrogates) are replaced, because systemd ignores invalid UTF-8.
    """
    for char in ("\r\n", "\n", "\r", "\0"):
        text = text.replace(char, " ")
    data = text.encode("utf-8", errors="replace")[:_MAX_STATUS_BYTES]
    return data.decode("utf-8", errors="ignore")


def _parse_address(value: str | None) -> str | None:
    """Turn a ``NOTIFY_SOCKET`` value into an ``AF_UNIX`` address, or None.

    ``@name`` is an abstract socket (a leading NUL byte in the kernel's
    address). An absolute path is a socket file. Anything else, including
    the ``vsock:`` addresses newer systemd versions use for virtual machines,
    is not supported and disables notification, as ``sd_notify`` would.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    return None


def _parse_watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """Return the watchdog timeout in microseconds meant for this process.

    The watchdog is on only when ``WATCHDOG_USEC`` is a positive integer and
    ``WATCHDOG_PID`` is absent or names this process; a value meant for a
    parent process (which passed its environment down to us) is ignored.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec


class Notifier:
    """Sends systemd notification messages (``READY=1``, ``STATUS=`` ...).

    Build one with :meth:`from_environ`. All methods are thread-safe, never
    block and never raise :class:`OSError`: a message that cannot be
    delivered is dropped and counted in :attr:`failures`. A disabled
    notifier (no ``NOTIFY_SOCKET``) does nothing at all.
    """

    failures: int
    """How many messages could not be delivered (no listener, systemd's
    queue full, socket file missing, ...). Useful in logs and tests."""

    def __init__(
        self, notify_socket: str | None = None, *, watchdog_usec: int | None = None
    ) -> None:
        """Create a notifier for ``notify_socket``, a ``NOTIFY_SOCKET`` value.

        ``notify_socket`` is an absolute socket path or an ``@name`` abstract
        socket name; None, empty or unsupported values give a disabled
        notifier. ``watchdog_usec`` is the watchdog timeout in microseconds,
        or None when the watchdog is off. Prefer :meth:`from_environ`, which
        reads both from the environment systemd sets up.
        """
        self._address = _parse_address(notify_socket)
        if watchdog_usec is not None and watchdog_usec <= 0:
            watchdog_usec = None
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.failures = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build a notifier from ``environ`` (default: :data:`os.environ`).

        Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. When
        ``NOTIFY_SOCKET`` is unset the notifier is disabled. The variables
        are left in place, unlike ``sd_notify(unset_environment=1)``.
        """
        # Why the variables are not unset:
        # * a process that re-execs itself (to reload, or to upgrade in place)
        #   stays systemd's main PID and still needs them to send READY=1 and
        #   watchdog pings from the new image;
        # * changing os.environ calls putenv(), which is not thread-safe
        #   against getenv() in other threads or C extensions of a program
        #   that embeds the engine, and ``environ`` may not even be
        #   os.environ;
        # * leaking them to children is harmless: with the default
        #   NotifyAccess=main systemd ignores messages from other PIDs, and
        #   WATCHDOG_PID stops a child from believing the watchdog is its own.
        if environ is None:
            environ = os.environ
        return cls(
            environ.get("NOTIFY_SOCKET"),
            watchdog_usec=_parse_watchdog_usec(environ),
        )

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured, so messages are sent."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings, or None if there is no watchdog.

        This is half the ``WATCHDOG_USEC`` timeout, as systemd recommends,
        leaving slack for a late ping. It is None when the watchdog is off or
        the notifier is disabled (pings could not be delivered anyway).
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, state: str) -> bool:
        """Send ``state``, one or more ``KEY=value`` lines, as one datagram.

        This is the raw protocol: ``state`` is sent as-is, so clean any text
        you embed in it. Returns True if the message was handed to the
        kernel, False if the notifier is disabled or the send failed (failures
        are counted in :attr:`failures`). Never blocks and never raises
        :class:`OSError`.
        """
        address = self._address
        if address is None:
            return False
        data = state.encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._sock is None:
                    # Python sockets are created close-on-exec (PEP 446), so
                    # this descriptor does not leak into spawned processes.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # sendto() rather than connect() + send(): the address is
                # resolved on each send, so a restarted listener (systemd
                # re-executing itself re-creates its socket) is picked up.
                self._sock.sendto(data, socket.MSG_DONTWAIT, address)
            except OSError:
                self.failures += 1
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Report that start-up is complete (``READY=1``), with an optional status.

        Newlines in ``status`` become spaces. Returns what :meth:`send` does.
        """
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1\nSTATUS=" + _clean_status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=``).

        Newlines in ``text`` become spaces. Returns what :meth:`send` does.
        """
        return self.send("STATUS=" + _clean_status(text))

    def watchdog(self) -> bool:
        """Ping the systemd watchdog (``WATCHDOG=1``).

        Call it every :attr:`watchdog_interval` seconds, and only while the
        program is actually making progress. Returns what :meth:`send` does.
        """
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Report that shutdown has begun (``STOPPING=1``), with an optional status.

        Newlines in ``status`` become spaces. Returns what :meth:`send` does.
        """
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1\nSTATUS=" + _clean_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for ``seconds`` more before its start/stop timeout fires.

        Sends ``EXTEND_TIMEOUT_USEC`` with ``seconds`` rounded to whole
        microseconds; the extension counts from when systemd receives it, so
        send it again before it runs out if more time is needed. Raises
        :class:`ValueError` if ``seconds`` is negative, infinite or NaN.
        Returns what :meth:`send` does.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"extend_timeout() needs a finite, non-negative number of "
                f"seconds, got {seconds!r}"
            )
        return self.send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def close(self) -> None:
        """Close the notification socket. Safe to call more than once.

        A later send opens a new socket, so closing is never an error; it
        just releases the file descriptor when notifications are done.
        """
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        """Show the socket address, watchdog interval and failure count."""
        address = self._address
        if address is not None and address.startswith("\0"):
            address = "@" + address[1:]
        return (
            f"<Notifier socket={address!r} "
            f"watchdog_interval={self.watchdog_interval!r} "
            f"failures={self.failures}>"
        )
