"""Where tempest's hot path spends its time: ``python -m bench.hotpath BACKEND LEVEL N OUT``.

For ``memory``, drains pre-enqueued no-op tasks through tempest's MemoryQueue
at log level LEVEL (WARNING or INFO), twice:

- under cProfile, one profiler per engine thread (workers and log writers),
  timed by each thread's CPU clock and merged: exact call counts and CPU
  time, but the profiler's own cost inflates small functions;
- under py-spy (when installed) with ``--gil``, sampling whichever thread
  holds the GIL: on a GIL-bound drain that is where the time really goes.
  It samples at 250 Hz, so it drains 10 N tasks to get enough samples.

For a durable queue (``sqlite``, ``redis``, ``postgres``): py-spy as above on
N tasks, then the time of each queue call the engine makes during a drain.

``floor - N OUT``: cProfile of ThreadPoolExecutor's workers on the same drain,
for the calls and CPU per task tempest is compared with. ``BACKEND idle S
OUT``: an idle engine's CPU over S seconds, then py-spy on what its threads
do when they are not waiting.

Writes ``OUT.cprofile.txt`` (or ``OUT.calls.txt``) and ``OUT.pyspy.txt`` and
prints ``RESULT {json}`` with the top functions of each.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import common
from bench.contenders import Context
from bench.contenders.inprocess import TempestContender

TOP = 25


def _engine(backend: str, level: str, n: int) -> tuple[TempestContender, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    contender = TempestContender(backend, level)
    contender.setup(Context(threads=common.THREADS, tmp=tmp,
                            ns=f"bench_profile_{os.getpid()}_{time.monotonic_ns()}"))
    for _ in range(n):
        contender.enqueue("noop")
    return contender, tmp


def _done(contender: TempestContender, tmp: Path) -> None:
    contender.cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


def _drain(contender: TempestContender, n: int) -> float:
    contender.start(n)
    first, last = contender.wait(600)
    contender.stop()
    return n / (last - first)


def with_cprofile(backend: str, level: str, n: int, out: Path) -> dict[str, Any]:
    """cProfile of a no-op drain: tempest's MemoryQueue engine, or (``floor``) the pool."""
    import concurrent.futures.thread as pool_module

    from bench.contenders.inprocess import ThreadPool
    from tempest.logs import LogFile
    from tempest.runtime import Runtime

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def profiled(original: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            # CPU time of this thread: time spent blocked (on the dequeue lock,
            # the GIL, an empty queue) is not charged to the function waiting.
            profile = cProfile.Profile(time.thread_time)
            with lock:
                profiles.append(profile)
            profile.enable()
            try:
                return original(*args, **kwargs)
            finally:
                profile.disable()
        return run

    # The threads start at these functions; patched (in this process only)
    # before the threads are made.
    if backend == "floor":
        pool_module._worker = profiled(pool_module._worker)  # type: ignore[attr-defined]
        floor = ThreadPool()
        tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
        floor.setup(Context(threads=common.THREADS, tmp=tmp, ns="bench_profile_floor"))
        for _ in range(n):
            floor.enqueue("noop")
        floor.start(n)
        first, last = floor.wait(600)
        floor.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        rate, what = n / (last - first), "ThreadPoolExecutor"
    else:
        Runtime._work = profiled(Runtime._work)  # type: ignore[method-assign]
        LogFile._write_loop = profiled(LogFile._write_loop)  # type: ignore[method-assign]
        contender, tmp = _engine("memory", level, n)
        rate = _drain(contender, n)
        _done(contender, tmp)
        what = f"tempest MemoryQueue, log_level {level}"
    stats = pstats.Stats(*profiles)
    calls = stats.total_calls  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    with open(out, "w") as handle:
        handle.write(f"cProfile of {n} no-op tasks, {what}, {common.THREADS} threads (every "
                     f"worker and log-writer thread, by its CPU clock, merged)\n"
                     f"drain rate under the profiler: {rate:.0f} tasks/s; "
                     f"{calls / n:.1f} function calls and {total / n * 1e6:.1f} µs of "
                     f"profiled CPU per task\n\n")
        stats.stream = handle  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(TOP)
        stats.sort_stats("cumulative").print_stats(TOP)
    rows = []
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in \
            stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{func} ({_short(path)}:{line})", "ncalls": ncalls,
                     "tottime": tottime, "cumtime": cumtime,
                     "per_task_us": tottime / n * 1e6})
    rows.sort(key=lambda r: -r["tottime"])
    by_cum = sorted(rows, key=lambda r: -r["cumtime"])
    return {"rate_under_profiler": rate, "total_s": total, "calls_per_task": calls / n,
            "cpu_us_per_task": total / n * 1e6, "own": rows[:TOP], "cumulative": by_cum[:TOP]}


