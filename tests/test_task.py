"""Task classes: registration, the task's configure block, instances and their attributes."""

from __future__ import annotations

import threading

import pytest

from tempest import ConfigurationError, Task, TaskTimeout, UnknownTask
from tempest.task import UNSET, lookup

from .conftest import main_log, task_log, wait_for

# -- tasks used here (names unique across the suite) ---------------------------------


class TskPlain(Task):
    def process(self, x):
        return x * 2


class TskRenamed(Task):
    class configure:
        name = "tsk.renamed-task"

    def process(self, x):
        return x + 1


class TskDuplicate(Task):
    def process(self):
        return None


class TskWithTimeout(Task):
    class configure:
        timeout = 1.5

    def process(self):
        return None


class TskNoLimit(Task):
    class configure:
        timeout = None

    def process(self, release_after):
        # The release comes after the engine's default timeout has passed.
        released = threading.Event()
        threading.Timer(release_after, released.set).start()
        for _ in range(500):  # short waits: a timeout, if any, would land here
            if released.wait(0.01):
                return "released"
        return "never released"


class TskShortLimit(Task):
    class configure:
        timeout = 0.1

    def process(self):
        done = threading.Event()
        for _ in range(500):
            if done.wait(0.01):
                break


class TskInheritsTimeout(TskWithTimeout):
    pass


class TskOverridesTimeout(TskWithTimeout):
    class configure:
        timeout = 3


def _interruptible_wait(seconds):
    never = threading.Event()
    for _ in range(int(seconds / 0.01)):
        never.wait(0.01)


# Records of what task instances saw, keyed by task id.
SEEN: dict[str, dict] = {}
SEEN_LOCK = threading.Lock()


def _record(task, where, **extra):
    with SEEN_LOCK:
        SEEN.setdefault(task.task_id, {})[where] = {
            "task_id": task.task_id, "args": task.args, "engine": task.engine,
            "self": task, **extra,
        }


class TskIntrospect(Task):
    def process(self, mode, *rest):
        _record(self, "process", fresh=not hasattr(self, "marker"))
        self.marker = object()
        if mode == "fail":
            raise ValueError("introspect failure")
        if mode == "slow":
            _interruptible_wait(5)
        return [mode, *rest]

    def after_success(self, result):
        _record(self, "after_success", result=result)

    def after_failure(self, exc):
        _record(self, "after_failure", exc=exc)

    def after_timeout(self):
        _record(self, "after_timeout")


class TskInitOverride(Task):
    def __init__(self):
        self.id_at_init = self.task_id
        self.args_at_init = self.args
        self.engine_at_init = self.engine

    def process(self):
        _record(self, "process", id_at_init=self.id_at_init, args_at_init=self.args_at_init,
                engine_at_init=self.engine_at_init)


class TskLogs(Task):
    def process(self, value):
        self.task_logger.info("tsk logs value", value=value)
        self.task_logger.warning("tsk logs warning")
        return value


# -- registration ----------------------------------------------------------------------


def test_task_is_registered_under_its_class_name():
    """Defining a Task subclass registers it under its class name."""
    assert lookup("TskPlain") is TskPlain
    assert TskPlain.task_name == "TskPlain"


def test_configure_name_replaces_the_class_name():
    """configure.name is the name in messages; the class name is then not registered."""
    assert TskRenamed.task_name == "tsk.renamed-task"
    assert lookup("tsk.renamed-task") is TskRenamed
    with pytest.raises(UnknownTask):
        lookup("TskRenamed")


def test_lookup_of_unknown_name_raises_unknown_task():
    """An unregistered name (or a non-string) resolves to UnknownTask, never an import."""
    for bad in ("TskNoSuchTask", "os.system", "tempest.task.Task", "Task", None, 5):
        with pytest.raises(UnknownTask):
            lookup(bad)


def test_configured_name_runs_by_class_and_by_name(make_engine):
    """A renamed task runs when submitted by class and by its configured name."""
    engine = make_engine()
    queue = engine._options["queue"]
    by_class = engine.submit(TskRenamed, 1)
    message = queue.dequeue()
    assert message[:2] == [by_class, "tsk.renamed-task"]
    queue.enqueue(message)
    by_name = engine.submit("tsk.renamed-task", 2)
    by_old_name = engine.submit("TskRenamed", 3)
    engine.run(burst=True)
    log = main_log(engine)
    assert f"task_id={by_class} task=tsk.renamed-task outcome=success" in log
    assert f"task_id={by_name} task=tsk.renamed-task outcome=success" in log
    assert f"task_id={by_old_name}" not in log
    assert [(m[0], reason) for m, reason in queue.rejected()] == [(by_old_name, "UnknownTask")]


