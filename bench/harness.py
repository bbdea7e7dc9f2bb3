"""The benchmark suite: ``python -m bench.harness [--quick | --full | --smoke | --chaos]``.

``bash bench/run`` prepares bench/.venv and calls this. Phases, in order:

1. calibration (default mode only): one 1,000-task drain per contender, not
   counted, which warms caches and tells how many tasks each contender
   drains in about ``drain_budget`` seconds (see :meth:`Harness.calibrate`);
2. drains: ``rounds`` rounds; in each, every contender drains the no-op
   backlog, then every contender the 10 ms-sleep backlog, then the 1 ms-sleep
   backlog, in an order rotated
   by one place per round; one fresh runner process per run;
3. latency and idle CPU: one runner per contender, all at once, idling side
   by side and taking turns to probe;
4. memory: long runs through tempest's MemoryQueue, RSS sampled;
5. hot path: cProfile and py-spy of MemoryQueue no-op drains (WARNING, INFO)
   and cProfile of the floor's; py-spy and queue-call timings of the durable
   queues' drains, and py-spy of their idle engines.

Then the results are written (see :mod:`bench.report`) and every Redis key
and Postgres row of this run is deleted. ``--chaos`` runs :mod:`bench.chaos`
instead, with the options that follow it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.contenders import Contender, all_contenders

RESULTS = Path(__file__).resolve().parent / "results"

MODES: dict[str, dict[str, Any]] = {
    "quick": {"rounds": 2, "noop_n": 2000, "sleep_n": 400, "sleep1_n": 2000,
              "calibrate": False,
              "warm_probes": 50, "idle_s": 2.0, "idle_samples": 2, "memory_n": 20_000,
              "memory_every": 0.1, "profile_n": 5000},
    "default": {"rounds": 3, "noop_n": 20_000, "sleep_n": 2000, "sleep1_n": 10_000,
                "calibrate": True, "drain_budget": 8.0, "min_n": 1000, "min_sleep_n": 400,
                "warm_probes": 200,
                "idle_s": 10.0,
                "idle_samples": 5, "memory_n": 200_000, "memory_every": 0.25,
                "profile_n": 20_000},
    "full": {"rounds": 5, "noop_n": 20_000, "sleep_n": 2000, "sleep1_n": 10_000,
             "calibrate": False,
             "warm_probes": 500, "idle_s": 10.0, "idle_samples": 10,
             "memory_n": 1_000_000, "memory_every": 1.0, "profile_n": 50_000},
}

CALIBRATION_N = 1000
"""Tasks of the calibration drain (not counted)."""

QUEUE_PROFILE_N = {"sqlite": 5000, "redis": 5000, "postgres": 1500}
"""Tasks of the py-spy and queue-call profiles of tempest's durable queues (default mode)."""

_live: set[subprocess.Popen[Any]] = set()
"""Runner processes (each the leader of its own process group) not yet reaped."""


def _kill_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the runner's group (it stops its workers), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # workers the runner did not stop share its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_code = common.ROOT
"""Where runners import tempest and bench from: the snapshot, once taken."""


def snapshot(into: Path) -> dict[str, Any]:
    """Copy tempest/ and bench/ (code only) into *into*; runners import them from there.

    The checkout may change while the suite runs (colleagues commit, editors
    save): every run measures the code as it was when the suite started. The
    copy shadows the editable install, which Python consults after
    ``PYTHONPATH``. Returns a digest of the tempest code measured.
    """
    global _code
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", "results")
    for name in ("tempest", "bench"):
        shutil.copytree(common.ROOT / name, into / name, ignore=skip)
    _code = into
    digest = hashlib.sha256()
    files = sorted((into / "tempest").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(into)).encode() + b"\0" + path.read_bytes())
    return {"tempest_sha256": digest.hexdigest()[:16], "tempest_files": len(files)}


def _spawn(args: list[str], code: Path | None = None, **kwargs: Any
           ) -> subprocess.Popen[Any]:
    """Start a runner importing tempest and bench from *code* (default: the snapshot)."""
    code = code or _code
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(code), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(args, cwd=code, env=env, start_new_session=True,
                            text=True, **kwargs)
    _live.add(proc)
    return proc


