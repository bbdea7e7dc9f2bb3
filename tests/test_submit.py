"""Engine.submit: ids, messages, JSON checks, argument checks, producer-side use."""

from __future__ import annotations

import json
import threading

import pytest

from tempest import Engine, Task

from .conftest import main_log, wait_for

# -- tasks used here (names unique across the suite) ---------------------------------

RESULTS: dict[str, object] = {}
RESULTS_LOCK = threading.Lock()


class SubEcho(Task):
    def process(self, *values):
        with RESULTS_LOCK:
            RESULTS[self.task_id] = values
        return len(values)


class SubPair(Task):
    def process(self, a, b):
        with RESULTS_LOCK:
            RESULTS[self.task_id] = (a, b)
        return a


class SubDefaults(Task):
    def process(self, a, b=2, *, c=3):
        return a + b + c


class SubNoArgs(Task):
    def process(self):
        return None


def queue_of(engine):
    return engine._options["queue"]


# -- ids -------------------------------------------------------------------------------


def test_submit_returns_a_string_task_id(make_engine):
    """submit returns the task id, a non-empty string, which is the message's first item."""
    engine = make_engine()
    task_id = engine.submit(SubEcho, 1)
    assert isinstance(task_id, str) and task_id
    assert queue_of(engine).dequeue() == [task_id, "SubEcho", 1]


def test_task_ids_are_unique(make_engine):
    """Task ids from many submits are all different."""
    engine = make_engine()
    ids = [engine.submit(SubNoArgs) for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, str) and i and " " not in i for i in ids)


def test_custom_task_id_is_respected(make_engine):
    """A task_id passed to submit is returned, put in the message and seen by the task."""
    engine = make_engine()
    assert engine.submit(SubEcho, "x", task_id="sub-custom-id-1") == "sub-custom-id-1"
    assert queue_of(engine).dequeue() == ["sub-custom-id-1", "SubEcho", "x"]
    engine.submit(SubEcho, "y", task_id="sub-custom-id-2")
    engine.run(burst=True)
    assert RESULTS["sub-custom-id-2"] == ("y",)
    assert "task_id=sub-custom-id-2 task=SubEcho outcome=success" in main_log(engine)


@pytest.mark.parametrize("bad_id", ["", 123, b"id", ["a"]])
def test_invalid_custom_task_id_is_a_type_error(make_engine, bad_id):
    """A task_id that is not a non-empty string raises TypeError and enqueues nothing."""
    engine = make_engine()
    with pytest.raises(TypeError, match="task_id"):
        engine.submit(SubEcho, 1, task_id=bad_id)
    assert len(queue_of(engine)) == 0


# -- by class and by name ----------------------------------------------------------------


def test_submit_by_class_and_by_name_both_run(make_engine):
    """A task can be submitted by its class or by its registered name."""
    engine = make_engine()
    by_class = engine.submit(SubPair, 1, 2)
    by_name = engine.submit("SubPair", 3, 4)
    assert queue_of(engine).dequeue()[1:] == ["SubPair", 1, 2]
    assert queue_of(engine).dequeue()[1:] == ["SubPair", 3, 4]
    engine.submit(SubPair, 1, 2, task_id=by_class)
    engine.submit("SubPair", 3, 4, task_id=by_name)
    engine.run(burst=True)
    assert RESULTS[by_class] == (1, 2) and RESULTS[by_name] == (3, 4)
    assert engine.stats()["succeeded"] == 2


def test_unknown_name_is_enqueued_and_rejected_by_the_engine(make_engine):
    """submit accepts an unknown task name; the engine rejects it with reason UnknownTask."""
    engine = make_engine()
    queue = queue_of(engine)
    task_id = engine.submit("SubNotDefinedAnywhere", 1, 2)
    assert len(queue) == 1
    engine.run(burst=True)
    assert queue.rejected() == [([task_id, "SubNotDefinedAnywhere", 1, 2], "UnknownTask")]
    assert engine.stats()["rejected"] == 1
    assert engine.stats()["succeeded"] == 0
    rejected = [line for line in main_log(engine).splitlines() if " rejected " in line]
    assert len(rejected) == 1
    assert "reason=UnknownTask" in rejected[0] and "SubNotDefinedAnywhere" in rejected[0]