def test_two_different_classes_with_one_name_is_an_error():
    """A second, different class claiming a registered name raises ConfigurationError."""
    with pytest.raises(ConfigurationError) as info:

        class TskDuplicate(Task):  # the clash is the point
            def process(self):
                return "impostor"

    message = str(info.value)
    assert "'TskDuplicate'" in message
    assert "name" in message
    assert lookup("TskDuplicate") is globals()["TskDuplicate"]


def test_configure_name_clashing_with_a_class_name_is_an_error():
    """A configure.name equal to another registered task's name raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="TskPlain"):

        class TskClashByName(Task):
            class configure:
                name = "TskPlain"

            def process(self, x):
                return x

    assert lookup("TskPlain") is TskPlain


def test_redefining_the_same_class_in_a_loop_is_allowed():
    """Re-running the same class statement (same module and qualname) is not a clash."""
    made = []
    for _ in range(3):

        class TskLoopDefined(Task):
            def process(self):
                return None

        made.append(TskLoopDefined)
    assert len(set(made)) == 3
    assert lookup("TskLoopDefined") is made[-1]


def _define_task():
    class TskFromFunction(Task):
        def process(self):
            return "from function"

    return TskFromFunction


def test_redefining_the_same_class_in_a_function_called_twice_is_allowed():
    """A task class defined in a function may be defined again by calling it again."""
    first = _define_task()
    second = _define_task()
    assert first is not second
    assert lookup("TskFromFunction") is second


def test_subclass_registers_under_its_own_name():
    """A Task subclass of a renamed task registers under its own class name."""

    class TskRenamedChild(TskRenamed):
        pass

    assert TskRenamedChild.task_name == "TskRenamedChild"
    assert lookup("TskRenamedChild") is TskRenamedChild
    assert lookup("tsk.renamed-task") is TskRenamed


# -- the task's configure block -------------------------------------------------------


def test_task_timeout_resolution():
    """The task timeout: a number, None (no limit) or unset (the engine's default)."""
    assert TskWithTimeout.timeout == 1.5
    assert TskNoLimit.timeout is None
    assert TskPlain.timeout is UNSET
    assert TskInheritsTimeout.timeout == 1.5
    assert TskOverridesTimeout.timeout == 3.0


@pytest.mark.parametrize(("typo", "suggestion"),
                         [("timout", "timeout"), ("time_out", "timeout"), ("nmae", "name")])
def test_unknown_task_option_suggests_the_closest(typo, suggestion):
    """An unknown option in a Task's configure block names it and the closest valid one."""
    block = type("configure", (), {typo: 1})
    with pytest.raises(ConfigurationError) as info:
        type("TskTypoTask", (Task,), {"configure": block, "process": lambda self: None})
    assert repr(typo) in str(info.value)
    assert repr(suggestion) in str(info.value)


def test_engine_only_option_in_task_block_is_rejected():
    """Options that belong to the engine (threads) are not valid in a Task's block."""
    block = type("configure", (), {"threads": 2})
    with pytest.raises(ConfigurationError, match="'threads'"):
        type("TskThreadsTask", (Task,), {"configure": block, "process": lambda self: None})


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [("timeout", -1, "positive number"), ("timeout", 0, "positive number"),
     ("timeout", "1", "positive number"), ("name", "", "non-empty string"),
     ("name", 3, "non-empty string")],
)
def test_wrong_task_option_value_says_what_is_allowed(option, value, allowed):
    """A task option with a wrong value raises ConfigurationError saying what is allowed."""
    block = type("configure", (), {option: value})
    with pytest.raises(ConfigurationError) as info:
        type("TskBadValueTask", (Task,), {"configure": block, "process": lambda self: None})
    assert f"configure.{option}" in str(info.value)
    assert allowed in str(info.value)


def test_task_timeout_none_means_no_limit_despite_engine_default(make_engine):
    """A task with timeout=None runs past the engine's default timeout and succeeds."""
    engine = make_engine(timeout=0.1)
    task_id = engine.submit(TskNoLimit, 0.3)
    engine.run(burst=True)
    stats = engine.stats()
    assert stats["succeeded"] == 1 and stats["timed_out"] == 0
    assert f"task_id={task_id} task=TskNoLimit outcome=success" in main_log(engine)


def test_task_timeout_overrides_engine_without_one(make_engine):
    """A task's own timeout applies even when the engine sets none."""
    engine = make_engine()
    task_id = engine.submit(TskShortLimit)
    engine.run(burst=True)
    assert engine.stats()["timed_out"] == 1
    assert f"task_id={task_id} task=TskShortLimit outcome=timeout" in main_log(engine)