def with_idle(backend: str, seconds: float, out: Path) -> dict[str, Any]:
    """An idle engine: its CPU over *seconds*, then where py-spy finds it busy."""
    contender, tmp = _engine(backend, "WARNING", 0)
    contender.start(None)
    time.sleep(2)  # past start-up and the first heartbeat
    pid = [os.getpid()]
    cpu, wall = common.cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    busy = (common.cpu_seconds(pid) - cpu) / (time.monotonic() - wall)
    result: dict[str, Any] = {"cpu": busy, "seconds": seconds}
    lines = [f"idle tempest {backend} engine ({common.THREADS} threads): "
             f"{100 * busy:.3f}% of a core over {seconds:.0f} s"]
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if Path(exe).exists():
        raw = out.with_suffix(".raw")
        spy = subprocess.run([exe, "record", "--pid", str(os.getpid()), "--rate", "1000",
                              "--nonblocking", "--duration", str(int(seconds)), "--format",
                              "raw", "--output", str(raw)], capture_output=True,
                             timeout=seconds + 30, check=False)
        own: Counter[str] = Counter()
        ours: Counter[str] = Counter()  # the innermost tempest frame: who asked for it
        total = 0
        if raw.exists():
            for line in raw.read_text().splitlines():
                stack, _, count_text = line.rpartition(" ")
                frames = [f for f in stack.split(";") if "(" in f]
                if count_text.isdigit() and frames:
                    total += int(count_text)
                    own[_frame(frames[-1], keep_line=True)] += int(count_text)
                    mine = [f for f in frames if "(tempest/" in f or "/tempest/" in f]
                    if mine:
                        ours[_frame(mine[-1], keep_line=True)] += int(count_text)
            raw.unlink()
        else:
            lines.append(spy.stderr.decode()[-500:])
        lines.append(f"py-spy, 1000 Hz for {seconds:.0f} s: {total} samples of threads it saw "
                     f"active (a thread blocked in a socket read may count)\n")
        lines.append(f"{'samples':>8}  innermost tempest frame")
        lines.extend(f"{count:8}  {where}" for where, count in ours.most_common(TOP))
        lines.append(f"\n{'samples':>8}  innermost frame")
        lines.extend(f"{count:8}  {where}" for where, count in own.most_common(TOP))
        result["samples"] = total
        result["tempest_lines"] = [{"line": w, "samples": c} for w, c in ours.most_common(TOP)]
        result["own_lines"] = [{"line": w, "samples": c} for w, c in own.most_common(TOP)]
    contender.stop()
    _done(contender, tmp)
    out.write_text("\n".join(lines) + "\n")
    return result


def with_pyspy(backend: str, level: str, n: int, out: Path) -> dict[str, Any] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    contender, tmp = _engine(backend, level, n)
    raw = out.with_suffix(".raw")
    spy = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--gil", "--rate", "250",
                            "--format", "raw", "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached: the idle main thread gives no samples meanwhile
    rate = _drain(contender, n)
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
    _done(contender, tmp)
    if not raw.exists():
        return {"error": (spy.stderr.read() if spy.stderr else b"").decode()[-500:]}
    own: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        lines = [f for f in stack.split(";") if "(" in f]
        if not lines:
            continue
        frames = [_frame(f) for f in lines]
        total += count
        own[frames[-1]] += count
        own_lines[_frame(lines[-1], keep_line=True)] += count
        for frame in set(frames):
            cumulative[frame] += count
    raw.unlink()
    if not total:
        return {"error": "py-spy took no sample"}
    with open(out, "w") as handle:
        handle.write(f"py-spy --gil, {total} samples at 250 Hz: {n} no-op tasks, tempest "
                     f"{backend} queue, log_level {level}, {common.THREADS} threads\n"
                     f"drain rate while sampled: {rate:.0f} tasks/s\n\n"
                     f"{'own %':>7} {'cum %':>7}  function\n")
        for frame, count in own.most_common(TOP):
            handle.write(f"{100 * count / total:7.1f} {100 * cumulative[frame] / total:7.1f}"
                         f"  {frame}\n")
        handle.write(f"\nby cumulative\n{'cum %':>7} {'own %':>7}  function\n")
        for frame, count in cumulative.most_common(TOP):
            handle.write(f"{100 * count / total:7.1f} {100 * own[frame] / total:7.1f}"
                         f"  {frame}\n")
        handle.write(f"\nown time by line\n{'own %':>7}  line\n")
        for where, count in own_lines.most_common(TOP):
            handle.write(f"{100 * count / total:7.1f}  {where}\n")
    return {"rate_while_sampled": rate, "samples": total,
            "own": [{"function": f, "percent": 100 * c / total}
                    for f, c in own.most_common(TOP)],
            "cumulative": [{"function": f, "percent": 100 * c / total}
                           for f, c in cumulative.most_common(TOP)],
            "own_lines": [{"line": f, "percent": 100 * c / total}
                          for f, c in own_lines.most_common(TOP)]}