def test_name_submission_does_not_check_arguments(make_engine):
    """By name, submit cannot know the signature: a wrong count is enqueued, then rejected."""
    engine = make_engine()
    task_id = engine.submit("SubPair", 1)
    assert len(queue_of(engine)) == 1
    engine.run(burst=True)
    assert queue_of(engine).rejected() == [([task_id, "SubPair", 1], "BadArguments")]


@pytest.mark.parametrize("bad_task", [None, 42, "", object, Engine, SubEcho()])
def test_submit_rejects_what_is_neither_task_class_nor_name(make_engine, bad_task):
    """submit with something that is neither a Task subclass nor a name raises TypeError."""
    engine = make_engine()
    with pytest.raises(TypeError):
        engine.submit(bad_task, 1)
    assert len(queue_of(engine)) == 0


def test_submit_of_the_task_base_class_is_a_type_error(make_engine):
    """submit(Task) (the base class, registered under no name) raises TypeError."""
    engine = make_engine()
    with pytest.raises(TypeError):
        engine.submit(Task)
    assert len(queue_of(engine)) == 0


# -- JSON check --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "index", "type_name"),
    [
        (({1, 2},), 0, "set"),
        ((1, object()), 1, "object"),
        ((b"bytes",), 0, "bytes"),
        (("ok", 2, float("nan")), 2, "float"),
        ((float("inf"),), 0, "float"),
        (({"k": {1}},), 0, "dict"),
        (([1, 2, (3, b"x")],), 0, "list"),
        (({(1, 2): "tuple key"},), 0, "dict"),
        ((1, 2, 3, SubEcho), 3, "type"),
    ],
)
def test_non_json_argument_is_a_type_error_and_nothing_is_enqueued(make_engine, args, index,
                                                                    type_name):
    """A non-JSON argument raises TypeError naming its index and type; nothing is enqueued."""
    engine = make_engine()
    engine.submit(SubEcho, "before")
    with pytest.raises(TypeError) as info:
        engine.submit(SubEcho, *args)
    message = str(info.value)
    assert f"argument {index}" in message
    assert type_name in message
    assert "JSON" in message
    assert len(queue_of(engine)) == 1


def test_non_json_argument_by_name_is_a_type_error(make_engine):
    """The JSON check applies to submissions by name too."""
    engine = make_engine()
    with pytest.raises(TypeError, match="argument 1"):
        engine.submit("SubEcho", 1, {2})
    assert len(queue_of(engine)) == 0


def test_non_json_custom_object_is_named(make_engine):
    """The TypeError names the offending object's type, so the user can find it."""

    class SubUserRecord:
        pass

    engine = make_engine()
    with pytest.raises(TypeError, match="SubUserRecord"):
        engine.submit(SubEcho, SubUserRecord())
    assert len(queue_of(engine)) == 0


def test_json_values_of_every_kind_are_accepted(make_engine):
    """str, int, float, bool, None, lists and str-keyed dicts go through and arrive intact."""
    engine = make_engine()
    args = ("s", "ünïcode", 1, -2.5, True, False, None, [1, [2, 3]], {"a": {"b": [None]}})
    task_id = engine.submit(SubEcho, *args)
    engine.run(burst=True)
    assert RESULTS[task_id] == args


def test_tuples_arrive_as_lists_and_keys_as_strings(make_engine):
    """Arguments follow JSON semantics: tuples arrive as lists, int dict keys as strings."""
    engine = make_engine()
    task_id = engine.submit(SubEcho, (1, 2), {"t": (3, 4)}, {1: "one"})
    assert queue_of(engine).dequeue() == [task_id, "SubEcho", [1, 2], {"t": [3, 4]},
                                          {"1": "one"}]
    engine.submit(SubEcho, (1, 2), {"t": (3, 4)}, {1: "one"}, task_id=task_id)
    engine.run(burst=True)
    assert RESULTS[task_id] == ([1, 2], {"t": [3, 4]}, {"1": "one"})


