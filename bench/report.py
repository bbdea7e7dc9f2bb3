"""Results: the machine, the summary statistics, the targets, markdown and charts.

``python -m bench.report RESULTS.json`` renders a recorded run again (latest.md and
the charts beside it).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import common

PACKAGES = ("task-tempest", "structlog", "redis", "psycopg", "huey", "dramatiq", "celery",
            "kombu", "rq", "matplotlib", "py-spy")

LABELS = {
    "threadpool": "ThreadPoolExecutor (floor)",
    "tempest-memory": "tempest MemoryQueue",
    "tempest-memory-info": "tempest MemoryQueue INFO",
    "tempest-sqlite": "tempest SQLiteQueue",
    "tempest-redis": "tempest RedisQueue",
    "tempest-postgres": "tempest PostgresQueue",
    "tempest-sqlite-prefetch": "tempest SQLiteQueue prefetch 8",
    "tempest-redis-prefetch": "tempest RedisQueue prefetch 8",
    "tempest-postgres-prefetch": "tempest PostgresQueue prefetch 8",
    "huey-memory": "Huey MemoryHuey",
    "huey-sqlite": "Huey SqliteHuey",
    "huey-redis": "Huey RedisHuey",
    "dramatiq-redis": "Dramatiq Redis",
    "celery-redis": "Celery Redis (threads)",
    "rq-redis": "RQ Redis (processes)",
}
ORDER = list(LABELS)
TEMPEST = [k for k in ORDER if k.startswith("tempest-")]


# -- the machine ------------------------------------------------------------------------


def machine(command: str) -> dict[str, Any]:
    """What ran where: CPU, memory, kernel, versions, the checkout, the load."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    except OSError:
        pass
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "packages": packages,
        "redis_server": _redis_version(),
        "postgres_server": _postgres_version(),
        "git": git(),
        "command": command,
        "load_before": os.getloadavg(),
    }


def _redis_version() -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(common.REDIS_URL, socket_connect_timeout=2)
        version = client.info("server")["redis_version"]
        client.close()
        return str(version)
    except Exception:  # noqa: BLE001 - absent: not recorded
        return None


def _postgres_version() -> str | None:
    try:
        import psycopg

        with psycopg.connect(common.POSTGRES_DSN, connect_timeout=2) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else None
    except Exception:  # noqa: BLE001
        return None


def git() -> dict[str, Any]:
    """The checkout's commit and what is changed outside bench/."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=common.ROOT, capture_output=True,
                              text=True, timeout=10, check=False).stdout

    try:
        changed = [line[3:] for line in git("status", "--porcelain").splitlines()
                   if not line[3:].startswith("bench/")]
        return {"commit": git("rev-parse", "--short", "HEAD").strip(),
                "changed_outside_bench": changed}
    except (OSError, subprocess.SubprocessError):
        return {}


# -- statistics -------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and quartiles of *values*."""
    return {"median": common.percentile(values, 50), "min": min(values), "max": max(values),
            "q1": common.percentile(values, 25), "q3": common.percentile(values, 75),
            "n": len(values), "values": values}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    threads = data["config"]["threads"]
    runs = [r for r in data["runs"] if r.get("ok")]
    summary: dict[str, Any] = {"noop": {}, **{body: {} for body in common.SLEEPS},
                               "enqueue": {}, "latency": {}, "memory": {}}
    by_round: dict[str, dict[str, dict[int, float]]] = {
        "noop": {}, **{body: {} for body in common.SLEEPS}}
    for body in ("noop", *common.SLEEPS):
        for key in ORDER:
            mine = [r for r in runs if r.get("phase") == "drain" and r["contender"] == key
                    and r["body"] == body]
            if not mine:
                continue
            if body == "noop":
                summary["noop"][key] = spread([r["rate"] for r in mine])
                summary["noop"][key]["tasks"] = sorted({r["n"] for r in mine})
                cpu = [r["cpu_per_task_us"] for r in mine if "cpu_per_task_us" in r]
                if cpu:
                    summary["noop"][key]["cpu_per_task_us"] = common.percentile(cpu, 50)
                summary["enqueue"][key] = spread([r["enqueue_rate"] for r in mine])
                by_round["noop"][key] = {r["round"]: r["rate"] for r in mine}
            else:
                seconds = common.SLEEPS[body]
                fractions = [r["n"] * seconds / threads / r["drain_s"] for r in mine]
                summary[body][key] = spread(fractions)
                summary[body][key]["rate"] = spread([r["rate"] for r in mine])
                summary[body][key]["tasks"] = sorted({r["n"] for r in mine})
                for field in ("sleep_ms", "gap_ms"):
                    values = [r[field] for r in mine if field in r]
                    if values:
                        summary[body][key][field] = common.percentile(values, 50)
                by_round[body][key] = dict(zip([r["round"] for r in mine], fractions,
                                               strict=True))
    floor = summary["noop"].get("threadpool")
    for key, stats in summary["noop"].items():
        if floor:
            stats["vs_floor"] = stats["median"] / floor["median"]
            paired = _paired(by_round["noop"], key, "threadpool")
            if paired:
                stats["vs_floor_min"], stats["vs_floor_max"] = min(paired), max(paired)
    for r in runs:
        if r.get("phase") == "latency":
            cpu = r["idle_cpu"]
            summary["latency"][r["contender"]] = {
                "warm_p50": common.percentile(r["warm"], 50),
                "warm_p99": common.percentile(r["warm"], 99),
                "warm_max": max(r["warm"]), "warm_n": len(r["warm"]),
                "idle_p50": common.percentile(r["idle"], 50),
                "idle_max": max(r["idle"]), "idle_n": len(r["idle"]),
                "idle_cpu": sum(cpu) / len(cpu), "idle_cpu_max": max(cpu),
                "engine_processes": r.get("engine_processes"),
            }
        elif r.get("phase") == "memory":
            summary["memory"][r["contender"]] = _memory(r)
    summary["targets"] = targets(summary, by_round)
    return summary


