"""The Engine's ``class configure:`` block: options, defaults, validation, inheritance, hooks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import tempest
from tempest import ConfigurationError, Engine, Task, TempestError
from tempest.queues import MemoryQueue

from .conftest import main_log, wait_for

# -- tasks used here (names unique across the suite) ---------------------------------


class CfgAdder(Task):
    def process(self, a, b):
        return a + b


class CfgBoom(Task):
    def process(self):
        raise ValueError("cfg boom")


class CfgSlow(Task):
    def process(self, seconds):
        # Short waits, so the engine's TaskTimeout is delivered promptly.
        done = threading.Event()
        for _ in range(int(seconds / 0.01)):
            if done.wait(0.01):
                break


def make_class(class_name: str = "CfgEngine", base: type = Engine, **options):
    """An engine class built from *options* as its configure block."""
    return type(class_name, (base,), {"configure": type("configure", (), options)})


# -- defaults --------------------------------------------------------------------------

EXPECTED_DEFAULTS = {
    "threads": 10,
    "coroutines": 100,
    "loop_block_warning": 0.1,
    "prefetch": 0,
    "timeout": None,
    "log_dir": ".",
    "log_level": "INFO",
    "log_format": "text",
    "shutdown_timeout": 30,
    "report_every": 60,
    "announce_every": 5.0,
    "metrics_port": None,
    "metrics_host": "127.0.0.1",
    "max_abandoned": 10,
    "before_initialize": None,
    "after_initialize": None,
    "after_success": None,
    "after_failure": None,
    "after_timeout": None,
    "periodic": (),
    "after_retry": None,
    "retries": 0,
    "retry_on": None,
    "retry_delay": 1.0,
    "retry_max_delay": 3600.0,
    "failed_max": 10_000,
    "failed_ttl": 30 * 86400.0,
    "result_ttl": 86400.0,
}


def test_bare_subclass_has_every_documented_default():
    """A subclass without a configure block gets each option's documented default."""

    class CfgBareEngine(Engine):
        pass

    options = CfgBareEngine._options
    for option, default in EXPECTED_DEFAULTS.items():
        assert options[option] == default, option
    assert options["name"] == "CfgBareEngine"
    assert isinstance(options["queue"], MemoryQueue)
    assert set(options) == set(EXPECTED_DEFAULTS) | {"name", "queue"}


def test_empty_configure_block_gives_defaults():
    """An empty configure block (just a docstring) is accepted and leaves the defaults."""

    class CfgEmptyBlockEngine(Engine):
        class configure:
            """Nothing configured here."""

    for option, default in EXPECTED_DEFAULTS.items():
        assert CfgEmptyBlockEngine._options[option] == default, option


def test_stats_before_start_shows_configured_threads_and_queue():
    """stats() before any run reports zero counters, the threads option and the queue length."""
    engine = make_class(threads=3)
    engine.submit(CfgAdder, 1, 2)
    stats = engine.stats()
    assert stats["threads"] == 3
    assert stats["queued"] == 1
    for key in ("processed", "succeeded", "failed", "timed_out", "running", "abandoned"):
        assert stats[key] == 0, key
    assert stats["uptime"] == 0


def test_configured_values_are_kept():
    """Valid values for every option are accepted and kept (levels normalised to upper case)."""
    queue = MemoryQueue()

    def hook(_engine):
        return None

    engine = make_class(
        name="cfg-custom", threads=1, queue=queue, timeout=2, log_dir="/tmp/x",
        log_level="debug", log_format="json", shutdown_timeout=0, report_every=0.5,
        max_abandoned=0, before_initialize=hook, after_initialize=hook,
        after_success=hook, after_failure=hook, after_timeout=hook,
    )
    opts = engine._options
    assert opts["name"] == "cfg-custom"
    assert opts["threads"] == 1
    assert opts["queue"] is queue
    assert opts["timeout"] == 2.0
    assert opts["log_dir"] == "/tmp/x"
    assert opts["log_level"] == "DEBUG"
    assert opts["log_format"] == "json"
    assert opts["shutdown_timeout"] == 0
    assert opts["report_every"] == 0.5
    assert opts["max_abandoned"] == 0
    for cb in ("before_initialize", "after_initialize", "after_success", "after_failure",
               "after_timeout"):
        assert opts[cb] is hook


@pytest.mark.parametrize("level", ["debug", "info", "Warning", "ERROR"])
def test_log_level_accepts_any_case(level):
    """log_level is accepted in any letter case."""
    assert make_class(log_level=level)._options["log_level"] == level.upper()