def _parse(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


class Harness:
    def __init__(self, mode: str, config: dict[str, Any], only: list[str] | None,
                 out: Path) -> None:
        self.mode = mode
        self.config = config
        self.out = out
        self.run_id = time.strftime("%Y%m%dt%H%M%S").lower() + f"_{os.getpid()}"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.seq = 0
        self.contenders: list[Contender] = []
        self.skipped: dict[str, str] = {}
        for contender in all_contenders():
            if only and contender.key not in only:
                continue
            reason = contender.unavailable()
            if reason:
                self.skipped[contender.key] = reason
            else:
                self.contenders.append(contender)
        self.runs: list[dict[str, Any]] = []

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def spec(self, contender: Contender, scenario: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        ns = f"bench_{self.run_id}_{self.seq}"
        return {"contender": contender.key, "scenario": scenario,
                "threads": self.config["threads"], "ns": ns, "tmp": str(self.tmp / ns),
                **fields}

    def run_one(self, spec: dict[str, Any], timeout: float, code: Path | None = None
                ) -> dict[str, Any]:
        """One runner process, bounded by *timeout* seconds, on *code* (the snapshot)."""
        proc = _spawn([sys.executable, "-m", "bench.runner", json.dumps(spec)], code,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            result = _parse(stdout) or {}
            result.update(ok=False, error=f"timed out after {timeout:.0f}s")
        else:
            _kill_group(proc, grace=0)
            result = _parse(stdout) or {"ok": False,
                                        "error": f"exit {proc.returncode}: {stderr[-1500:]}"}
        _live.discard(proc)
        shutil.rmtree(spec["tmp"], ignore_errors=True)
        result.update(contender=spec["contender"], scenario=spec["scenario"])
        return result

    # -- phases ----------------------------------------------------------------------

    def calibrate(self) -> dict[str, dict[str, int]]:
        """Tasks each contender drains in about drain_budget seconds, per scenario.

        No-op: between ``min_n`` and ``noop_n``. Sleep: ``sleep_n`` (``sleep1_n``
        for 1 ms), or fewer (not under ``min_sleep_n``) for a contender whose no-op
        rate is below what 8 threads of such tasks need: RQ and Celery on a busy
        machine, and more of them at 1 ms.
        """
        config = self.config
        sizes: dict[str, dict[str, int]] = {"noop": {}, **{body: {} for body in common.SLEEPS}}
        for contender in self.contenders:
            spec = self.spec(contender, "drain", n=CALIBRATION_N, body="noop", timeout=120)
            result = self.run_one(spec, 180)
            result["phase"] = "calibration"
            self.runs.append(result)
            rate = result["rate"] if result.get("ok") else 0.0
            budget = config["drain_budget"]
            noop = int(min(config["noop_n"], max(config["min_n"], round(rate * budget, -3))))
            sizes["noop"][contender.key] = noop
            for body, seconds in common.SLEEPS.items():
                ideal = config["threads"] / seconds
                sizes[body][contender.key] = int(min(
                    config[f"{body}_n"],
                    max(config["min_sleep_n"], round(min(rate, ideal) * budget, -2))))
            if result.get("ok"):
                self.log(f"calibration {contender.key:22} {rate:9.0f} tasks/s -> "
                         f"no-op n={noop}, sleep n={sizes['sleep'][contender.key]}, "
                         f"sleep1 n={sizes['sleep1'][contender.key]}")
            else:
                self.log(f"calibration {contender.key:22} FAILED: {_first_line(result)}")
        return sizes

    def drains(self, sizes: dict[str, dict[str, int]]) -> None:
        config = self.config
        order = list(self.contenders)
        for round_no in range(config["rounds"]):
            rotated = order[round_no % len(order):] + order[:round_no % len(order)]
            for body in ("noop", *common.SLEEPS):
                for contender in rotated:
                    n = sizes.get(body, {}).get(contender.key, config[f"{body}_n"])
                    # Bounded: an engine ten times slower than 100 tasks/s fails the run.
                    limit = 60 + n / 10 + n * common.SLEEPS.get(body, 0)
                    spec = self.spec(contender, "drain", n=n, body=body, timeout=limit)
                    result = self.run_one(spec, limit * 2 + 60)
                    result.update(phase="drain", round=round_no)
                    self.runs.append(result)
                    if result.get("ok"):
                        extra = ""
                        if body in common.SLEEPS:
                            ideal = n * common.SLEEPS[body] / config["threads"]
                            extra = f"  {100 * ideal / result['drain_s']:5.1f}% of ideal"
                        self.log(f"round {round_no + 1} {body:6} {contender.key:22} "
                                 f"{result['rate']:9.0f} tasks/s  enqueue "
                                 f"{result['enqueue_rate']:8.0f}/s{extra}")
                    else:
                        self.log(f"round {round_no + 1} {body:6} {contender.key:22} FAILED: "
                                 f"{_first_line(result)}")

    def latency(self) -> None:
        """Every contender's runner at once: idle side by side, probe in turns."""
        config = self.config
        turn = str(self.tmp / "probe.lock")
        procs = []
        for contender in self.contenders:
            spec = self.spec(contender, "latency", warm=config["warm_probes"], gap=0.005,
                             idle=config["idle_s"], idle_samples=config["idle_samples"],
                             probe_timeout=60, turn=turn)
            proc = _spawn([sys.executable, "-m", "bench.runner", json.dumps(spec)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
            lines: list[str] = []
            ready = threading.Event()

            def read(proc: subprocess.Popen[Any] = proc, lines: list[str] = lines,
                     ready: threading.Event = ready) -> None:
                for line in proc.stdout:  # type: ignore[union-attr]
                    lines.append(line)
                    if line.startswith("READY"):
                        ready.set()
                ready.set()  # exited

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            stderr: list[str] = []
            err_reader = threading.Thread(
                target=lambda p=proc, e=stderr: e.append(p.stderr.read()), daemon=True)
            err_reader.start()
            procs.append((contender, spec, proc, lines, ready, reader, stderr, err_reader))
        deadline = time.monotonic() + 180
        for _, _, _, _, ready, *_ in procs:
            ready.wait(max(0, deadline - time.monotonic()))
        self.log(f"latency: {len(procs)} contenders ready, probing in turns "
                 f"({config['warm_probes']} warm probes each, then {config['idle_samples']} "
                 f"probes after {config['idle_s']:.0f} s idle)")
        for _, _, proc, *_ in procs:
            try:
                proc.stdin.write("GO\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                pass
        per_probe = 0.2  # generous: Huey's first polls back off to 0.1 s and more
        budget = (len(procs) * config["warm_probes"] * (per_probe + 0.005)
                  + config["idle_samples"] * (config["idle_s"] + len(procs) * 2) + 120)
        deadline = time.monotonic() + budget
        for contender, spec, proc, lines, _, reader, stderr, err_reader in procs:
            try:
                proc.wait(max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
            _kill_group(proc, grace=0)
            reader.join(5)
            err_reader.join(5)
            _live.discard(proc)
            result = _parse("".join(lines)) or {
                "ok": False, "error": f"exit {proc.returncode}: {''.join(stderr)[-1500:]}"}
            result.update(contender=contender.key, scenario="latency", phase="latency")
            self.runs.append(result)
            shutil.rmtree(spec["tmp"], ignore_errors=True)
            if result.get("ok"):
                warm = result["warm"]
                self.log(f"latency {contender.key:22} warm p50 "
                         f"{1e3 * common.percentile(warm, 50):8.3f} ms  p99 "
                         f"{1e3 * common.percentile(warm, 99):8.3f} ms  after idle p50 "
                         f"{1e3 * common.percentile(result['idle'], 50):8.3f} ms  idle CPU "
                         f"{100 * sum(result['idle_cpu']) / len(result['idle_cpu']):.3f}%")
            else:
                self.log(f"latency {contender.key:22} FAILED: {_first_line(result)}")

    def memory(self) -> None:
        config = self.config
        for contender in self.contenders:
            if not contender.key.startswith("tempest-memory"):
                continue
            n = config["memory_n"]
            spec = self.spec(contender, "memory", n=n, backlog=1000,
                             sample_every=config["memory_every"], timeout=60 + n / 500)
            result = self.run_one(spec, 120 + n / 250)
            result["phase"] = "memory"
            self.runs.append(result)
            if result.get("ok"):
                self.log(f"memory {contender.key:22} {n} tasks: RSS "
                         f"{result['baseline_rss'] / 2**20:.1f} MiB before, peak "
                         f"{result['peak_rss'] / 2**20:.1f} MiB, last "
                         f"{result['samples'][-1][2] / 2**20:.1f} MiB")
            else:
                self.log(f"memory {contender.key:22} FAILED: {_first_line(result)}")

    def hotpath(self) -> dict[str, Any]:
        profiles: dict[str, Any] = {}
        scale = 1 if self.mode != "quick" else 0.2
        plan = []
        keys = [c.key for c in self.contenders]
        if "threadpool" in keys and "tempest-memory" in keys:
            plan.append(("floor", "-", self.config["profile_n"]))
        for contender in self.contenders:
            if contender.key == "tempest-memory":
                plan.append(("memory", "WARNING", self.config["profile_n"]))
            elif contender.key == "tempest-memory-info":
                plan.append(("memory", "INFO", self.config["profile_n"]))
            elif contender.key in ("tempest-sqlite", "tempest-redis", "tempest-postgres"):
                backend = contender.key.split("-")[1]
                plan.append((backend, "WARNING", int(QUEUE_PROFILE_N[backend] * scale)))
                plan.append((backend, "idle", max(2, int(self.config["idle_s"]))))
        for backend, level, n in plan:
            name = f"profile-{backend}" + ("" if level == "-" else f"-{level.lower()}")
            proc = _spawn([sys.executable, "-m", "bench.hotpath", backend, level, str(n),
                           str(self.out / name)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                stdout, stderr = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                stdout, stderr = proc.communicate()
            _live.discard(proc)
            profiles[name[len("profile-"):]] = _parse(stdout) or {"error": stderr[-1500:]}
            self.log(f"profiled {backend} {level}: {name}.*.txt")
        return profiles

    def cleanup(self) -> None:
        """Delete whatever this run left in Redis and Postgres; remove the temp dir."""
        try:
            if any(c.uses_redis for c in self.contenders):
                common.delete_redis_keys(f"bench_{self.run_id}_")
        except Exception as exc:  # noqa: BLE001
            self.log(f"cleanup: Redis: {exc}")
        try:
            if any(c.key == "tempest-postgres" for c in self.contenders):
                from bench.smoke import drop_postgres_tables

                drop_postgres_tables()
        except Exception as exc:  # noqa: BLE001
            self.log(f"cleanup: Postgres: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)


def _first_line(result: dict[str, Any]) -> str:
    error = str(result.get("error", "unknown error")).strip().splitlines()
    return error[-1] if error else "unknown error"


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--chaos" in argv:  # the soak has options of its own: all but --chaos are its
        from bench import chaos

        return chaos.main([arg for arg in argv if arg != "--chaos"])
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small sizes, short idle (~5 min)")
    group.add_argument("--full", action="store_true",
                       help="20,000 tasks for everyone, 5 rounds, 1,000,000-task memory run")
    group.add_argument("--smoke", action="store_true",
                       help="every tempest contender, tiny sizes, no peers (seconds)")
    group.add_argument("--chaos", action="store_true",
                       help="the chaos soak instead: kill -9 and server restarts, zero loss "
                            "(python -m bench.chaos --help lists its options)")
    parser.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help="run only these contenders (keys as in the results)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PHASE",
                        choices=["drains", "latency", "memory", "hotpath"],
                        help="leave out these phases")
    parser.add_argument("--out", type=Path, help="where results go (default: bench/results, "
                                                 "bench/results/quick for --quick)")
    args = parser.parse_args(argv)
    if args.smoke:
        from bench import smoke

        return smoke.main()
    mode = "quick" if args.quick else "full" if args.full else "default"
    config = dict(MODES[mode], threads=common.THREADS, mode=mode)
    if args.rounds:
        config["rounds"] = args.rounds
    out = args.out or (RESULTS / "quick" if mode == "quick" else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    from bench import report

    signal.signal(signal.SIGTERM, _terminate)
    harness = Harness(mode, config, args.only, out)
    harness.log(f"mode {mode}: {len(harness.contenders)} contenders, "
                f"{config['threads']} threads, results in {out}")
    for key, reason in harness.skipped.items():
        harness.log(f"SKIPPED {key}: {reason}")
    meta = report.machine(command=" ".join(["bench/run", *argv]))
    meta["code"] = snapshot(harness.tmp / "code")
    began = time.time()
    profiles: dict[str, Any] = {}
    try:
        sizes: dict[str, dict[str, int]] = {}
        if "drains" not in args.skip:
            if config["calibrate"]:
                sizes = harness.calibrate()
            harness.drains(sizes)
        if "latency" not in args.skip:
            harness.latency()
        if "memory" not in args.skip:
            harness.memory()
        if "hotpath" not in args.skip:
            profiles = harness.hotpath()
    except KeyboardInterrupt:
        harness.log("interrupted: stopping runners, cleaning up, writing what was measured")
    finally:
        for proc in list(_live):
            _kill_group(proc, grace=5)
        harness.cleanup()
    meta.update(duration_s=round(time.time() - began, 1), load_after=os.getloadavg(),
                git_after=report.git())
    data = {"meta": meta, "config": config, "skipped": harness.skipped,
            "sizes": sizes, "runs": harness.runs, "profiles": profiles}
    data["summary"] = report.summarize(data)
    stamp = time.strftime("%Y-%m-%d")
    path = out / f"{stamp}-{socket.gethostname()}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    report.write_markdown(data, out / "latest.md", path.name)
    chart = report.chart(data, out / "throughput.png")
    memory_chart = report.memory_chart(data, out / "memory.png")
    harness.log(f"wrote {path}, {out / 'latest.md'}"
                + (f", {chart}" if chart else "") + (f", {memory_chart}" if memory_chart else ""))
    print()
    print((out / "latest.md").read_text())
    failed = [r for r in harness.runs if not r.get("ok")]
    if failed:
        harness.log(f"{len(failed)} of {len(harness.runs)} runs failed: see latest.md")
    # A failing peer is a result; only a suite where nothing ran is an error.
    return 1 if harness.runs and len(failed) == len(harness.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
