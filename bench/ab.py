"""Two versions of tempest, side by side in one run: ``python -m bench.ab BASE``.

Answers "did this change cost throughput?" for the drains of tempest's own
contenders: *BASE* is any git revision (``cabe1f5``, ``main~3``); the other
side is the checkout as it is now (or ``--head REV``). Each side's ``tempest/``
is copied into a temporary directory, beside the checkout's ``bench/`` (one
harness measuring both), and every drain runs in a fresh runner process
importing one side.

Rounds interleave the two sides as closely as possible: in each round every
contender drains the no-op backlog, then the 10 ms-sleep backlog, base and
head back to back, the order of the pair swapped every round so that neither
side always runs second. The report gives each side's median over the rounds
and the head/base ratio of the medians with the min-max of the per-round
ratios (a pair is seconds apart, so the machine's slow drift cancels).

Results: ``bench/results/ab-<date>-<base>-<head>.json`` and a table on stdout.

``--without-hiredis`` measures one version of tempest twice instead: with
hiredis (redis-py's C reply parser, which redis-py picks whenever it is
importable) and with redis-py's own Python parser. The second side's copy
holds a ``hiredis`` package whose import fails, ahead of the installed one on
``PYTHONPATH``, so redis-py falls back as it does where hiredis is missing.

Usage::

    bench/.venv/bin/python -m bench.ab cabe1f5 --only tempest-sqlite tempest-redis
    bench/.venv/bin/python -m bench.ab main~1 --rounds 7 --noop-n 20000
    bench/.venv/bin/python -m bench.ab HEAD --head HEAD --without-hiredis --only tempest-redis
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench import common, harness, report

TEMPEST_KEYS = ("tempest-memory", "tempest-sqlite", "tempest-redis", "tempest-postgres")


def export(rev: str | None, into: Path) -> str:
    """Put *rev*'s ``tempest/`` (None: the working tree's) and the checkout's
    ``bench/`` into *into*; return a label for the side."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv", "results")
    into.mkdir(parents=True)
    shutil.copytree(common.ROOT / "bench", into / "bench", ignore=skip)
    if rev is None:
        shutil.copytree(common.ROOT / "tempest", into / "tempest", ignore=skip)
        dirty = subprocess.run(["git", "status", "--porcelain", "tempest"], cwd=common.ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        head = _short("HEAD")
        return f"{head}+changes" if dirty else head
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "tempest"],
                             cwd=common.ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return _short(rev)


def block_hiredis(into: Path) -> None:
    """Make ``import hiredis`` fail for runners importing from *into*."""
    (into / "hiredis").mkdir()
    (into / "hiredis" / "__init__.py").write_text(
        'raise ImportError("hiredis left out for this side of the A/B")\n')