def test_log_dir_accepts_pathlike(tmp_path):
    """log_dir may be a pathlib.Path."""
    assert make_class(log_dir=tmp_path)._options["log_dir"] == tmp_path


# -- unknown options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("thread", "threads"),
        ("time_out", "timeout"),
        ("log_levle", "log_level"),
        ("logformat", "log_format"),
        ("shutdown_timout", "shutdown_timeout"),
        ("report_evry", "report_every"),
        ("max_abandonned", "max_abandoned"),
        ("before_initialise", "before_initialize"),
        ("after_sucess", "after_success"),
        ("queues", "queue"),
    ],
)
def test_unknown_option_names_it_and_the_closest_valid_one(typo, suggestion):
    """A mistyped option fails at class creation, naming it and the closest valid option."""
    with pytest.raises(ConfigurationError) as info:
        make_class("CfgTypoEngine", **{typo: 1})
    message = str(info.value)
    assert repr(typo) in message
    assert repr(suggestion) in message
    assert "CfgTypoEngine" in message


def test_unknown_option_far_from_any_lists_the_valid_ones():
    """An option resembling none of the valid ones is reported with the list of valid options."""
    with pytest.raises(ConfigurationError) as info:
        make_class(zzzqqq=1)
    message = str(info.value)
    assert "'zzzqqq'" in message
    assert "threads" in message and "log_format" in message


def test_unknown_option_in_class_statement_fails_at_definition():
    """The error is raised by the class statement itself, at import time."""
    with pytest.raises(ConfigurationError, match="'threads'"):

        class CfgTypoStatementEngine(Engine):
            class configure:
                thread = 2


def test_configuration_error_is_a_tempest_error():
    """ConfigurationError derives from TempestError, exported from tempest."""
    assert issubclass(tempest.ConfigurationError, TempestError)
    assert issubclass(TempestError, Exception)


def test_configure_must_be_a_class():
    """A configure that is not a nested class (e.g. a dict) is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="nested class"):
        type("CfgDictEngine", (Engine,), {"configure": {"threads": 2}})


# -- wrong values ----------------------------------------------------------------------


def _not_callable_hook():
    return "not callable"


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("threads", 0, "at least 1"),
        ("threads", -3, "at least 1"),
        ("threads", 1.5, "whole number"),
        ("threads", True, "whole number"),
        ("threads", "2", "whole number"),
        ("timeout", -1, "positive number of seconds or None"),
        ("timeout", 0, "positive number of seconds or None"),
        ("timeout", "1", "positive number of seconds or None"),
        ("timeout", float("nan"), "positive number of seconds or None"),
        ("timeout", True, "positive number of seconds or None"),
        ("log_level", "LOUD", "'DEBUG'"),
        ("log_level", 10, "'INFO'"),
        ("log_format", "xml", "'text'"),
        ("log_format", None, "'json'"),
        ("log_dir", 5, "folder path"),
        ("shutdown_timeout", -1, "at least 0"),
        ("shutdown_timeout", None, "at least 0"),
        ("shutdown_timeout", "30", "at least 0"),
        ("report_every", 0, "positive number of seconds or None"),
        ("report_every", -5, "positive number of seconds or None"),
        ("announce_every", 0, "positive number of seconds or None"),
        ("announce_every", -1.5, "positive number of seconds or None"),
        ("announce_every", "5", "positive number of seconds or None"),
        ("announce_every", float("inf"), "positive number of seconds or None"),
        ("metrics_port", -1, "TCP port number"),
        ("metrics_port", 65536, "TCP port number"),
        ("metrics_port", "9100", "TCP port number"),
        ("metrics_port", True, "TCP port number"),
        ("metrics_port", 9100.0, "TCP port number"),
        ("metrics_host", "", "host name or IP address"),
        ("metrics_host", None, "host name or IP address"),
        ("metrics_host", "local host", "host name or IP address"),
        ("max_abandoned", -1, "at least 0"),
        ("max_abandoned", 2.5, "whole number"),
        ("queue", object(), "enqueue"),
        ("queue", MemoryQueue, "parentheses"),
        ("queue", [], "enqueue"),
        ("before_initialize", 42, "callable"),
        ("after_initialize", "hook", "callable"),
        ("after_success", 1, "callable"),
        ("after_failure", _not_callable_hook(), "callable"),
        ("after_timeout", object(), "callable"),
        ("name", "a/b", "path separator"),
        ("name", "", "non-empty string"),
        ("name", 5, "non-empty string"),
    ],
)
def test_wrong_value_says_what_is_allowed(option, value, allowed):
    """A value of the wrong type or range fails at class creation, naming option and rule."""
    with pytest.raises(ConfigurationError) as info:
        make_class("CfgBadValueEngine", **{option: value})
    message = str(info.value)
    assert f"configure.{option}" in message
    assert allowed in message


# -- behaviour of options --------------------------------------------------------------


def test_threads_option_sets_the_worker_count(make_engine):
    """A started engine runs exactly `threads` worker threads."""
    engine = make_engine(threads=3)
    engine.start()
    name = engine._options["name"]

    def workers():
        return [t for t in threading.enumerate() if t.name == f"tempest-worker:{name}"]

    wait_for(lambda: len(workers()) >= 3, 5)
    assert len(workers()) == 3
    assert engine.stats()["threads"] == 3
    assert engine.stop(timeout=10)


def test_name_option_names_the_log_files(make_engine, tmp_path):
    """The name option is used for the two log files' names and in the start-up line."""
    engine = make_engine(name="cfg-named")
    engine.submit(CfgAdder, 1, 1)
    engine.run(burst=True)
    assert (tmp_path / "cfg-named.log").exists()
    assert (tmp_path / "cfg-named.task.log").exists()
    assert "engine=cfg-named" in main_log(engine)