def test_task_timeout_is_a_base_exception():
    """TaskTimeout is a BaseException so `except Exception` in task code doesn't swallow it."""
    assert issubclass(TaskTimeout, BaseException)
    assert not issubclass(TaskTimeout, Exception)


# -- instances -------------------------------------------------------------------------


def test_fresh_instance_per_message(make_engine):
    """Each message is handled by a new instance: no state carries over between messages."""
    engine = make_engine(threads=1)
    ids = [engine.submit(TskIntrospect, "ok", i) for i in range(5)]
    engine.run(burst=True)
    instances = [SEEN[i]["process"]["self"] for i in ids]
    assert len({id(obj) for obj in instances}) == 5  # all alive, so ids are distinct
    assert all(SEEN[i]["process"]["fresh"] for i in ids)


def test_attributes_set_in_process_and_success_callback(make_engine):
    """task_id, args (a tuple) and engine are set in process and after_success."""
    engine = make_engine()
    task_id = engine.submit(TskIntrospect, "ok", 1, "two")
    engine.run(burst=True)
    seen = SEEN[task_id]
    for where in ("process", "after_success"):
        assert seen[where]["task_id"] == task_id
        assert seen[where]["args"] == ("ok", 1, "two")
        assert isinstance(seen[where]["args"], tuple)
        assert seen[where]["engine"] is engine
    assert seen["after_success"]["result"] == ["ok", 1, "two"]
    assert seen["after_success"]["self"] is seen["process"]["self"]


def test_attributes_set_in_failure_callback(make_engine):
    """after_failure gets the exception and sees task_id, args and engine."""
    engine = make_engine()
    task_id = engine.submit(TskIntrospect, "fail")
    engine.run(burst=True)
    seen = SEEN[task_id]["after_failure"]
    assert seen["task_id"] == task_id and seen["args"] == ("fail",)
    assert seen["engine"] is engine
    assert isinstance(seen["exc"], ValueError)
    assert "after_success" not in SEEN[task_id]
    assert engine.stats()["failed"] == 1


def test_attributes_set_in_timeout_callback(make_engine):
    """after_timeout runs once on a timeout and sees task_id, args and engine."""
    engine = make_engine(timeout=0.1)
    task_id = engine.submit(TskIntrospect, "slow")
    engine.run(burst=True)
    seen = SEEN[task_id]
    assert seen["after_timeout"]["task_id"] == task_id
    assert seen["after_timeout"]["args"] == ("slow",)
    assert seen["after_timeout"]["engine"] is engine
    assert "after_success" not in seen and "after_failure" not in seen
    assert engine.stats()["timed_out"] == 1


def test_init_override_runs_with_task_id_set(make_engine):
    """A Task's own __init__(self) runs with task_id, args and engine already set."""
    engine = make_engine()
    task_id = engine.submit(TskInitOverride)
    engine.run(burst=True)
    seen = SEEN[task_id]["process"]
    assert seen["id_at_init"] == task_id
    assert seen["args_at_init"] == ()
    assert seen["engine_at_init"] is engine


def test_null_task_id_in_message_gets_a_fresh_id(make_engine):
    """A message whose task id is null runs with an id assigned by the engine."""
    engine = make_engine()
    engine._options["queue"].enqueue([None, "TskIntrospect", "ok"])
    engine.run(burst=True)
    assert engine.stats()["succeeded"] == 1
    ids = [i for i, seen in SEEN.items() if seen.get("process", {}).get("engine") is engine]
    assert len(ids) == 1 and isinstance(ids[0], str) and ids[0]


# -- task_logger -----------------------------------------------------------------------


def test_task_logger_outside_an_engine_does_not_crash():
    """Calling process directly (a unit test) works: task_logger logs somewhere harmless."""
    assert TskLogs().process(7) == 7
    task = TskLogs()
    task.task_id = "tsk-unit-id"
    task.args = (8,)
    assert task.process(8) == 8


def test_task_logger_lines_start_with_the_task_id(make_engine):
    """Inside an engine, task_logger lines land in the task log prefixed with the task id."""
    engine = make_engine()
    task_id = engine.submit(TskLogs, 42)
    engine.run(burst=True)
    lines = [line for line in task_log(engine).splitlines() if "tsk logs" in line]
    assert len(lines) == 2
    assert all(line.startswith(f"{task_id} ") for line in lines)
    assert "value=42" in lines[0]


def test_task_runs_while_engine_started(make_engine):
    """A task submitted to a started engine runs in the background."""
    engine = make_engine()
    engine.start()
    task_id = engine.submit(TskIntrospect, "ok", "bg")
    wait_for(lambda: "after_success" in SEEN.get(task_id, {}), 5)
    assert engine.stop(timeout=10)