def test_enqueued_message_is_decoupled_from_caller_objects(make_engine):
    """Mutating an argument after submit does not change the queued message."""
    engine = make_engine()
    payload = {"items": [1, 2]}
    task_id = engine.submit(SubEcho, payload)
    payload["items"].append(3)
    assert queue_of(engine).dequeue() == [task_id, "SubEcho", {"items": [1, 2]}]


def test_message_is_json_round_trippable(make_engine):
    """What submit enqueues is a list that JSON encodes and decodes to itself."""
    engine = make_engine()
    engine.submit(SubEcho, 1, "a", [True, None])
    message = queue_of(engine).dequeue()
    assert isinstance(message, list)
    assert json.loads(json.dumps(message)) == message


# -- argument count ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "args"),
    [(SubPair, (1,)), (SubPair, (1, 2, 3)), (SubPair, ()), (SubNoArgs, (1,)),
     (SubDefaults, ()), (SubDefaults, (1, 2, 3))],
)
def test_wrong_argument_count_is_a_type_error_and_nothing_is_enqueued(make_engine, task, args):
    """Arguments that process() cannot take raise TypeError naming the task; nothing enqueued."""
    engine = make_engine()
    with pytest.raises(TypeError) as info:
        engine.submit(task, *args)
    assert task.task_name in str(info.value)
    assert len(queue_of(engine)) == 0


def test_optional_and_variadic_arguments_are_accepted(make_engine):
    """Arguments matching defaults or *args are accepted."""
    engine = make_engine()
    engine.submit(SubDefaults, 1)
    engine.submit(SubDefaults, 1, 5)
    engine.submit(SubEcho)
    engine.submit(SubEcho, *range(50))
    assert len(queue_of(engine)) == 4
    engine.run(burst=True)
    assert engine.stats()["succeeded"] == 4


# -- producer side and running engine ---------------------------------------------------


def test_submit_works_without_a_running_engine(make_engine):
    """submit only enqueues: no engine needs to run, no thread is started."""
    engine = make_engine()
    before = threading.active_count()
    ids = [engine.submit(SubEcho, i) for i in range(3)]
    assert threading.active_count() == before
    assert len(queue_of(engine)) == 3
    assert engine.stats()["queued"] == 3
    assert engine._state.control is None
    engine.run(burst=True)
    assert all(RESULTS[i] == (n,) for n, i in enumerate(ids))


def test_submit_while_running_is_processed(make_engine):
    """Tasks submitted to a started engine are picked up and processed."""
    engine = make_engine()
    engine.start()
    ids = [engine.submit(SubEcho, i) for i in range(20)]
    wait_for(lambda: engine.stats()["succeeded"] == 20, 5)
    assert all(RESULTS[i] == (n,) for n, i in enumerate(ids))
    assert engine.stop(timeout=10)


def test_submit_from_many_threads(make_engine):
    """submit is safe from several producer threads at once; every task runs once."""
    engine = make_engine(threads=4)
    ids: list[str] = []
    lock = threading.Lock()

    def produce(n):
        mine = [engine.submit(SubEcho, n, i) for i in range(200)]
        with lock:
            ids.extend(mine)

    producers = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(10)
    assert len(set(ids)) == 800
    engine.run(burst=True)
    assert engine.stats()["succeeded"] == 800
    assert all(i in RESULTS for i in ids)


def test_submit_to_a_shared_queue_reaches_the_engine_using_it(make_engine):
    """A producer-only engine class sharing the queue feeds the engine that runs it."""
    worker = make_engine()

    class SubProducerEngine(Engine):
        class configure:
            queue = worker._options["queue"]

    task_id = SubProducerEngine.submit(SubEcho, "shared")
    worker.run(burst=True)
    assert RESULTS[task_id] == ("shared",)