def _paired(rounds: dict[str, dict[int, float]], a: str, b: str) -> list[float]:
    """a/b in each round where both ran: the ratio without the drift between rounds."""
    mine, theirs = rounds.get(a, {}), rounds.get(b, {})
    return [mine[r] / theirs[r] for r in sorted(mine) if theirs.get(r)]


def _memory(r: dict[str, Any]) -> dict[str, Any]:
    samples = r["samples"]  # (seconds, processed, rss bytes)
    n = r["n"]

    def rss_at(fraction: float) -> float:
        goal = fraction * n
        best = min(samples, key=lambda s: abs(s[1] - goal))
        return best[2] / 2**20

    # Least squares over the second half: MiB per 100,000 tasks once warm.
    half = [(s[1], s[2] / 2**20) for s in samples if s[1] >= n / 2]
    slope = None
    if len(half) >= 3:
        mx = sum(x for x, _ in half) / len(half)
        my = sum(y for _, y in half) / len(half)
        var = sum((x - mx) ** 2 for x, _ in half)
        if var:
            slope = sum((x - mx) * (y - my) for x, y in half) / var * 100_000
    return {"tasks": n, "baseline_mib": r["baseline_rss"] / 2**20,
            "peak_mib": r["peak_rss"] / 2**20,
            "at": {f"{int(f * 100)}%": rss_at(f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)},
            "slope_mib_per_100k": slope, "rate": r["rate"], "samples": len(samples)}


