"""The ``tempest`` command: run an engine, or look after its failed tasks.

::

    tempest run MODULE:ENGINE [--threads N] [--coroutines N] [--burst]
                              [--log-dir DIR] [--log-level LEVEL]
    tempest failed list|show|retry|delete MODULE:ENGINE ...   (see tempest.cli_failed)
    tempest web MODULE:ENGINE [--host 127.0.0.1] [--port 8100]
                              [--auth USER:PASSWORD] [--read-only]
                              [--allowed-host NAME ...]
    python -m tempest run ...          # the same

``MODULE`` is imported with the current directory first on the import path;
``ENGINE`` names an :class:`~tempest.Engine` subclass in it (``pkg.mod:Outer.Engine``
works too). The flags override the engine's configure block for this run and
are checked like it. The engine then runs in the main thread exactly as
``ENGINE.run()`` would: SIGTERM/SIGINT stop it gracefully, SIGHUP reopens its
log files, and under systemd it speaks the notify protocol.

A user's mistake (a bad flag, a module that cannot be imported, a configure
block that does not validate) ends with exactly one line on stderr, starting
with ``tempest: error:``, and the exit code below; only an unexpected error (a
bug) prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from tempest import __version__, cli_failed
from tempest.config import LOG_LEVELS
from tempest.engine import Engine
from tempest.exceptions import ConfigurationError, TooManyAbandoned, Unsupported
from tempest.logs import log_path

__all__ = [
    "EXIT_ABANDONED",
    "EXIT_CONFIG",
    "EXIT_IMPORT",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_IMPORT = 3
EXIT_CONFIG = 4
EXIT_ABANDONED = 5
EXIT_NOT_FOUND = cli_failed.EXIT_NOT_FOUND
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
exit codes:
  0    stopped gracefully (SIGTERM, SIGINT), or --burst drained the queue
  1    unexpected error: a bug, printed with its traceback
  2    bad arguments
  3    MODULE cannot be imported, or ENGINE is missing or not an Engine subclass
  4    configuration error: a configure block, --threads, --log-level, --log-dir;
       or (failed) the engine's queue keeps no failed tasks; or (web) the web
       extra is missing, or --host/--port cannot be listened on
  5    too many abandoned threads (max_abandoned): restart for a clean process
  6    (failed show, retry, delete) a task id that the failed store does not hold
  130  interrupted (Ctrl-C) before the engine was running
"""

RUN_DESCRIPTION = """\
Import MODULE (the current directory comes first on the import path) and run
its Engine subclass ENGINE in the foreground, as ENGINE.run() would.

SIGTERM or SIGINT stop it gracefully: nothing new is dequeued and running tasks
get shutdown_timeout seconds; a second SIGINT stops at once. A task still
running then is logged as interrupted and not acknowledged, so a reliable queue
delivers it again. SIGHUP reopens both log files (logrotate). Under systemd
(NOTIFY_SOCKET) it sends READY=1, STATUS=, WATCHDOG=1 and STOPPING=1.
"""

WEB_DESCRIPTION = """\
Import MODULE like 'run' does and serve the web dashboard of its Engine
subclass ENGINE: its queue's engines, depths, messages, failed tasks (with
retry and delete buttons), rejected messages and periodic schedules, live.
It runs no engine: it reads the queue that the engines share.

It listens on 127.0.0.1 unless --host says otherwise; a --host reachable from
other machines needs --auth (or TEMPEST_WEB_AUTH=user:password). Stop it with
SIGTERM or Ctrl-C. Needs the web extra: pip install 'task-tempest[web]'.
"""

AUTH_ENV = "TEMPEST_WEB_AUTH"


