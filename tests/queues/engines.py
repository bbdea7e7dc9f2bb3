"""Engines in processes of their own on one durable queue: kill -9 and sharing tests.

Each backend's test module defines two fixtures -- ``engines`` (an
:class:`EngineProcesses` on its queue) and ``queues`` (a factory of queue
handles) -- and subclasses :class:`EngineProcessChecks` as ``Test...``.
"""

from __future__ import annotations

import collections
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tempest import Engine

from ..conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "queue_engine.py"


class EngineProcesses:
    """queue_engine.py processes sharing one queue and one results file.

    *kind* and *queue_args* are the script's (see its docstring); *left*
    counts the messages still in the queue, waiting or leased (-1 when it
    cannot tell, e.g. the server is down).
    """

    def __init__(self, tmp_path: Path, kind: str, queue_args: list[str],
                 left: Callable[[], int]) -> None:
        self.tmp_path, self.kind, self.queue_args, self.left = tmp_path, kind, queue_args, left
        self.results = tmp_path / "results.txt"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def start(self, threads: int, lease: float, periodic: float | None = None,
              skew: float = 0.0, prefetch: int = 0) -> tuple[subprocess.Popen[bytes], Path]:
        """Start one engine; return the process and its stdout file.

        *periodic*: it declares every(*periodic*) ticks, its scheduler's clock
        *skew* seconds off. *prefetch*: its ``prefetch`` option.
        """
        folder = self.tmp_path / f"engine{len(self.procs)}"
        folder.mkdir()
        out = folder / "out.txt"
        env = dict(self.env, TEMPEST_TEST_PREFETCH=str(prefetch))
        if periodic:
            env.update(TEMPEST_TEST_PERIODIC=str(periodic), TEMPEST_TEST_CLOCK_SKEW=str(skew))
        with open(out, "wb") as stdout, open(folder / "err.txt", "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), self.kind, str(self.results), str(folder),
                 str(threads), str(lease), *self.queue_args],
                stdout=stdout, stderr=stderr, cwd=folder, env=env)
        self.procs.append(proc)
        return proc, out

    def wait_ready(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        """Wait until *proc*'s engine is starting its workers."""
        def ready() -> bool:
            if proc.poll() is not None:
                err = (out.parent / "err.txt").read_text()
                raise AssertionError(f"the engine exited early ({proc.returncode}):\n{err}")
            return "ready" in out.read_text()
        wait_for(ready, 15)

    def done(self) -> list[tuple[str, int]]:
        """(task id, pid) of every run so far, in order."""
        return [(task_id, pid) for task_id, pid, _ in self.runs()]

    def runs(self) -> list[tuple[str, int, float]]:
        """(task id, pid, time.time() at its start) of every run so far, in order."""
        if not self.results.exists():
            return []
        lines = self.results.read_text().split("\n")[:-1]  # a line being written: later
        return [(task_id, int(pid), float(started))
                for task_id, pid, started in (line.split() for line in lines)]

    def wait_all_processed(self, ids: list[str], timeout: float) -> None:
        """Wait until every id ran and the queue holds nothing."""
        wait_for(lambda: {t for t, _ in self.done()} >= set(ids) and self.left() == 0,
                 timeout, interval=0.05)

    def stop_all(self) -> None:
        """SIGTERM every engine still running; each must exit 0."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            assert proc.wait(15) in (0, -signal.SIGKILL)

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (test clean-up)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def enqueue(queue: Any, count: int, pause: float) -> list[str]:
    """Enqueue *count* QueueRecord messages sleeping *pause* seconds; return their ids."""
    ids = [f"m{i:04d}" for i in range(count)]
    for task_id in ids:
        queue.enqueue([task_id, "QueueRecord", pause])
    return ids


def check_kill_9_loses_nothing(engines: EngineProcesses, queue: Any) -> None:
    """Of two engines, one is killed with SIGKILL mid-run and restarted: every message
    runs, and only those the dead engine held (at most its threads' worth) run twice."""
    ids = enqueue(queue, 300, 0.02)
    victim, out = engines.start(threads=4, lease=1)
    bystander, bystander_out = engines.start(threads=2, lease=1)
    engines.wait_ready(victim, out)
    engines.wait_ready(bystander, bystander_out)
    wait_for(lambda: len(engines.done()) >= 60, 30)
    victim.kill()
    victim.wait(10)
    killed_at = len(engines.done())
    assert killed_at < len(ids), "the engines finished before one could be killed"
    restarted, out = engines.start(threads=4, lease=1)
    engines.wait_ready(restarted, out)
    engines.wait_all_processed(ids, 30)
    engines.stop_all()
    done = engines.done()
    counts = collections.Counter(task_id for task_id, _ in done)
    twice = sorted(task_id for task_id, count in counts.items() if count > 1)
    print(f"killed after {killed_at} of {len(ids)}; run twice: {twice}")
    assert sorted(counts) == ids  # at least once: none lost
    assert set(counts.values()) <= {1, 2} and len(twice) <= 4
    # Each rerun is one the dead engine had started.
    first_runs = {task_id: pid for task_id, pid in reversed(done)}
    assert all(first_runs[task_id] == victim.pid for task_id in twice)


def check_kill_9_with_prefetch_loses_nothing(engines: EngineProcesses, queue: Any) -> None:
    """An engine with ``prefetch = 3`` killed with SIGKILL while it holds three messages
    ahead of its two busy workers: after their lease another engine runs every
    message, the two that were running again, the three held exactly once (they
    never started), and nothing is lost."""
    ids = enqueue(queue, 10, 1.5)  # long enough to kill before the first two end
    victim, out = engines.start(threads=2, lease=1, prefetch=3)
    engines.wait_ready(victim, out)
    wait_for(lambda: len(engines.done()) == 2 and len(queue) == 5, 15)  # 2 run, 3 held
    started = {task_id for task_id, _ in engines.done()}
    victim.kill()
    victim.wait(10)
    assert len(engines.done()) == 2 and len(queue) == 5  # none ran or came back yet
    restarted, out = engines.start(threads=10, lease=1)
    engines.wait_ready(restarted, out)
    engines.wait_all_processed(ids, 30)
    engines.stop_all()
    counts = collections.Counter(task_id for task_id, _ in engines.done())
    assert sorted(counts) == ids  # none lost
    assert {task_id for task_id, count in counts.items() if count == 2} == started
    assert set(counts.values()) <= {1, 2}


def check_engines_share_the_work(engines: EngineProcesses, queue: Any) -> None:
    """Three engine processes on one queue run each of 300 messages exactly once."""
    started = [engines.start(threads=2, lease=30) for _ in range(3)]
    for proc, out in started:
        engines.wait_ready(proc, out)
    ids = enqueue(queue, 300, 0.005)
    engines.wait_all_processed(ids, 30)
    engines.stop_all()
    done = engines.done()
    counts = collections.Counter(task_id for task_id, _ in done)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    print("per engine:", collections.Counter(pid for _, pid in done))
    assert len({pid for _, pid in done}) >= 2  # the work was shared


def check_delayed_messages_survive_kill_9(engines: EngineProcesses, queue: Any) -> None:
    """Delayed messages outlive an engine killed with SIGKILL before (and while) they
    come due: each runs at or after its time, the ones the dead engine never started
    exactly once, on the engine started after it."""
    begin = time.time()
    due = {}
    for i in range(40):
        task_id = f"d{i:03d}"
        delay = 1.5 + i * 0.05  # due from 1.5 s to 3.5 s from now
        due[task_id] = begin + delay
        queue.schedule([task_id, "QueueRecord", 0.02], delay=delay,
                       priority=i % 3)
    assert queue.scheduled_count() == 40
    victim, out = engines.start(threads=2, lease=1)
    engines.wait_ready(victim, out)
    wait_for(lambda: len(engines.done()) >= 5, 30)  # some came due and ran
    victim.kill()
    victim.wait(10)
    killed_at = len(engines.done())
    assert killed_at < 40, "every delayed message ran before the engine could be killed"
    restarted, out = engines.start(threads=2, lease=1)
    engines.wait_ready(restarted, out)
    engines.wait_all_processed(sorted(due), 30)
    engines.stop_all()
    runs = engines.runs()
    counts = collections.Counter(task_id for task_id, _, _ in runs)
    assert sorted(counts) == sorted(due)  # none lost
    for task_id, _, started in runs:
        # Never early: the queue's clock is this machine's (or its servers', here too).
        assert started >= due[task_id] - 0.01, (task_id, started - due[task_id])
    by_victim = {task_id for task_id, pid, _ in runs if pid == victim.pid}
    twice = {task_id for task_id, count in counts.items() if count > 1}
    assert twice <= by_victim and len(twice) <= 2  # only what it had started
    assert len(by_victim) < 40 and any(pid == restarted.pid for _, pid, _ in runs)
    print(f"killed after {killed_at} of 40; run twice: {sorted(twice)}")


def check_periodic_fires_each_slot_once(engines: EngineProcesses, queue: Any,
                                        count: int) -> None:
    """*count* engine processes with every(1) for about ten seconds, their clocks up
    to two seconds apart, one of them replaced halfway: every slot fires exactly
    once (counted by task id), none is skipped while engines run, and each runs at
    or after its slot on the queue's clock."""
    skews = [0.0, 2.0, -2.0, 1.0][:count]
    started = [engines.start(threads=2, lease=5, periodic=1, skew=skew) for skew in skews]
    for proc, out in started:
        engines.wait_ready(proc, out)

    def ticks() -> list[tuple[str, int, float]]:
        return [run for run in engines.runs() if run[0].startswith("tick@")]

    wait_for(lambda: len(ticks()) >= 5, 30, interval=0.05)
    first, _ = started[0]
    first.send_signal(signal.SIGTERM)  # an engine stops, another starts, mid-run
    assert first.wait(15) == 0
    replacement, out = engines.start(threads=2, lease=5, periodic=1, skew=-1.5)
    engines.wait_ready(replacement, out)
    wait_for(lambda: len(ticks()) >= 11, 30, interval=0.05)
    engines.stop_all()
    runs = ticks()
    counts = collections.Counter(task_id for task_id, _, _ in runs)
    assert set(counts.values()) == {1}, [t for t, c in counts.items() if c > 1]
    slots = sorted(datetime.datetime.strptime(task_id.split("@")[1], "%Y%m%dT%H%M%SZ")
                   .replace(tzinfo=datetime.timezone.utc).timestamp() for task_id in counts)
    assert slots == [slots[0] + i for i in range(len(slots))], "a slot was skipped"
    for task_id, _, began in runs:
        slot = datetime.datetime.strptime(task_id.split("@")[1], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        assert began >= slot - 0.01, (task_id, began - slot)
    assert len({pid for _, pid, _ in runs}) >= 2  # the firings went to several engines
    print("ticks per engine:", collections.Counter(pid for _, pid, _ in runs))


def check_kill_9_between_attempts_keeps_the_count(engines: EngineProcesses, queue: Any,
                                                  failed: Callable[[], int]) -> None:
    """Engines killed with SIGKILL while failed tasks wait for their retries, and while
    retries run: every task reaches its last attempt with no attempt skipped or
    counted twice, a crash is not a failed attempt, and the tasks that never succeed
    are in the failed store with all their attempts. *failed* counts its entries."""
    flaky = [f"r{i:02d}" for i in range(20)]  # succeed on attempt 3
    hopeless = [f"h{i:02d}" for i in range(5)]  # fail 4 times: the failed store
    for task_id in flaky:
        queue.enqueue([task_id, "QueueFlaky", 3, 0.02])
    for task_id in hopeless:
        queue.enqueue([task_id, "QueueFlaky", 99, 0.02])
    every = flaky + hopeless

    def attempts() -> dict[str, list[tuple[int, int]]]:
        seen: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for run, pid in engines.done():
            task_id, _, attempt = run.partition("#")
            seen[task_id].append((int(attempt), pid))
        return seen

    victim, out = engines.start(threads=4, lease=1)
    engines.wait_ready(victim, out)
    # Every first attempt failed: their retries wait in the queue, 0.5-0.75 s away.
    wait_for(lambda: all(a for a in attempts().values()) and len(attempts()) == len(every),
             30, interval=0.01)
    victim.kill()
    victim.wait(10)
    second, out = engines.start(threads=4, lease=1)
    engines.wait_ready(second, out)
    # Some second attempts ran on the new engine; kill it too, with retries running.
    wait_for(lambda: sum(any(a == 2 and p == second.pid for a, p in runs)
                         for runs in attempts().values()) >= 5, 30, interval=0.01)
    second.kill()
    second.wait(10)
    third, out = engines.start(threads=4, lease=1)
    engines.wait_ready(third, out)
    wait_for(lambda: failed() == len(hopeless)
             and all(any(a == 3 for a, _ in attempts()[t]) for t in flaky)
             and engines.left() == 0, 60, interval=0.05)
    engines.stop_all()
    seen = attempts()
    for task_id in every:
        numbers = sorted({a for a, _ in seen[task_id]})
        assert numbers == ([1, 2, 3] if task_id in flaky else [1, 2, 3, 4]), (task_id,
                                                                               seen[task_id])
    # An attempt runs again only if an engine died while running it (4 threads each).
    reruns = sum(len(runs) - len({a for a, _ in runs}) for runs in seen.values())
    assert reruns <= 8, reruns
    # The counts outlived the engines: later attempts ran on engines started later.
    assert any(p == third.pid and a >= 2 for runs in seen.values() for a, p in runs)
    print(f"reruns after kill -9: {reruns}")


def check_calls_survive_kill_9(engines: EngineProcesses, queue: Any) -> None:
    """Eight call()s from threads here, answered by an engine process killed with
    SIGKILL while it runs them: each call still returns its own value, once a new
    engine has run the dead one's messages after their lease. (Here no engine runs:
    the calls only submit and wait.)"""
    caller = type(f"Caller{uuid.uuid4().hex[:8]}", (Engine,), {"configure": type(
        "configure", (), {"queue": queue, "log_dir": str(engines.tmp_path),
                          "report_every": None})})
    victim, out = engines.start(threads=4, lease=1)
    engines.wait_ready(victim, out)
    answers: dict[int, Any] = {}

    def ask(value: int) -> None:
        try:
            answers[value] = caller.call("QueueEcho", value, 0.4, timeout=60)
        except BaseException as exc:  # reported by the assertion below
            answers[value] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(engines.done()) >= 2, 30, interval=0.01)  # some are running
    victim.kill()
    victim.wait(10)
    second, out = engines.start(threads=4, lease=1)
    engines.wait_ready(second, out)
    for thread in threads:
        thread.join(60)
    engines.stop_all()
    assert answers == {i: i * 2 for i in range(8)}
    runs = collections.Counter(task_id for task_id, _ in engines.done())
    assert len(runs) == 8 and max(runs.values()) <= 2
    assert any(pid == second.pid for _, pid in engines.done())
    print(f"runs per call after kill -9: {sorted(runs.values())}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def check_coroutines_survive_kill_9(engines: EngineProcesses, queue: Any) -> None:
    """An engine killed with SIGKILL while 30 coroutine tasks wait in ``await``: each
    runs again, once, in the engine started after it, and none is lost."""
    ids = [f"a{i:03d}" for i in range(30)]
    for task_id in ids:
        queue.enqueue([task_id, "QueueARecord", 1.5])
    victim, out = engines.start(threads=2, lease=1)
    engines.wait_ready(victim, out)
    wait_for(lambda: {task_id for task_id, _ in engines.done()} >= set(ids), 15)
    victim.kill()  # all 30 are in flight, awaiting their sleep
    victim.wait(10)
    restarted, out = engines.start(threads=2, lease=1)
    engines.wait_ready(restarted, out)
    wait_for(lambda: len(engines.done()) >= 2 * len(ids) and engines.left() == 0, 30,
             interval=0.05)
    engines.stop_all()
    runs = collections.Counter(engines.done())
    assert runs == {**{(task_id, victim.pid): 1 for task_id in ids},
                    **{(task_id, restarted.pid): 1 for task_id in ids}}


class EngineProcessChecks:
    """kill -9 and shared work, for the queue of the module's fixtures."""

    def test_kill_9_loses_nothing(self, engines: EngineProcesses, queues: Any) -> None:
        """An engine killed with SIGKILL mid-run: the others take over once its leases end."""
        check_kill_9_loses_nothing(engines, queues())

    def test_coroutines_survive_kill_9(self, engines: EngineProcesses, queues: Any) -> None:
        """Coroutine tasks of an engine killed with SIGKILL run again in the next one."""
        check_coroutines_survive_kill_9(engines, queues())

    def test_kill_9_with_prefetch_loses_nothing(self, engines: EngineProcesses,
                                                queues: Any) -> None:
        """Messages held ahead by a killed engine come back after their lease, run once."""
        check_kill_9_with_prefetch_loses_nothing(engines, queues())

    def test_engines_share_the_work(self, engines: EngineProcesses, queues: Any) -> None:
        """Three engine processes on one queue run each of 300 messages exactly once."""
        check_engines_share_the_work(engines, queues())

    periodic_engines = 3
    """Engine processes in the periodic check."""

    def test_delayed_messages_survive_kill_9(self, engines: EngineProcesses,
                                             queues: Any) -> None:
        """Delayed messages outlive a killed engine and run once their time comes."""
        queue = queues()
        if not callable(getattr(queue, "schedule", None)):
            pytest.skip("the queue has no schedule() yet")
        check_delayed_messages_survive_kill_9(engines, queue)

    def test_kill_9_between_attempts_keeps_the_count(self, engines: EngineProcesses,
                                                     queues: Any) -> None:
        """Engines killed while retries wait and while they run: no attempt lost, skipped
        or counted for a crash; the hopeless ones in the failed store."""
        queue = queues()
        if not callable(getattr(queue, "retry", None)):
            pytest.skip("the queue has no retry() yet")
        check_kill_9_between_attempts_keeps_the_count(engines, queue, queue.failed_count)

    def test_calls_survive_kill_9(self, engines: EngineProcesses, queues: Any) -> None:
        """call()s answered after the engine running them is killed with SIGKILL."""
        queue = queues()
        if not callable(getattr(queue, "store_result", None)):
            pytest.skip("the queue has no store_result() yet")
        check_calls_survive_kill_9(engines, queue)

    def test_periodic_fires_each_slot_once(self, engines: EngineProcesses,
                                           queues: Any) -> None:
        """Engine processes sharing every(1): each slot fired exactly once, none skipped."""
        queue = queues()
        if not callable(getattr(queue, "fire", None)):
            pytest.skip("the queue has no fire() yet")
        check_periodic_fires_each_slot_once(engines, queue, self.periodic_engines)
