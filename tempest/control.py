"""The control loop of a running engine: signals, reports, systemd, the drain.

It runs in the thread that called ``run()`` (or in one background thread for
``start()``) and sleeps in ``select`` on one end of a socket pair. Everything
that needs its attention writes a byte to the other end: ``stop()`` from any
thread, a worker that saw the queue drained or exited during a drain, and the
signals themselves, through ``signal.set_wakeup_fd``.

Signal handlers only append the signal number to a list; the loop does the
rest (logging, stopping, reopening files) in ordinary code. Logging or taking
a lock inside a handler could deadlock against the code it interrupted.

The worker threads start before the loop does (``Runtime.start``), but no
task can: the Control holds the dispatcher's lock (the one a worker takes to
dequeue) from its creation until the loop has installed the signal handlers
and sent READY=1. So a SIGTERM can never find a task running with no handler
in place, and systemd hears READY before the first message leaves the queue.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from tempest.runtime import Runtime
from tempest.stats import SAMPLE_EVERY, StatsLine
from tempest.systemd import Notifier

__all__ = ["Control"]

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

STATUS_EVERY = 2.0
"""Seconds between STATUS= updates to systemd."""

DRAIN_TICK = 1.0
"""Seconds between checks (and EXTEND_TIMEOUT_USEC) while draining."""

WATCHDOG_SLACK = 5.0
"""Least time without dispatcher progress before WATCHDOG=1 pings stop.