def targets(summary: dict[str, Any], by_round: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the brief: measured, threshold, holds (None: not measured)."""
    rows: list[dict[str, Any]] = []
    noop = summary["noop"]

    def ratio(a: str, b: str, least: float, what: str) -> None:
        row: dict[str, Any] = {"target": f"{what} ≥ {least:g}×", "threshold": least,
                               "kind": "ratio"}
        if a in noop and b in noop:
            row["measured"] = noop[a]["median"] / noop[b]["median"]
            paired = _paired(by_round["noop"], a, b)
            if paired:
                row["spread"] = [min(paired), max(paired)]
            row["holds"] = row["measured"] >= least
        else:
            row["holds"] = None
            row["note"] = "not measured: " + ", ".join(k for k in (a, b) if k not in noop)
        rows.append(row)

    ratio("tempest-memory", "threadpool", 0.8,
          "no-op: tempest MemoryQueue (WARNING) / ThreadPoolExecutor")
    ratio("tempest-memory-info", "threadpool", 0.5,
          "no-op: tempest MemoryQueue (INFO) / ThreadPoolExecutor")
    ratio("tempest-sqlite", "huey-sqlite", 3, "no-op: tempest SQLiteQueue / Huey SqliteHuey")
    ratio("tempest-redis", "dramatiq-redis", 2, "no-op: tempest RedisQueue / Dramatiq")
    ratio("tempest-redis", "celery-redis", 5, "no-op: tempest RedisQueue / Celery threads")
    for key in TEMPEST:
        row = {"target": f"10 ms sleep: {LABELS[key]} ≥ 97% of ideal", "threshold": 0.97,
               "kind": "fraction"}
        if key in summary["sleep"]:
            stats = summary["sleep"][key]
            row.update(measured=stats["median"], spread=[stats["min"], stats["max"]],
                       holds=stats["median"] >= 0.97)
        else:
            row.update(holds=None, note="not measured")
        rows.append(row)
    latency = summary["latency"]
    for key, limit in (("tempest-memory", 0.001), ("tempest-redis", 0.003)):
        for when in ("warm", "idle"):
            row = {"target": f"latency p50 {'after idle' if when == 'idle' else 'warm'}: "
                             f"{LABELS[key]} < {limit * 1e3:g} ms",
                   "threshold": limit, "kind": "seconds"}
            if key in latency:
                value = latency[key][f"{when}_p50"]
                row.update(measured=value, holds=value < limit)
            else:
                row.update(holds=None, note="not measured")
            rows.append(row)
    for key in TEMPEST:
        row = {"target": f"idle CPU: {LABELS[key]} < 0.5% of a core", "threshold": 0.005,
               "kind": "cpu"}
        if key in latency:
            row.update(measured=latency[key]["idle_cpu"],
                       holds=latency[key]["idle_cpu"] < 0.005)
        else:
            row.update(holds=None, note="not measured")
        rows.append(row)
    return rows


# -- markdown -----------------------------------------------------------------------------


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _fmt_measured(row: dict[str, Any]) -> str:
    if "measured" not in row:
        return "—"
    value, kind = row["measured"], row["kind"]
    spread_ = row.get("spread")
    if kind == "ratio":
        text = f"{value:.2f}×"
        if spread_:
            text += f" ({spread_[0]:.2f}–{spread_[1]:.2f})"
    elif kind == "fraction":
        text = f"{100 * value:.1f}%"
        if spread_:
            text += f" ({100 * spread_[0]:.1f}–{100 * spread_[1]:.1f})"
    elif kind == "seconds":
        text = f"{value * 1e3:.3f} ms"
    else:
        text = f"{100 * value:.3f}%"
    return text


def write_markdown(data: dict[str, Any], path: Path, json_name: str) -> None:
    meta, config, summary = data["meta"], data["config"], data["summary"]
    out: list[str] = []
    w = out.append
    w(f"# Benchmark results: {meta['date']} ({config['mode']} mode)\n")
    w(f"Recorded by `{meta['command']}` in {meta['duration_s']:.0f} s; raw data: "
      f"[`{json_name}`]({json_name}). Method: [bench/README.md](../README.md).\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    w(f"| CPU | {meta['cpu']}, {meta['cores']} cores |")
    w(f"| RAM | {meta['ram_gib']} GiB |")
    w(f"| kernel | Linux {meta['kernel']} |")
    w(f"| Python | {meta['implementation']} {meta['python']} |")
    w(f"| servers | Redis {meta['redis_server']}, PostgreSQL {meta['postgres_server']} "
      f"(127.0.0.1) |")
    git = meta.get("git", {})
    changed = git.get("changed_outside_bench") or []
    w(f"| tempest | commit {git.get('commit', '?')}"
      + (f" plus uncommitted {', '.join(changed)}" if changed else "") + " |")
    after = meta.get("git_after") or {}
    if after and after != git:
        w(f"| checkout at the end | commit {after.get('commit', '?')} (it changed during the "
          "run; every run measured the copy taken at the start) |")
    code = meta.get("code") or {}
    if code:
        w(f"| code measured | a copy of tempest/ and bench/ taken at the start: tempest "
          f"sha256 {code['tempest_sha256']} ({code['tempest_files']} files) |")
    w("| load average | before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f} |".format(
        *meta["load_before"], *meta.get("load_after", (0, 0, 0))))
    w("| packages | " + ", ".join(f"{k} {v}" for k, v in meta["packages"].items() if v)
      + " |")
    w("")
    w(f"Every engine runs {config['threads']} worker threads (RQ: {config['threads']} worker "
      f"processes); tempest logs at WARNING unless marked INFO, peers at WARNING. "
      f"Drains: median of {config['rounds']} interleaved rounds, spread min–max.\n")
    if data["skipped"]:
        w("Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in data["skipped"].items()) + "\n")

    w("## Targets\n")
    w("| target | measured | holds |\n|---|---|---|")
    for row in summary["targets"]:
        verdict = {True: "yes", False: "**NO**", None: "not measured"}[row["holds"]]
        w(f"| {row['target']} | {_fmt_measured(row)} | {verdict} |")
    w("")

    noop = summary["noop"]
    if noop:
        w("## No-op drain (tasks/s)\n")
        w("Tasks enqueued first, workers started, timed from the first task's start to the "
          "last task's end.\n")
        w("| contender | tasks/s (median) | min–max | × floor | tasks per run | "
          "enqueue/s (median) | CPU µs/task |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        for key in ORDER:
            if key in noop:
                s = noop[key]
                vs = f"{s['vs_floor']:.2f}" if "vs_floor" in s else "—"
                cpu = f"{s['cpu_per_task_us']:.1f}" if "cpu_per_task_us" in s else "—"
                w(f"| {LABELS[key]} | {_fmt_rate(s['median'])} | {_fmt_rate(s['min'])}–"
                  f"{_fmt_rate(s['max'])} | {vs} | {', '.join(f'{t:,}' for t in s['tasks'])} | "
                  f"{_fmt_rate(summary['enqueue'][key]['median'])} | {cpu} |")
        w("\nCPU µs/task: CPU time of the whole process (every thread, user and system) from "
          "start to the last task, per task; in-process engines only.\n")
        w("")
    for body, seconds in common.SLEEPS.items():
        _sleep_table(w, config, summary[body], body, seconds)
    latency = summary["latency"]
    if latency:
        w("## Submit→start latency and idle CPU\n")
        w(f"Warm: {config['warm_probes']} probes 5 ms apart. After idle: "
          f"{config['idle_samples']} probes, each after {config['idle_s']:g} s of idling "
          "(so the \"max\" column is the worst of those few). Idle CPU: the engine's "
          "processes over those idle spells, % of one core.\n")
        w("| contender | warm p50 | warm p99 | after idle p50 | after idle max | "
          "idle CPU |")
        w("|---|---:|---:|---:|---:|---:|")
        for key in ORDER:
            if key in latency:
                s = latency[key]
                w(f"| {LABELS[key]} | {_ms(s['warm_p50'])} | {_ms(s['warm_p99'])} | "
                  f"{_ms(s['idle_p50'])} | {_ms(s['idle_max'])} | {100 * s['idle_cpu']:.3f}% |")
        w("")
    memory = summary["memory"]
    if memory:
        w("## Memory over a long run\n")
        w("No-op tasks submitted by one thread while the engine runs (backlog held at "
          "1,000), RSS sampled as the count grows.\n")
        w("| contender | tasks | RSS before start | at 10% | 50% | 100% | peak | "
          "slope, second half |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key, s in memory.items():
            slope = s["slope_mib_per_100k"]
            w(f"| {LABELS[key]} | {s['tasks']:,} | {s['baseline_mib']:.1f} MiB | "
              f"{s['at']['10%']:.1f} | {s['at']['50%']:.1f} | {s['at']['100%']:.1f} | "
              f"{s['peak_mib']:.1f} MiB | "
              + (f"{slope:+.2f} MiB/100k tasks |" if slope is not None else "— |"))
        w("")
    profiles = data.get("profiles") or {}
    if profiles:
        w("## Where tempest's time goes (no-op drains)\n")
        w("py-spy `--gil`: share of samples in which the thread holding the GIL (or, while "
          "no thread holds it, the one that held it last) was in the function itself (own) "
          "or below it (cum). Full listings -- with cProfile's call counts for MemoryQueue "
          "and the queue calls' timings for the durable queues -- in `profile-*.txt` "
          "beside this file.\n")
        floor = (profiles.get("floor") or {}).get("cprofile") or {}
        for level in ("warning", "info"):
            mine = (profiles.get(f"memory-{level}") or {}).get("cprofile") or {}
            if floor.get("calls_per_task") and mine.get("calls_per_task"):
                w(f"cProfile, MemoryQueue at {level.upper()}: {mine['calls_per_task']:.1f} "
                  f"Python calls and {mine['cpu_us_per_task']:.0f} µs of profiled CPU per "
                  f"task, against the floor's {floor['calls_per_task']:.1f} calls and "
                  f"{floor['cpu_us_per_task']:.0f} µs (the profiler inflates both).\n")
        for name, prof in profiles.items():
            idle = prof.get("idle")
            if idle:
                where = ", ".join(f"`{row['line']}` {row['samples']}"
                                  for row in (idle.get("tempest_lines") or [])[:4])
                w(f"**{name}**: {100 * idle['cpu']:.3f}% of a core over {idle['seconds']:.0f} s"
                  + (f"; py-spy samples by innermost tempest frame: {where}" if where else "")
                  + "\n")
                continue
            spy = prof.get("pyspy") or {}
            if spy.get("own"):
                w(f"**{name}** ({prof.get('n', 0) * (10 if name.startswith('memory') else 1):,} "
                  f"tasks, {spy['samples']} samples, {spy['rate_while_sampled']:,.0f} "
                  "tasks/s while sampled)\n")
                w("| own % | cum % | function |\n|---:|---:|---|")
                cum = {row["function"]: row["percent"] for row in spy["cumulative"]}
                for row in spy["own"][:10]:
                    c = cum.get(row["function"])
                    w(f"| {row['percent']:.1f} | {'' if c is None else f'{c:.1f}'} | "
                      f"`{row['function']}` |")
                lines = spy.get("own_lines") or []
                if lines:
                    w("\nBusiest lines: " + ", ".join(
                        f"`{row['line']}` {row['percent']:.1f}%" for row in lines[:5]) + "\n")
            calls = prof.get("calls") or {}
            if calls.get("serial_bound"):
                parts = []
                for call in ("dequeue", "dequeue_many", "ack"):
                    if call in calls:
                        parts.append(f"{call} mean {calls[call]['mean'] * 1e3:.3f} ms (p99 "
                                     f"{calls[call]['p99'] * 1e3:.3f} ms, {calls[call]['count']:,}"
                                     " calls)")
                w("Queue calls: " + ", ".join(parts) + f". One leader takes messages at a "
                  f"time, {calls['per_call']:.2f} a call: at most "
                  f"{calls['serial_bound']:,.0f} tasks/s; measured {calls['rate']:,.0f}.\n")
    failed = [r for r in data["runs"] if not r.get("ok")]
    if failed:
        w("## Failed runs\n")
        for r in failed:
            error = str(r.get("error", "")).strip().splitlines()
            w(f"- {r['contender']} {r.get('phase', '')} {r.get('body', '')} round "
              f"{r.get('round', '-')}: {error[-1] if error else 'unknown'}")
        w("")
    path.write_text("\n".join(out))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -- charts ------------------------------------------------------------------------------

COLORS = {"floor": "#7f7f7f", "tempest": "#d62728", "peer": "#1f77b4"}


def _family(key: str) -> str:
    return "floor" if key == "threadpool" else "tempest" if key.startswith("tempest") \
        else "peer"


def chart(data: dict[str, Any], path: Path) -> Path | None:
    """Bar chart: no-op tasks/s and 10 ms-sleep % of ideal, error bars min–max."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary, meta = data["summary"], data["meta"]
    noop = [k for k in ORDER if k in summary["noop"]]
    if not noop:
        return None
    sleep = [k for k in ORDER if k in summary["sleep"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(noop) + 1.8),
                                      gridspec_kw={"width_ratios": [3, 2]})
    ys = range(len(noop))[::-1]
    med = [summary["noop"][k]["median"] for k in noop]
    lo = [m - summary["noop"][k]["min"] for m, k in zip(med, noop, strict=True)]
    hi = [summary["noop"][k]["max"] - m for m, k in zip(med, noop, strict=True)]
    left.barh(list(ys), med, xerr=[lo, hi], color=[COLORS[_family(k)] for k in noop],
              capsize=3, error_kw={"elinewidth": 1})
    left.set_yticks(list(ys), [LABELS[k] for k in noop])
    left.set_xscale("log")
    left.set_xlabel("no-op tasks/s (log scale; median, bars min–max)")
    for y, m, k in zip(ys, med, noop, strict=True):
        left.text(summary["noop"][k]["max"] * 1.12, y, f"{m:,.0f}", va="center", fontsize=8)
    left.set_xlim(right=max(summary["noop"][k]["max"] for k in noop) * 6)
    left.grid(axis="x", which="both", alpha=0.3)
    if sleep:
        ys2 = [len(noop) - 1 - noop.index(k) if k in noop else 0 for k in sleep]
        med2 = [100 * summary["sleep"][k]["median"] for k in sleep]
        lo2 = [m - 100 * summary["sleep"][k]["min"] for m, k in zip(med2, sleep, strict=True)]
        hi2 = [100 * summary["sleep"][k]["max"] - m for m, k in zip(med2, sleep, strict=True)]
        right.barh(ys2, med2, xerr=[lo2, hi2], color=[COLORS[_family(k)] for k in sleep],
                   capsize=3, error_kw={"elinewidth": 1})
        right.axvline(97, color="black", linestyle="--", linewidth=0.8)
        right.text(97, len(noop) - 0.45, "target 97%", fontsize=7, ha="center", va="bottom")
        right.set_yticks(list(ys), [""] * len(noop))
        right.set_xlim(0, 118)
        ideal = data["config"]["threads"] / common.SLEEP
        right.set_xlabel(f"10 ms-sleep tasks: % of ideal {ideal:.0f}/s")
        for y, m, k in zip(ys2, med2, sleep, strict=True):
            right.text(100 * summary["sleep"][k]["max"] + 1.5, y, f"{m:.1f}%", va="center",
                       fontsize=8)
        right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{data['config']['threads']} threads each, one machine: {meta['cpu']}, "
                 f"{meta['cores']} cores, Python {meta['python']} ({meta['date'][:10]}, "
                 f"{data['config']['mode']} mode)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_chart(data: dict[str, Any], path: Path) -> Path | None:
    """RSS against tasks processed, one line per memory run."""
    runs = [r for r in data["runs"] if r.get("phase") == "memory" and r.get("ok")]
    if not runs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for r in runs:
        xs = [s[1] for s in r["samples"]]
        ys = [s[2] / 2**20 for s in r["samples"]]
        ax.plot(xs, ys, label=LABELS.get(r["contender"], r["contender"]))
    ax.set_xlabel("tasks processed")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("tempest RSS over a long run (no-op tasks, backlog held at 1,000)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    """``python -m bench.report RESULTS.json``: write latest.md and the charts again."""
    import json
    import sys

    path = Path(sys.argv[1])
    data = json.loads(path.read_text())
    data["summary"] = summarize(data)
    path.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, path.parent / "latest.md", path.name)
    chart(data, path.parent / "throughput.png")
    memory_chart(data, path.parent / "memory.png")


if __name__ == "__main__":
    main()


def _sleep_table(w: Callable[[str], None], config: dict[str, Any],
                 sleep: dict[str, Any], body: str, seconds: float) -> None:
    """The table of one sleeping body: % of ideal, the floor's ratio, sleep and gap."""
    if not sleep:
        return
    ms = f"{seconds * 1e3:g} ms"
    ideal = config["threads"] / seconds
    w(f"## {ms} sleep tasks (ideal {ideal:.0f}/s)\n")
    w("| contender | % of ideal (median) | min–max | tasks/s | × floor | sleep ms | "
      "gap ms | tasks per run |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    floor_sleep = sleep.get("threadpool")
    for key in ORDER:
        if key in sleep:
            s = sleep[key]
            vs = f"{s['median'] / floor_sleep['median']:.3f}" if floor_sleep else "—"
            sleep_ms = f"{s['sleep_ms']:.3f}" if "sleep_ms" in s else "—"
            gap_ms = f"{s['gap_ms']:.3f}" if "gap_ms" in s else "—"
            w(f"| {LABELS[key]} | {100 * s['median']:.1f}% | {100 * s['min']:.1f}–"
              f"{100 * s['max']:.1f}% | {_fmt_rate(s['rate']['median'])} | {vs} | "
              f"{sleep_ms} | {gap_ms} | {', '.join(f'{t:,}' for t in s.get('tasks', []))} |")
    w("")
    gap = seconds * 0.03 / 0.97 * 1e3
    w(f"sleep ms: how long `time.sleep({seconds:g})` took inside the task (median of the "
      "rounds' means); gap ms: the mean time a worker spent between two tasks "
      f"({config['threads']} × the drain time, less the sleeps, per task). In-process "
      f"engines only. At {ms} a task, 97% of ideal leaves {gap:.2f} ms per task for "
      "both.\n")