def test_default_log_dir_is_the_current_directory(tmp_path, monkeypatch):
    """Without log_dir the logs are written in the current directory, named after the class."""
    monkeypatch.chdir(tmp_path)

    class CfgCwdEngine(Engine):
        class configure:
            threads = 1
            report_every = None

    CfgCwdEngine.submit(CfgAdder, 2, 3)
    CfgCwdEngine.run(burst=True)
    assert CfgCwdEngine.stats()["succeeded"] == 1
    assert (tmp_path / "CfgCwdEngine.log").exists()
    assert (tmp_path / "CfgCwdEngine.task.log").exists()


def test_log_dir_is_created_if_missing(make_engine, tmp_path):
    """A log_dir that does not exist yet is created when the engine starts."""
    target = tmp_path / "deep" / "er" / "logs"
    engine = make_engine(log_dir=str(target))
    engine.run(burst=True)
    assert (target / f"{engine._options['name']}.log").exists()


def test_log_format_json_writes_one_object_per_line(make_engine):
    """log_format='json' makes every main-log line a JSON object."""
    engine = make_engine(log_format="json")
    task_id = engine.submit(CfgAdder, 1, 2)
    engine.run(burst=True)
    lines = [json.loads(line) for line in main_log(engine).splitlines()]
    outcomes = [obj for obj in lines if obj.get("task_id") == task_id]
    assert len(outcomes) == 1 and outcomes[0]["outcome"] == "success"


def test_log_level_warning_hides_info_outcomes_but_keeps_startup(make_engine):
    """With log_level WARNING, success lines are not written, start and stop lines are."""
    engine = make_engine(log_level="WARNING")
    ok_id = engine.submit(CfgAdder, 1, 2)
    bad_id = engine.submit(CfgBoom)
    engine.run(burst=True)
    log = main_log(engine)
    assert ok_id not in log
    assert f"task_id={bad_id}" in log and "outcome=failure" in log
    assert "starting" in log and "stopped" in log


def test_report_every_writes_stats_lines(make_engine):
    """report_every makes the main log carry periodic stats lines."""
    engine = make_engine(report_every=0.05)
    engine.start()
    wait_for(lambda: " stats " in main_log(engine), 5)
    assert engine.stop(timeout=10)


def test_report_every_none_writes_no_stats_lines(make_engine):
    """report_every=None never writes a stats line."""
    engine = make_engine(report_every=None)
    engine.submit(CfgAdder, 1, 1)
    engine.run(burst=True)
    assert " stats " not in main_log(engine)


def test_engine_timeout_applies_to_tasks_without_their_own(make_engine):
    """The engine's timeout option limits tasks that do not set one."""
    engine = make_engine(timeout=0.1)
    slow_id = engine.submit(CfgSlow, 5)
    engine.run(burst=True)
    assert engine.stats()["timed_out"] == 1
    assert f"task_id={slow_id} task=CfgSlow outcome=timeout" in main_log(engine)