def with_call_timing(backend: str, level: str, n: int, out: Path) -> dict[str, Any]:
    """How long the engine's queue calls take during a drain (wall clock, per call).

    Only the leader dequeues, one call at a time: a drain cannot beat the
    messages a dequeue brings (one, or a batch from ``dequeue_many``) per
    dequeue time, whatever the number of threads.
    """
    from tempest.runtime import _accepts_timeout

    contender, tmp = _engine(backend, level, n)
    queue = contender.queue
    times: dict[str, list[float]] = {"dequeue": [], "dequeue_many": [], "empty": [], "ack": []}
    batches: list[int] = []

    def timed(name: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            result = original(*args, **kwargs)
            spent = time.perf_counter() - began
            if name == "dequeue_many":
                if result:
                    batches.append(len(result))
                    times[name].append(spent)
                else:
                    times["empty"].append(spent)
            elif name == "dequeue" and result is None:
                times["empty"].append(spent)
            else:
                times[name].append(spent)
            return result
        if name == "dequeue" and not _accepts_timeout(original):
            def plain() -> Any:  # the engine must still see a dequeue without timeout
                return call()
            return plain
        return call

    # Instance attributes, set before the engine starts: the engine looks its
    # queue's methods up once, when it starts.
    for name in ("dequeue", "dequeue_many", "ack"):
        if callable(getattr(queue, name, None)):
            setattr(queue, name, timed(name, getattr(queue, name)))
    began = time.perf_counter()
    rate = _drain(contender, n)
    wall = time.perf_counter() - began
    _done(contender, tmp)
    result: dict[str, Any] = {"rate": rate, "wall_s": wall}
    lines = [f"queue calls during a drain of {n} no-op tasks, tempest {backend} queue, "
             f"{common.THREADS} threads: {rate:.0f} tasks/s\n",
             f"{'call':18} {'count':>7} {'mean ms':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    for name, values in times.items():
        if not values:
            continue
        stats = {"count": len(values), "mean": sum(values) / len(values),
                 "p50": common.percentile(values, 50), "p99": common.percentile(values, 99)}
        result[name] = stats
        label = "dequeue (empty)" if name == "empty" else name
        lines.append(f"{label:18} {stats['count']:7} {1e3 * stats['mean']:9.3f} "
                     f"{1e3 * stats['p50']:8.3f} {1e3 * stats['p99']:8.3f}")
    taking = [v for k in ("dequeue", "dequeue_many") for v in times[k]]
    if taking:
        per_call = (sum(batches) + len(times["dequeue"])) / len(taking)
        mean = sum(taking) / len(taking)
        result.update(serial_bound=per_call / mean, per_call=per_call, take_mean=mean)
        lines.append(f"\none leader takes messages at a time, {per_call:.2f} a call on average "
                     f"in {1e3 * mean:.3f} ms: at most {per_call / mean:.0f} tasks/s; "
                     f"measured {rate:.0f}")
    out.write_text("\n".join(lines) + "\n")
    return result


def _short(path: str) -> str:
    for marker in ("/tempest/", "/site-packages/", "/lib/python3"):
        if marker in path:
            return path[path.index(marker) + 1:]
    return path


def _frame(text: str, keep_line: bool = False) -> str:
    """``func (path:line)`` -> ``func (short path)``: a function, whatever its line."""
    func, _, where = text.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return f"{func} ({_short(path)}:{line})" if keep_line else f"{func} ({_short(path)})"


def main() -> None:
    """``BACKEND LEVEL N OUT``; ``floor - N OUT``; ``BACKEND idle SECONDS OUT``."""
    backend, level, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"backend": backend, "level": level, "n": n}
    if level == "idle":
        result["idle"] = with_idle(backend, n, out.with_name(out.name + ".idle.txt"))
    elif backend == "floor":
        result["cprofile"] = with_cprofile("floor", "", n,
                                           out.with_name(out.name + ".cprofile.txt"))
    elif backend == "memory":
        result["pyspy"] = with_pyspy(backend, level, 10 * n,
                                     out.with_name(out.name + ".pyspy.txt"))
        result["cprofile"] = with_cprofile(backend, level, n,
                                           out.with_name(out.name + ".cprofile.txt"))
    else:
        result["pyspy"] = with_pyspy(backend, level, n, out.with_name(out.name + ".pyspy.txt"))
        result["calls"] = with_call_timing(backend, level, n,
                                           out.with_name(out.name + ".calls.txt"))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