def _short(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()


METRICS = {"rate": "drain", "enqueue_rate": "enqueue"}
"""What a drain's result reports, and the name its rows get."""


def summarize(runs: list[dict[str, Any]], labels: tuple[str, str]) -> list[dict[str, Any]]:
    """Per contender, body and metric: each side's median, and head/base per round."""
    rows = []
    base, head = labels
    keys = sorted({(r["contender"], r["body"], m) for r in runs for m in METRICS})
    for contender, body, metric in keys:
        by_round: dict[int, dict[str, float]] = {}
        for r in runs:
            if (r["contender"] == contender and r["body"] == body and r.get("ok")
                    and r.get(metric)):
                by_round.setdefault(r["round"], {})[r["side"]] = r[metric]
        pairs = [v for v in by_round.values() if len(v) == 2]
        if not pairs:
            rows.append({"contender": contender, "body": body, "metric": METRICS[metric],
                         "error": "no complete pair"})
            continue
        medians = {side: statistics.median(p[side] for p in pairs) for side in labels}
        ratios = [p[head] / p[base] for p in pairs]
        rows.append({"contender": contender, "body": body, "metric": METRICS[metric],
                     "pairs": len(pairs),
                     "median": medians, "ratio": medians[head] / medians[base],
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "ratio_median": statistics.median(ratios)})
    return rows


def table(rows: list[dict[str, Any]], labels: tuple[str, str]) -> str:
    """The rows as a Markdown table."""
    base, head = labels
    out = [f"| contender | body | rate | {base} /s | {head} /s | {head}/{base} "
           "(per-round min-max) |", "|---|---|---|---:|---:|---|"]
    for row in rows:
        first = f"| {row['contender']} | {row['body']} | {row['metric']} |"
        if "error" in row:
            out.append(f"{first} | | {row['error']} |")
            continue
        out.append(f"{first} {row['median'][base]:.0f} | "
                   f"{row['median'][head]:.0f} | {row['ratio']:.3f} "
                   f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f}, {row['pairs']} rounds) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("base", help="git revision to compare against")
    parser.add_argument("--head", help="git revision (default: the working tree)")
    parser.add_argument("--only", nargs="+", default=list(TEMPEST_KEYS), choices=TEMPEST_KEYS,
                        metavar="KEY", help="contenders (default: all four of tempest's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--noop-n", type=int, default=10_000)
    parser.add_argument("--sleep-n", type=int, default=2000)
    parser.add_argument("--sleep1-n", type=int, default=10_000)
    parser.add_argument("--bodies", nargs="+", default=["noop", "sleep"],
                        choices=["noop", *common.SLEEPS])
    parser.add_argument("--without-hiredis", action="store_true",
                        help="the head side runs without hiredis (see the module docstring)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)

    config = dict(harness.MODES["default"], threads=common.THREADS, mode="ab",
                  rounds=args.rounds)
    bench = harness.Harness("ab", config, args.only, args.out)
    for key, reason in bench.skipped.items():
        bench.log(f"SKIPPED {key}: {reason}")
    sides = {}
    for name, rev in (("base", args.base), ("head", args.head)):
        path = bench.tmp / "code" / name
        label = export(rev, path)
        if args.without_hiredis:
            label += "-hiredis" if name == "base" else "-pyparser"
            if name == "head":
                block_hiredis(path)
        sides[label] = path
    labels: tuple[str, str] = tuple(sides)  # type: ignore[assignment]
    if labels[0] == labels[1]:
        parser.error(f"base and head are the same code ({labels[0]})")
    meta = report.machine(command=" ".join(["python -m bench.ab",
                                            *(argv if argv is not None else sys.argv[1:])]))
    bench.log(f"A/B {labels[0]} vs {labels[1]}: {[c.key for c in bench.contenders]}, "
              f"{args.rounds} rounds, no-op n={args.noop_n}, sleep n={args.sleep_n}")
    runs: list[dict[str, Any]] = []
    began = time.time()
    try:
        for round_no in range(args.rounds):
            order = list(labels) if round_no % 2 == 0 else list(reversed(labels))
            for body in args.bodies:
                n = {"noop": args.noop_n, "sleep": args.sleep_n, "sleep1": args.sleep1_n}[body]
                limit = 60 + n / 10 + n * common.SLEEPS.get(body, 0)
                for contender in bench.contenders:
                    for side in order:
                        spec = bench.spec(contender, "drain", n=n, body=body, timeout=limit)
                        result = bench.run_one(spec, limit * 2 + 60, code=sides[side])
                        result.update(side=side, body=body, round=round_no)
                        runs.append(result)
                        state = (f"{result['rate']:9.0f} tasks/s" if result.get("ok")
                                 else f"FAILED: {harness._first_line(result)}")
                        bench.log(f"round {round_no + 1} {body:5} {contender.key:17} "
                                  f"{side:16} {state}")
    except KeyboardInterrupt:
        bench.log("interrupted: writing what was measured")
    finally:
        bench.cleanup()
    meta.update(duration_s=round(time.time() - began, 1), load_after=os.getloadavg())
    rows = summarize(runs, labels)
    data = {"meta": meta, "base": labels[0], "head": labels[1],
            "config": {"rounds": args.rounds, "noop_n": args.noop_n, "sleep_n": args.sleep_n,
                       "sleep1_n": args.sleep1_n,
                       "threads": common.THREADS},
            "summary": rows, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-{time.strftime('%Y-%m-%d')}-{labels[0]}-{labels[1]}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print()
    print(table(rows, labels))
    print(f"\nwrote {path}")
    return 0 if any(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