def test_engine_callbacks_receive_task_and_result(make_engine):
    """after_success(task, result), after_failure(task, exc), after_timeout(task) are called."""
    calls = []
    engine = make_engine(
        timeout=0.1,
        after_success=lambda task, result: calls.append(("success", task.task_id, result)),
        after_failure=lambda task, exc: calls.append(("failure", task.task_id, exc)),
        after_timeout=lambda task: calls.append(("timeout", task.task_id)),
    )
    ok = engine.submit(CfgAdder, 2, 5)
    bad = engine.submit(CfgBoom)
    slow = engine.submit(CfgSlow, 5)
    engine.run(burst=True)
    assert ("success", ok, 7) in calls
    failure = [c for c in calls if c[0] == "failure"]
    assert len(failure) == 1 and failure[0][1] == bad
    assert isinstance(failure[0][2], ValueError)
    assert ("timeout", slow) in calls
    assert len(calls) == 3


# -- inheritance -----------------------------------------------------------------------


def test_subclass_inherits_and_overrides_the_parent_block():
    """A subclass starts from its parent's options and overrides the ones it names."""

    class CfgParentEngine(Engine):
        class configure:
            threads = 3
            timeout = 2
            log_level = "WARNING"

    class CfgChildEngine(CfgParentEngine):
        class configure:
            threads = 5

    class CfgGrandChildEngine(CfgChildEngine):
        pass

    assert CfgChildEngine._options["threads"] == 5
    assert CfgChildEngine._options["timeout"] == 2
    assert CfgChildEngine._options["log_level"] == "WARNING"
    assert CfgParentEngine._options["threads"] == 3
    assert CfgGrandChildEngine._options["threads"] == 5
    assert CfgGrandChildEngine._options["timeout"] == 2


def test_subclass_block_is_validated_too():
    """A typo in a subclass's block fails even when the parent's block is valid."""

    class CfgValidParentEngine(Engine):
        class configure:
            threads = 2

    with pytest.raises(ConfigurationError, match="'timeout'"):
        make_class("CfgTypoChild", base=CfgValidParentEngine, timout=3)


def test_name_is_not_inherited():
    """A subclass's name defaults to its own class name, not its parent's name option."""

    class CfgNamedParentEngine(Engine):
        class configure:
            name = "cfg-parent"

    class CfgUnnamedChildEngine(CfgNamedParentEngine):
        class configure:
            threads = 1

    class CfgNoBlockChildEngine(CfgNamedParentEngine):
        pass

    assert CfgNamedParentEngine._options["name"] == "cfg-parent"
    assert CfgUnnamedChildEngine._options["name"] == "CfgUnnamedChildEngine"
    assert CfgNoBlockChildEngine._options["name"] == "CfgNoBlockChildEngine"


def test_classes_without_queue_get_their_own_memory_queue():
    """Two engine classes that set no queue each get a distinct MemoryQueue."""

    class CfgOwnQueueA(Engine):
        pass

    class CfgOwnQueueB(Engine):
        class configure:
            threads = 1

    qa, qb = CfgOwnQueueA._options["queue"], CfgOwnQueueB._options["queue"]
    assert isinstance(qa, MemoryQueue) and isinstance(qb, MemoryQueue)
    assert qa is not qb
    CfgOwnQueueA.submit(CfgAdder, 1, 2)
    assert len(qa) == 1 and len(qb) == 0


def test_subclass_of_engine_with_own_queue_gets_another():
    """A subclass of an engine whose queue was its default MemoryQueue gets its own."""

    class CfgDefaultQueueParent(Engine):
        pass

    class CfgDefaultQueueChild(CfgDefaultQueueParent):
        pass

    parent_q = CfgDefaultQueueParent._options["queue"]
    child_q = CfgDefaultQueueChild._options["queue"]
    assert isinstance(child_q, MemoryQueue) and child_q is not parent_q


def test_subclass_shares_the_queue_its_parent_set():
    """A subclass of an engine that set a queue uses that very queue instance."""
    shared = MemoryQueue()

    class CfgSetQueueParent(Engine):
        class configure:
            queue = shared

    class CfgSetQueueChild(CfgSetQueueParent):
        class configure:
            threads = 1

    class CfgSetQueueGrandChild(CfgSetQueueChild):
        pass

    assert CfgSetQueueParent._options["queue"] is shared
    assert CfgSetQueueChild._options["queue"] is shared
    assert CfgSetQueueGrandChild._options["queue"] is shared
    CfgSetQueueChild.submit(CfgAdder, 1, 2)
    assert len(shared) == 1


def test_subclass_may_override_the_queue():
    """A subclass may set a different queue than its parent."""
    first, second = MemoryQueue(), MemoryQueue()
    parent = make_class("CfgQueueParent", queue=first)
    child = make_class("CfgQueueChild", base=parent, queue=second)
    assert parent._options["queue"] is first and child._options["queue"] is second


# -- callables and hooks ---------------------------------------------------------------


