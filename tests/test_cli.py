"""The ``tempest`` command line, run as a real process: exit codes and error lines.

Modules under test live in tests/scripts (``cli_*.py``); the processes run
there, so importing them proves the current directory is on the import path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tempest import __version__

from .test_signals import SCRIPTS, clean_env

pytestmark = pytest.mark.timeout(30)


def tempest(*args: str, cwd: Path = SCRIPTS, command: list[str] | None = None,
            timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tempest ARGS`` (or *command* ARGS) to its end."""
    command = command or [sys.executable, "-m", "tempest"]
    return subprocess.run([*command, *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a user error (no traceback, nothing else)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tempest: error: "), lines[0]
    return lines[0]


def test_help_shows_usage_flags_and_exit_codes():
    """`tempest --help` and `tempest run --help` exit 0 and document flags and exit codes."""
    top, run = tempest("--help"), tempest("run", "--help")
    assert top.returncode == 0 and run.returncode == 0
    assert "run" in top.stdout and "exit codes:" in top.stdout
    for flag in ("MODULE:ENGINE", "--threads N", "--burst", "--log-dir DIR",
                 "--log-level LEVEL", "exit codes:"):
        assert flag in run.stdout
    for code in ("0", "1", "2", "3", "4", "5", "130"):
        assert re.search(rf"^  {code} +\S", run.stdout, re.MULTILINE), code


def test_version():
    """`tempest --version` prints the version."""
    result = tempest("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tempest {__version__}"


@pytest.mark.parametrize("args", [
    [],
    ["run"],
    ["run", "cli_app"],
    ["run", "cli_app:CliEngine", "--threads", "many"],
    ["run", "cli_app:CliEngine", "--bogus"],
    ["launch", "cli_app:CliEngine"],
])
def test_bad_arguments_exit_2_with_one_line(args):
    """Bad arguments: exit 2 and one `tempest: error:` line pointing at --help."""
    result = tempest(*args)
    assert result.returncode == 2
    assert "--help" in one_error_line(result)


def test_missing_module_exits_3():
    """A module that cannot be found: exit 3 and one line naming it."""
    result = tempest("run", "nosuch:Engine")
    assert result.returncode == 3
    assert one_error_line(result) == (
        "tempest: error: cannot import 'nosuch': No module named 'nosuch'")


def test_module_without_the_attribute_exits_3():
    """A module without the named attribute: exit 3, and the engines it does have."""
    result = tempest("run", "cli_app:Nope")
    assert result.returncode == 3
    assert one_error_line(result) == ("tempest: error: module 'cli_app' has no attribute "
                                      "'Nope'; engines in it: CliEngine")


def test_attribute_that_is_not_an_engine_exits_3():
    """An attribute that is not an Engine subclass (here a Task): exit 3."""
    result = tempest("run", "cli_app:CliAdder")
    assert result.returncode == 3
    assert "'cli_app:CliAdder' is the class CliAdder, not an Engine subclass" in (
        one_error_line(result))


def test_module_failing_at_import_exits_3_with_where():
    """A module whose own code raises at import: exit 3, one line with the file and line."""
    result = tempest("run", "cli_broken:CliBrokenEngine")
    assert result.returncode == 3
    line = one_error_line(result)
    assert "cannot import 'cli_broken': ZeroDivisionError: division by zero" in line
    assert re.search(r"cli_broken\.py, line \d+\)$", line)


def test_module_that_runs_its_engine_at_import_exits_3(tmp_path):
    """A module that runs the engine itself at import: exit 3 with the fix, no second run."""
    shutil.copy(SCRIPTS / "cli_selfrun.py", tmp_path)  # its own run logs in the cwd
    result = tempest("run", "cli_selfrun:CliSelfRunEngine", cwd=tmp_path)
    assert result.returncode == 3
    assert "if __name__ == '__main__':" in one_error_line(result)
    assert (tmp_path / "CliSelfRunEngine.log").read_text(encoding="utf-8").count(
        " starting ") == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--threads", "0"], "--threads: must be a whole number of at least 1, not 0"),
    (["--coroutines", "0"], "--coroutines: must be a whole number of at least 1, not 0"),
    (["--log-level", "LOUD"], ("--log-level: must be one of DEBUG, INFO, WARNING, ERROR, "
                               "not 'LOUD'")),
])
def test_bad_flag_values_exit_4(tmp_path, flags, message):
    """A flag value its option rejects (--threads 0, --log-level LOUD): exit 4, one line."""
    result = tempest("run", "cli_app:CliEngine", "--burst", "--log-dir", str(tmp_path),
                     *flags)
    assert result.returncode == 4
    assert one_error_line(result) == f"tempest: error: {message}"
    assert not list(tmp_path.iterdir())  # the engine never started


def test_log_dir_that_cannot_be_created_exits_4(tmp_path):
    """A --log-dir that cannot be created: exit 4, one line."""
    (tmp_path / "file").write_text("")
    result = tempest("run", "cli_app:CliEngine", "--burst",
                     "--log-dir", str(tmp_path / "file" / "logs"))
    assert result.returncode == 4
    assert re.fullmatch(r"tempest: error: --log-dir: cannot create '.*logs': Not a directory",
                        one_error_line(result))


def test_bad_configure_block_at_import_exits_4():
    """A configure block that fails validation at import is a configuration error: exit 4."""
    result = tempest("run", "cli_badconfig:CliBadEngine")
    assert result.returncode == 4
    assert one_error_line(result) == ("tempest: error: CliBadEngine.configure has no option "
                                      "'thread'; did you mean 'threads'?")


def test_burst_processes_everything_and_exits_0(tmp_path):
    """--burst runs the 20 tasks submitted at import and exits 0; logs go to --log-dir."""
    result = tempest("run", "cli_app:CliEngine", "--burst", "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
    main = (tmp_path / "logs" / "CliEngine.log").read_text(encoding="utf-8")
    assert (tmp_path / "logs" / "CliEngine.task.log").exists()
    for i in range(20):
        assert main.count(f"task_id=cli{i:02d} task=CliAdder outcome=success") == 1
    assert re.search(r"stopped engine=CliEngine reason=drained processed=20 ", main)
    assert not list(SCRIPTS.glob("*.log"))


def test_threads_and_log_level_flags_take_effect(tmp_path):
    """--threads and --log-level override the configure block (see the `starting` line)."""
    result = tempest("run", "cli_app:CliEngine", "--burst", "--log-dir", str(tmp_path),
                     "--threads", "3", "--coroutines", "7", "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    main = (tmp_path / "CliEngine.log").read_text(encoding="utf-8")
    starting = re.search(r"^.* starting .*$", main, re.MULTILINE)
    assert starting and " threads=3 coroutines=7 " in starting.group(0)
    assert " log_level=DEBUG" in starting.group(0)
    tasks = (tmp_path / "CliEngine.task.log").read_text(encoding="utf-8")
    assert re.search(r"^cli00 \S+ DEBUG +started task=CliAdder", tasks, re.MULTILINE)


def test_too_many_abandoned_threads_exits_5(tmp_path):
    """Past max_abandoned the engine stops and the command exits 5 with one line."""
    result = tempest("run", "cli_abandon:CliAbandonEngine", "--burst",
                     "--log-dir", str(tmp_path))
    assert result.returncode == 5
    assert one_error_line(result).startswith(
        "tempest: error: too many abandoned threads: 1 task threads ignored their timeout")


def test_unexpected_error_exits_1_with_a_traceback(tmp_path):
    """An unexpected error (here a failing before_initialize hook) exits 1 with its traceback."""
    result = tempest("run", "cli_hook:CliHookEngine", "--log-dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: the hook failed" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("tempest: error: unexpected RuntimeError")


def test_console_script_and_python_dash_m_behave_the_same(tmp_path):
    """The `tempest` script and `python -m tempest` give the same results."""
    script = shutil.which("tempest", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the tempest console script is not installed (pip install -e .)")
    for args in (["run", "nosuch:Engine"], ["run", "cli_app:CliEngine", "--threads", "0"],
                 ["--version"]):
        via_script, via_module = tempest(*args, command=[script]), tempest(*args)
        assert (via_script.returncode, via_script.stdout, via_script.stderr) == (
            via_module.returncode, via_module.stdout, via_module.stderr)
    # The script (unlike python -m) does not put the current directory on sys.path itself.
    result = tempest("run", "cli_app:CliEngine", "--burst", "--log-dir", str(tmp_path),
                     command=[script])
    assert result.returncode == 0, result.stderr
    assert "processed=20" in (tmp_path / "CliEngine.log").read_text(encoding="utf-8")