class _Failure(Exception):
    """A user's mistake: one line on stderr and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported in one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"tempest: error: {_one_line(message)} "
                              f"(see '{self.prog} --help')\n")


def _target(value: str) -> tuple[str, str]:
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr or module.startswith("."):
        raise argparse.ArgumentTypeError(
            f"expected MODULE:ENGINE, such as myapp.tasks:MathTempest, not {value!r}")
    return module, attr


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``tempest`` command."""
    parser = _Parser(
        prog="tempest",
        description="tempest: an embeddable thread-pool task engine.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tempest {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run", help="run an engine until SIGTERM/SIGINT (or, with --burst, until drained)",
        description=RUN_DESCRIPTION, epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("target", metavar="MODULE:ENGINE", type=_target,
                     help="the module to import and the Engine subclass in it, "
                          "e.g. myapp.tasks:MathTempest")
    run.add_argument("--threads", metavar="N", type=int,
                     help="worker threads (overrides configure.threads)")
    run.add_argument("--coroutines", metavar="N", type=int,
                     help="async def tasks running at once (overrides configure.coroutines)")
    run.add_argument("--burst", action="store_true",
                     help="stop once the queue is empty and no task runs")
    run.add_argument("--log-dir", metavar="DIR",
                     help="folder for both log files, created if missing "
                          "(overrides configure.log_dir)")
    run.add_argument("--log-level", metavar="LEVEL",
                     help=f"one of {', '.join(LOG_LEVELS)} (overrides configure.log_level)")
    cli_failed.add_parsers(commands, _target, EXIT_CODES)
    web = commands.add_parser(
        "web", help="serve the web dashboard of an engine's queue",
        description=WEB_DESCRIPTION, epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    web.add_argument("target", metavar="MODULE:ENGINE", type=_target,
                     help="the module to import and the Engine subclass in it")
    web.add_argument("--host", default="127.0.0.1",
                     help="the address to listen on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=_port, default=8100, help="the port (default 8100)")
    web.add_argument("--auth", metavar="USER:PASSWORD",
                     help=f"require HTTP Basic auth with these (or set {AUTH_ENV})")
    web.add_argument("--read-only", action="store_true",
                     help="show everything, change nothing: no retry or delete")
    web.add_argument("--allowed-host", action="append", metavar="NAME", default=None,
                     help="a Host name the dashboard answers besides loopback ones (a "
                          "proxy's public name); repeat for more")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see ``tempest --help``)."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except _Failure as failure:
        return _fail(failure.code, str(failure))
    except (ConfigurationError, Unsupported) as exc:
        return _fail(EXIT_CONFIG, str(exc))
    except TooManyAbandoned as exc:
        return _fail(EXIT_ABANDONED, f"too many abandoned threads: {exc}")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:  # noqa: BLE001 - a bug: say so, with its traceback
        traceback.print_exc()
        return _fail(EXIT_UNEXPECTED, f"unexpected {type(exc).__name__} (a bug?); "
                                      f"the traceback is above")


def _failed(args: argparse.Namespace) -> int:
    code, line = cli_failed.run(_load_engine(*args.target), args)
    return _fail(code, line) if line else code


def _run(args: argparse.Namespace) -> int:
    module_name, attr = args.target
    engine = _load_engine(module_name, attr)
    overrides = _overrides(engine, args)
    _check_log_dir(overrides.get("log_dir", engine._options["log_dir"]), engine._options["name"],
                   "--log-dir" if "log_dir" in overrides else f"{attr}.configure.log_dir")
    engine._run(burst=args.burst, overrides=overrides or None)
    return EXIT_OK


def _web(args: argparse.Namespace) -> int:
    from tempest.web._checks import is_loopback, parse_auth  # noqa: PLC0415 - web only

    auth = args.auth if args.auth is not None else os.environ.get(AUTH_ENV) or None
    if auth is not None:
        try:
            parse_auth(auth)
        except ValueError as exc:
            source = "--auth" if args.auth is not None else AUTH_ENV
            raise _Failure(EXIT_USAGE, f"{source}: {exc}") from None
    if auth is None and not is_loopback(args.host):
        raise _Failure(EXIT_USAGE, f"--host {args.host} lets other machines in: give "
                                   f"--auth user:password (or set {AUTH_ENV}) to serve "
                                   f"the dashboard there, or leave --host at 127.0.0.1")
    engine = _load_engine(*args.target)
    from tempest.web import dashboard  # noqa: PLC0415 - the extra may be missing

    try:
        app = dashboard(engine, read_only=args.read_only, auth=auth,
                        allowed_hosts=args.allowed_host)
    except (TypeError, ValueError) as exc:
        raise _Failure(EXIT_USAGE, f"--allowed-host: {exc}") from None
    try:
        import uvicorn  # noqa: PLC0415 - the extra may be missing
    except ImportError:
        raise _Failure(EXIT_CONFIG, "tempest web needs uvicorn, of the web extra: "
                                    "pip install 'task-tempest[web]'") from None
    listener = _listen(args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tempest web: the {engine.__name__} dashboard on http://{host}:"
          f"{listener.getsockname()[1]}/{' (read-only)' if args.read_only else ''}",
          flush=True)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again
    # for the handler it found: with these in place that ends in exit code 0,
    # as for 'tempest run', rather than in death by the signal.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _ignore(signum: int, frame: object) -> None:
    """A signal handler that does nothing (see _web)."""


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on *host*:*port*, or a one-line failure."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
    except OSError as exc:
        raise _Failure(EXIT_CONFIG, f"cannot listen on {host}:{port}: "
                                    f"{exc.strerror or exc}") from None
    return listener


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, not {value!r}")
    return port


_COMMANDS = {"run": _run, "failed": _failed, "web": _web}


# -- finding the engine ----------------------------------------------------------------


def _load_engine(module_name: str, attr: str) -> type[Engine]:
    module = _import(module_name)
    target = f"{module_name}:{attr}"
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            engines = sorted(name for name, value in vars(module).items()
                             if _is_engine(value))
            hint = f"; engines in it: {', '.join(engines)}" if engines else ""
            raise _Failure(EXIT_IMPORT, f"module {module_name!r} has no attribute "
                                        f"{attr!r}{hint}") from None
    if not _is_engine(obj):
        what = f"the class {obj.__qualname__}" if isinstance(obj, type) else (
            f"a {type(obj).__name__} object")
        raise _Failure(EXIT_IMPORT, f"{target!r} is {what}, not an Engine subclass")
    engine: type[Engine] = obj
    state = engine._state
    if state.control is not None or state.last is not None:
        raise _Failure(EXIT_IMPORT, f"{target!r} already ran while {module_name!r} was "
                                    f"imported; guard its run() or start() with "
                                    f"if __name__ == '__main__':")
    return engine


def _is_engine(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, Engine) and value is not Engine


def _import(module_name: str) -> Any:
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ConfigurationError:
        raise  # a configure block that does not validate: EXIT_CONFIG
    except ImportError as exc:
        hint = ""
        if module_name.endswith(".py") and getattr(exc, "name", None) == module_name:
            hint = f" (give a module name, such as {module_name[:-3]!r}, not a file name)"
        raise _Failure(EXIT_IMPORT, f"cannot import {module_name!r}: {exc}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - the module's own code failed
        where = ""
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and not isinstance(exc, SyntaxError):  # a SyntaxError says where itself
            where = f" (at {frames[-1].filename}, line {frames[-1].lineno})"
        raise _Failure(EXIT_IMPORT, f"cannot import {module_name!r}: "
                                    f"{type(exc).__name__}: {exc}{where}") from None


# -- the flags ---------------------------------------------------------------------------


def _overrides(engine: type[Engine], args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as configure options, each checked like its option."""
    overrides: dict[str, Any] = {}
    for flag in ("threads", "coroutines"):
        value = getattr(args, flag)
        if value is not None:
            try:
                overrides[flag] = engine._OPTIONS[flag].validate(value)
            except ConfigurationError as exc:
                raise _Failure(EXIT_CONFIG, f"--{flag}: {exc}") from None
    if args.log_level is not None:
        if args.log_level.upper() not in LOG_LEVELS:
            raise _Failure(EXIT_CONFIG, f"--log-level: must be one of "
                                        f"{', '.join(LOG_LEVELS)}, not {args.log_level!r}")
        overrides["log_level"] = args.log_level.upper()
    if args.log_dir is not None:
        overrides["log_dir"] = args.log_dir
    return overrides


def _check_log_dir(log_dir: Any, name: str, source: str) -> None:
    """Create the log folder now, so that a bad one is a one-line error."""
    if callable(log_dir):
        return  # evaluated by the engine at start-up
    path = Path(os.fspath(log_dir))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Failure(EXIT_CONFIG, f"{source}: cannot create {str(path)!r}: "
                                    f"{exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK) and not all(
            os.access(file, os.W_OK) for file in log_path(path, name)):  # made by the admin
        raise _Failure(EXIT_CONFIG, f"{source}: cannot write in {str(path)!r}")


# -- output ------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(code: int, message: str) -> int:
    print(f"tempest: error: {_one_line(message)}", file=sys.stderr)
    return code