def test_callables_are_evaluated_at_start_after_before_initialize(make_engine, tmp_path):
    """log_dir and log_level callables run at start, after before_initialize, before after_."""
    order: list[str] = []
    target = tmp_path / "from-callable"

    def log_dir():
        order.append("log_dir")
        return str(target)

    def log_level():
        order.append("log_level")
        return "debug"

    engine = make_engine(
        log_dir=log_dir, log_level=log_level,
        before_initialize=lambda cls: order.append("before"),
        after_initialize=lambda cls: order.append("after"),
    )
    assert order == []  # nothing is evaluated when the class is created
    engine.submit(CfgAdder, 1, 2)
    engine.run(burst=True)
    assert order[0] == "before" and order[-1] == "after"
    assert sorted(order[1:3]) == ["log_dir", "log_level"]
    assert len(order) == 4
    log_file = target / f"{engine._options['name']}.log"
    assert log_file.exists()
    assert "log_level=DEBUG" in log_file.read_text(encoding="utf-8")


def test_log_dir_callable_is_evaluated_at_every_start(make_engine, tmp_path):
    """A callable log_dir is called again on each start, so it may pick a new folder."""
    dirs = iter([tmp_path / "one", tmp_path / "two"])
    engine = make_engine(log_dir=lambda: next(dirs))
    engine.run(burst=True)
    engine.run(burst=True)
    name = engine._options["name"]
    assert (tmp_path / "one" / f"{name}.log").exists()
    assert (tmp_path / "two" / f"{name}.log").exists()


def test_log_level_callable_returning_garbage_fails_at_start(make_engine):
    """A log_level callable that returns an invalid level makes run() raise ConfigurationError."""
    engine = make_engine(log_level=lambda: "LOUD")
    with pytest.raises(ConfigurationError, match="'DEBUG'"):
        engine.run(burst=True)


def test_initialize_hooks_receive_the_engine_class(make_engine):
    """before_initialize and after_initialize are called with the engine class."""
    seen = []
    engine = make_engine(before_initialize=lambda cls: seen.append(("before", cls)),
                         after_initialize=lambda cls: seen.append(("after", cls)))
    engine.run(burst=True)
    assert seen == [("before", engine), ("after", engine)]


def test_hooks_defined_as_functions_in_the_block(tmp_path):
    """Hooks written as plain `def`s inside the configure block are called with the class."""
    seen = []

    class CfgDefHooksEngine(Engine):
        class configure:
            threads = 1
            report_every = None
            log_dir = str(tmp_path)

            def before_initialize(engine):
                seen.append(("before", engine))

            @staticmethod
            def after_initialize(engine):
                seen.append(("after", engine))

    CfgDefHooksEngine.run(burst=True)
    assert seen == [("before", CfgDefHooksEngine), ("after", CfgDefHooksEngine)]


def test_failing_before_initialize_raises_and_engine_can_start_again(make_engine):
    """A before_initialize that raises makes run() and start() raise; a later run works."""
    broken = [True]

    def before(cls):
        if broken[0]:
            raise RuntimeError("cannot connect")

    engine = make_engine(before_initialize=before)
    task_id = engine.submit(CfgAdder, 4, 5)
    with pytest.raises(RuntimeError, match="cannot connect"):
        engine.run(burst=True)
    with pytest.raises(RuntimeError, match="cannot connect"):
        engine.start()
    assert len(engine._options["queue"]) == 1  # nothing was taken
    broken[0] = False
    engine.run(burst=True)
    assert engine.stats()["succeeded"] == 1
    assert f"task_id={task_id}" in main_log(engine)


def test_failing_after_initialize_raises_and_engine_can_start_again(make_engine):
    """An after_initialize that raises makes run() raise, is logged, and leaves it startable."""
    broken = [True]

    def after(cls):
        if broken[0]:
            raise RuntimeError("framework failed")

    engine = make_engine(after_initialize=after)
    engine.submit(CfgAdder, 1, 1)
    with pytest.raises(RuntimeError, match="framework failed"):
        engine.run(burst=True)
    assert "framework failed" in main_log(engine)
    broken[0] = False
    engine.start()
    wait_for(lambda: engine.stats()["succeeded"] == 1, 5)
    assert engine.stop(timeout=10)


def test_log_dir_path_object_is_used(make_engine, tmp_path):
    """A pathlib.Path log_dir works like a string."""
    target: Path = tmp_path / "as-path"
    engine = make_engine(log_dir=target)
    engine.run(burst=True)
    assert (target / f"{engine._options['name']}.task.log").exists()
