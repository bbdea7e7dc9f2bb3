"""One measurement in a process of its own: ``python -m bench.runner SPEC``.

SPEC is a JSON object: ``contender`` (a key, see :mod:`bench.contenders`),
``scenario`` (``drain``, ``latency`` or ``memory``), ``threads``, ``tmp``,
``ns`` and the scenario's own fields. The result is one line on stdout,
``RESULT {...}``, with ``ok`` false and an ``error`` when the run failed.

A fresh process per run keeps contenders from sharing a heap, imports or
leftover threads, and lets the harness bound each run with a timeout and
kill its process group -- worker processes included -- if it hangs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common
from bench.contenders import Contender, Context, by_key


def drain(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    """Enqueue *n* tasks with the workers stopped, start them, time the drain."""
    n, body = spec["n"], spec["body"]
    enqueue = contender.enqueue
    began = time.monotonic()
    for _ in range(n):
        enqueue(body)
    enqueued = time.monotonic()
    cpu = os.times()
    contender.start(n)
    first, last = contender.wait(spec["timeout"])
    result = {"n": n, "body": body, "enqueue_s": enqueued - began,
              "enqueue_rate": n / (enqueued - began), "startup_s": first - enqueued,
              "drain_s": last - first, "rate": n / (last - first)}
    if "redis.connection" in sys.modules:  # which reply parser redis-py used: hiredis or not
        result["redis_parser"] = sys.modules["redis.connection"].DefaultParser.__name__
    slept = common.current_line().slept
    if slept and len(slept) >= n:
        # In-process engines: the mean sleep, and the mean time a worker spent
        # between two tasks (its share of the drain not spent sleeping).
        threads = spec["threads"]
        result.update(sleep_ms=sum(slept) / len(slept) * 1e3,
                      gap_ms=(threads * (last - first) - sum(slept)) / len(slept) * 1e3)
    if contender.engine_pids() == [os.getpid()]:
        # In-process engines: CPU seconds of this process from start() to the last
        # task (thread start-up included), against the wall time of that span.
        now = os.times()
        user, system = now.user - cpu.user, now.system - cpu.system
        result.update(cpu_user_s=user, cpu_system_s=system,
                      cpu_per_task_us=(user + system) / n * 1e6,
                      cpu_busy=(user + system) / (time.monotonic() - enqueued))
    return result


def probe_once(contender: Contender, timeout: float) -> float:
    contender.enqueue("probe", time.monotonic())
    return contender.next_probe(timeout)


def latency(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    """Probe submit-to-start delays warm and after idle spells; idle CPU meanwhile.

    Runners of every contender run this side by side: each starts its
    workers, proves them with one probe, says READY, and waits for GO (so no
    one's start-up disturbs another's probes). Probing takes turns (an
    flock); idling does not.
    """
    timeout = spec["probe_timeout"]
    contender.start(None)
    probe_once(contender, 60)
    if spec.get("handshake", True):
        print("READY", flush=True)
        sys.stdin.readline()
    warm = []
    with common.turn(spec.get("turn")):
        for _ in range(spec["warm"]):
            warm.append(probe_once(contender, timeout))
            time.sleep(spec["gap"])
    idle, cpu = [], []
    for _ in range(spec["idle_samples"]):
        pids = contender.engine_pids()
        cpu_before, wall_before = common.cpu_seconds(pids), time.monotonic()
        time.sleep(spec["idle"])
        cpu.append((common.cpu_seconds(pids) - cpu_before) / (time.monotonic() - wall_before))
        with common.turn(spec.get("turn")):
            idle.append(probe_once(contender, timeout))
    return {"warm": warm, "idle": idle, "idle_cpu": cpu,
            "engine_processes": len(contender.engine_pids())}


def memory(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    """Run *n* no-op tasks through a running engine with a bounded backlog; sample RSS."""
    n, backlog, every = spec["n"], spec["backlog"], spec["sample_every"]
    engine, queue = contender.engine, contender.queue  # type: ignore[attr-defined]
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    began = time.monotonic()

    def sample() -> None:
        while True:
            samples.append((round(time.monotonic() - began, 3), engine.stats()["processed"],
                            common.rss_bytes()))
            if stop.wait(every):
                return

    baseline = common.rss_bytes()
    contender.start(n)
    sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
    sampler.start()
    submitted = 0
    while submitted < n:
        if len(queue) > backlog:
            time.sleep(0.001)
            continue
        for _ in range(min(100, n - submitted)):
            contender.enqueue("noop")
        submitted += min(100, n - submitted)
    first, last = contender.wait(spec["timeout"])
    stop.set()
    sampler.join()
    samples.append((round(time.monotonic() - began, 3), engine.stats()["processed"],
                    common.rss_bytes()))
    return {"n": n, "backlog": backlog, "baseline_rss": baseline, "samples": samples,
            "peak_rss": common.peak_rss_bytes(), "rate": n / (last - first),
            "drain_s": last - first}


SCENARIOS = {"drain": drain, "latency": latency, "memory": memory}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Set up, measure, stop and clean up; never raises."""
    result: dict[str, Any] = {"contender": spec["contender"], "scenario": spec["scenario"],
                              "ok": False}
    contender = by_key(spec["contender"])
    ctx = Context(threads=spec["threads"], tmp=Path(spec["tmp"]), ns=spec["ns"],
                  postgres_table=spec.get("postgres_table", common.POSTGRES_TABLE))
    ctx.tmp.mkdir(parents=True, exist_ok=True)
    errors = []
    try:
        began = time.monotonic()
        contender.setup(ctx)
        result["setup_s"] = time.monotonic() - began
        try:
            result.update(SCENARIOS[spec["scenario"]](contender, spec))
            result["ok"] = True
        finally:
            for name, step in (("stop", contender.stop), ("cleanup", contender.cleanup)):
                began = time.monotonic()
                try:
                    step()
                except BaseException:  # noqa: BLE001 - report it, go on cleaning
                    errors.append(traceback.format_exc(limit=4))
                result[f"{name}_s"] = time.monotonic() - began
            try:
                result["info"] = contender.info()
            except Exception:  # noqa: BLE001
                pass
    except BaseException:  # noqa: BLE001 - the result says what failed
        errors.insert(0, traceback.format_exc(limit=8))
        log = getattr(contender, "worker_log", None)
        if callable(log):
            result["worker_log"] = log()
    if errors:
        result["ok"] = False
        result["error"] = "\n".join(errors)
    return result


def main() -> None:
    # SIGTERM (the harness's timeout) unwinds through the finally blocks: workers
    # are stopped and keys deleted. Huey's consumer replaces this handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    spec = json.loads(sys.argv[1])
    result = run(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