The limit is ``WatchdogSec`` (twice the ping interval) but never less than
this, so a slow queue call on a short watchdog does not get the engine killed.
"""


class Control:
    """Drives one Runtime from start to stop."""

    def __init__(self, runtime: Runtime, report_every: float | None) -> None:
        self.runtime = runtime
        self.report_every = report_every
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        """The background thread of a start()ed engine (None under run())."""
        self.holding: set[threading.Thread] = set()
        """Threads that stop() must not wait in: see cannot_wait()."""
        self._signals: list[int] = []
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        runtime.wake = self.wake
        # The gate (see the module docstring): released by loop() once in charge.
        self._gate: threading.Lock | None = runtime._dequeue_lock
        self._gate.acquire()

    def wake(self) -> None:
        """Make the loop look at the state now (any thread)."""
        try:
            self._writer.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (stopped)
            pass

    def cannot_wait(self) -> bool:
        """Whether the calling thread is one the stop it asks for waits on.

        A worker (a task or callback calling stop()), the event loop or a
        settler thread of the coroutine tasks, the thread running the
        loop (a callback run during the drain), or the thread starting the
        engine (``after_initialize``): each would wait for itself forever.
        """
        current = threading.current_thread()
        return (current in self.holding or self.runtime.coroutines.owns(current)
                or any(slot.thread is current for slot in list(self.runtime.slots)))

    def discard(self) -> None:
        """Close what __init__ opened, for a run whose start-up failed."""
        self._open_gate()
        self._reader.close()
        self._writer.close()
        self.stopped.set()

    # -- the loop --------------------------------------------------------------------

    def loop(self, signals: bool) -> None:
        """Run until the engine is stopped, then drain and close.

        *signals*: install the handlers (run() in the main thread) and speak
        the systemd notify protocol where ``NOTIFY_SOCKET`` is set.
        """
        runtime = self.runtime
        self.holding.add(threading.current_thread())
        notifier = Notifier.from_environ() if signals else Notifier(None)
        previous = self._install() if signals else None
        try:
            if signals:  # the line after which SIGTERM/SIGINT/SIGHUP are handled
                runtime.logs.always.info(
                    "ready", signals=",".join(s.name for s in _HANDLED),
                    systemd=notifier.enabled, watchdog=notifier.watchdog_interval)
            notifier.ready(self._status())
            self._open_gate()
            self._serve(notifier)
            notifier.stopping(f"stopping: {runtime.stop_reason}")
            self._drain(notifier)
        finally:
            self._open_gate()
            try:
                runtime.finish()
            finally:
                if previous is not None:
                    self._restore(previous)
                notifier.close()
                self._reader.close()
                self._writer.close()
                self.stopped.set()

    def _open_gate(self) -> None:
        """Let the workers dequeue (once)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()

    def _serve(self, notifier: Notifier) -> None:
        runtime = self.runtime
        now = time.monotonic()
        report = self.report_every
        next_report = now + report if report else float("inf")
        line = StatsLine(runtime) if report else None
        next_sample = now + SAMPLE_EVERY if report else float("inf")
        ping = notifier.watchdog_interval
        next_ping = now + ping if ping else float("inf")
        next_status = now + STATUS_EVERY if notifier.enabled else float("inf")
        while not runtime.stopping:
            self._sleep(min(next_report, next_sample, next_ping, next_status)
                        - time.monotonic())
            self._handle_signals()
            now = time.monotonic()
            if line is not None and now >= next_sample:
                line.sample()
                next_sample = now + SAMPLE_EVERY
            if line is not None and now >= next_report:
                runtime.logs.main.info("stats", **runtime.stats(), **line.fields())
                next_report = now + report  # type: ignore[operator]
            if now >= next_ping:
                # Ping only while the dispatcher makes progress: a wedged engine
                # stops pinging and systemd restarts it.
                if runtime.healthy(now, max(2 * ping, WATCHDOG_SLACK)):  # type: ignore[operator]
                    notifier.watchdog()
                next_ping = now + ping  # type: ignore[operator]
            if now >= next_status:
                notifier.status(self._status())
                next_status = now + STATUS_EVERY
        runtime.logs.always.info("stopping", reason=runtime.stop_reason,
                                 running=runtime.running,
                                 shutdown_timeout=runtime.options["shutdown_timeout"])

    def _drain(self, notifier: Notifier) -> None:
        """Wait for running tasks, up to shutdown_timeout or an immediate stop."""
        runtime = self.runtime
        deadline = time.monotonic() + runtime.options["shutdown_timeout"]
        while not runtime.immediate and not runtime.workers_done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            notifier.extend_timeout(remaining + 2 * DRAIN_TICK)
            notifier.status(f"draining: {runtime.running} running, "
                            f"{remaining:.0f}s left")
            # A worker wakes us just before its thread ends, so workers_done()
            # can still be False then: with no task running, look again soon.
            self._sleep(min(remaining, DRAIN_TICK if runtime.running else 0.01))
            self._handle_signals()

    def _status(self) -> str:
        stats = self.runtime.stats()
        queued = "".join(f", {stats[key]} {key}" for key in ("queued", "scheduled")
                         if stats.get(key) is not None)
        return (f"{stats['processed']} processed, {stats['running']} running{queued}, "
                f"{stats['failed']} failed, {stats['timed_out']} timed out")

    def _sleep(self, timeout: float) -> None:
        if timeout > 0:  # inf (nothing scheduled) means: until woken
            select.select([self._reader], [], [], None if timeout == float("inf") else timeout)
        try:
            while self._reader.recv(4096):
                pass
        except OSError:  # BlockingIOError: nothing more to read
            pass

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # only this: see the module docstring

    def _handle_signals(self) -> None:
        runtime = self.runtime
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                runtime.logs.reopen()
                runtime.logs.always.info("reopened log files", signal=name)
            elif runtime.stopping and signum == signal.SIGINT:
                runtime.request_stop(name, immediate=True)
                runtime.logs.always.warning("stopping at once", signal=name,
                                            running=runtime.running)
            else:
                runtime.request_stop(f"{name} received")

    def _install(self) -> dict[str, Any]:
        previous: dict[str, Any] = {
            "handlers": {sig: signal.signal(sig, self._on_signal) for sig in _HANDLED},
        }
        previous["wakeup_fd"] = signal.set_wakeup_fd(self._writer.fileno(),
                                                     warn_on_full_buffer=False)
        return previous

    def _restore(self, previous: dict[str, Any]) -> None:
        signal.set_wakeup_fd(previous["wakeup_fd"])
        for sig, handler in previous["handlers"].items():
            signal.signal(sig, handler)
