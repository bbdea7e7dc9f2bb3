"""Fuzz: whatever a queue's storage holds, the engine never crashes and loses nothing.

Garbage is written straight into each queue's storage, the way the queue keeps
messages (SQLite and PostgreSQL rows, Redis list entries with their ``\\xff``
headers, MemoryQueue's objects), bypassing ``enqueue``; then a burst engine
runs over a whole batch. Every entry is checked: a message that decodes to a
runnable ``[task_id, task_name, *args]`` runs and succeeds; anything else is
rejected with the reason README.rst's "Bad input" table gives, logged, and kept
(``rejected()`` lists it); a valid message submitted after the garbage runs; no
worker crashes.
"""

from __future__ import annotations

import collections
import json
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tempest import Engine, Task
from tempest.messages import shown
from tempest.queues import MemoryQueue, SQLiteQueue, protocol

from .conftest import main_log

# -- tasks (names unique across the suite) ---------------------------------------------

RAN: list[tuple[str, str, str]] = []
"""(task name, task id, fingerprint of the arguments) of every run."""
RAN_LOCK = threading.Lock()


def fingerprint(args: Any) -> str:
    """The arguments as canonical JSON (an identity-based stand-in where they are not JSON)."""
    try:
        return json.dumps(args, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return "ids:" + ",".join(str(id(arg)) for arg in args)


def _ran(task: Task, args: tuple[Any, ...]) -> None:
    with RAN_LOCK:
        RAN.append((task.task_name, task.task_id, fingerprint(list(args))))


class FuzzAny(Task):
    def process(self, *args):
        _ran(self, args)


class FuzzPair(Task):
    def process(self, a, b):
        _ran(self, (a, b))


class FuzzAsync(Task):
    async def process(self, *args):
        _ran(self, args)


ARITY = {"FuzzAny": (0, math.inf), "FuzzPair": (2, 2), "FuzzAsync": (0, math.inf)}


# -- the oracle: README.rst, "Bad input" -------------------------------------------------

def reason_for(message: Any) -> str | None:
    """The reason the engine must reject *message* with (as handed over); None: it runs."""
    if isinstance(message, (str, bytes, bytearray)):
        return "Undecodable"
    if not isinstance(message, (list, tuple)):
        return "NotAList"
    if len(message) < 2:
        return "TooShort"
    task_id, name = message[0], message[1]
    if task_id is not None and not (isinstance(task_id, str) and task_id):
        return "BadTaskId"
    if not isinstance(name, str) or name not in ARITY:
        return "UnknownTask"  # generated names never collide with other tests' tasks
    low, high = ARITY[name]
    return None if low <= len(message) - 2 <= high else "BadArguments"


def decoded(body: bytes | str) -> Any:
    """What a durable queue hands over for a stored body: the JSON list, else the body raw.

    Bodies are nested either shallowly or far past the recursion limit, never
    near it, so decoding here and in the queue's thread agree.
    """
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return body
    return message if isinstance(message, list) else body


def kept_key(message: Any) -> Any:
    """A comparable form of a message as stored, or of one that ``rejected()`` lists."""
    if isinstance(message, str):
        return message.encode("utf-8", "surrogatepass")
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return json.dumps(message, sort_keys=True)


@dataclass
class Entry:
    """One stored entry: what the queue hands the engine, and what the engine must do."""

    message: Any
    reason: str | None  # None: it must run

    @classmethod
    def durable(cls, body: bytes | str, *, utf8: bool = False) -> Entry:
        """*body* (the message part of what is stored) as the queue reads it; *utf8*: a
        queue that hands over bytes that are not UTF-8 raw, without trying JSON's other
        encodings."""
        message = body if utf8 and isinstance(body, bytes) else decoded(body)
        return cls(message, reason_for(message))


# -- strategies ---------------------------------------------------------------------------

NASTY = ["\x00", "\ud800", "\udfff", "\udbff\udc00", "\u202e", "\u200f", "\u061c", "\ufeff",
         "\uffff", "\U0010ffff", "\U0001f600", "\U0001f469\u200d\U0001f4bb", "\n", "\r\n",
         "\\", '"', "\u2028", "\xff", "\x1b[31m", "\t"]

pieces = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(NASTY))
texts = st.lists(pieces, max_size=16).map("".join)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.integers(min_value=10**30, max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False), texts)
values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=12)

good_ids = st.none() | texts.filter(bool)
bad_ids = st.one_of(st.just(""), st.integers(), st.floats(allow_nan=False), st.booleans(),
                    st.lists(values, max_size=3), st.dictionaries(texts, values, max_size=3))
unknown_names = st.one_of(
    texts.map(lambda text: "FuzzNoSuch" + text),
    st.sampled_from(["", "os.system", "builtins.eval", "fuzzany", "FuzzAny ", " FuzzAny",
                     "FuzzAny\x00", "tempest.Task", "__import__", "Task"]))
bad_names = st.one_of(unknown_names, st.none(), st.integers(), st.booleans(),
                      st.floats(allow_nan=False), st.lists(values, max_size=3),
                      st.lists(st.just("FuzzAny"), min_size=1, max_size=2),
                      st.dictionaries(texts, values, max_size=3))
args = st.lists(values, max_size=4)


def _message(task_id: Any, name: Any, arguments: list[Any]) -> list[Any]:
    return [task_id, name, *arguments]


messages = st.one_of(
    # runs
    st.builds(_message, good_ids, st.sampled_from(["FuzzAny", "FuzzAsync"]), args),
    # runs with two arguments; any other count is BadArguments
    st.builds(_message, good_ids, st.just("FuzzPair"), st.sampled_from([2, 2, 0, 1, 3])
              .flatmap(lambda count: st.lists(values, min_size=count, max_size=count))),
    st.builds(_message, bad_ids, st.sampled_from(["FuzzAny", "FuzzPair"]) | bad_names, args),
    st.builds(_message, good_ids, bad_names, args),
    st.lists(values, max_size=5),  # anything in any position
    st.lists(values, max_size=1),  # too short
    scalars, st.dictionaries(texts, values, max_size=3))  # not a list
"""A value for the message position: mostly shaped like a message, often not quite."""


@st.composite
def bodies(draw: st.DrawFn, *, nul: bool = True, surrogates: bool = True) -> bytes | str:
    """A stored body: a message's JSON (in varied spellings), almost-JSON, or garbage.

    *nul* and *surrogates*: whether the storage can hold a raw NUL, and raw
    (unpaired) surrogates in text (as bytes, they are not UTF-8).
    """
    kind = draw(st.sampled_from(["json"] * 6 + ["truncated", "bytes", "text"]))
    if kind in ("json", "truncated"):
        message = draw(messages)
        # Raw (not \u-escaped) unpaired surrogates make the body undecodable: now and then.
        ascii_only = draw(st.sampled_from([True, True, True, False])) or not surrogates
        text = json.dumps(message, ensure_ascii=ascii_only,
                          indent=draw(st.sampled_from([None, None, 0, 2])))
        if kind == "truncated":
            text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
        return text if draw(st.booleans()) else text.encode("utf-8", "surrogatepass")
    if kind == "bytes":
        raw = draw(st.binary(max_size=64))
        return raw if nul else raw.replace(b"\x00", b"")
    text = draw(texts)
    if not nul:
        text = text.replace("\x00", "")
    if not surrogates:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def huge_bodies(*, ascii_only: bool = False) -> st.SearchStrategy[str]:
    """A message (or not) with one string of 1 to 5 MB (as stored) in some position."""
    def build(size: int, unit: str, where: str) -> str:
        stored = len(json.dumps(unit, ensure_ascii=ascii_only)) - 2  # \u escapes: 6 a char
        length = size * len(unit) // max(stored, len(unit))
        big = (unit * (length // len(unit) + 1))[:length]
        if where == "raw":  # not JSON at all
            return big
        message = {"id": [big, "FuzzAny", 1], "name": ["huge-name", big],
                   "arg": ["huge-arg", "FuzzAny", big]}[where]
        return json.dumps(message, ensure_ascii=ascii_only)
    return st.builds(build, st.integers(1 << 20, 5 << 20), texts.filter(bool),
                     st.sampled_from(["raw", "id", "name", "arg"]))


def deep_bodies() -> st.SearchStrategy[str]:
    """JSON nested far deeper than Python's json can follow (about 10,000 levels)."""
    def build(depth: int, shape: str) -> str:
        if shape == "lists":
            return "[" * depth + "]" * depth
        if shape == "dicts":
            return '{"a":' * depth + "1" + "}" * depth
        return '["deep", "FuzzAny", ' + "[" * depth + "]" * depth + "]"
    return st.builds(build, st.integers(5_000, 20_000),
                     st.sampled_from(["lists", "dicts", "argument"]))


def batches(body: st.SearchStrategy[Any], *, ascii_only: bool = False
            ) -> st.SearchStrategy[list[Any]]:
    """Many small bodies; in about half the batches one deep, in a quarter one huge
    (megabytes cost a second or so a batch to store, decode and log)."""
    return st.builds(
        lambda small, huge, deep, order: _shuffled([*small, *(b for b in (huge, deep) if b)],
                                                   order),
        st.lists(body, min_size=1, max_size=12),
        st.one_of(st.none(), st.none(), st.none(), huge_bodies(ascii_only=ascii_only)),
        st.none() | deep_bodies(),
        st.randoms(use_true_random=False))


def _shuffled(items: list[Any], rng: Any) -> list[Any]:
    rng.shuffle(items)
    return items


# No shrinking: an example holds megabytes and each run starts an engine, so
# shrinking would outlast pytest-timeout; the assertions name the entries that
# went wrong, and print_blob gives the @reproduce_failure line.
FUZZ = settings(max_examples=50, deadline=None, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


# -- running a batch and checking every entry -------------------------------------------

_names = (f"fuzz-{uuid.uuid4().hex[:8]}-{n}" for n in range(10**9))


def burst(engine: type[Engine], timeout: float = 30.0) -> None:
    """``run(burst=True)`` in a thread, bounded; re-raise what it raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            engine.run(burst=True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=target, name="fuzz-burst")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        engine.stop(timeout=10)
        thread.join(10)
        raise AssertionError(f"the burst did not drain within {timeout}s: {engine.stats()}")
    assert not errors, f"run(burst=True) raised {errors[0]!r}"


def run_batch(make_engine: Callable[..., type[Engine]], queue: Any,
              entries: list[Entry], *, keeps: Callable[[Any], Any] = kept_key) -> None:
    """Run a burst engine over *entries* (already stored) and a valid message after them."""
    for entry in entries:  # --hypothesis-show-statistics tells how often each came up
        event(f"entry: {entry.reason or 'runs'}")
    RAN.clear()
    engine = make_engine(queue=queue, log_format="json", threads=2)
    tail = engine.submit(FuzzAny, "after the garbage")
    burst(engine)
    # One object a line, split at "\n" only: splitlines() also splits at the
    # U+2028 a task id may hold (the JSON is written with ensure_ascii=False).
    lines = [json.loads(line) for line in main_log(engine).split("\n") if line.strip()]

    crashed = [line for line in lines if "crashed" in line.get("event", "")]
    assert not crashed, crashed[0]
    stopped = [line for line in lines if line.get("event") == "stopped"]
    assert stopped and stopped[-1]["reason"] == "drained", stopped

    garbage = [entry for entry in entries if entry.reason is not None]
    valid = [entry for entry in entries if entry.reason is None]
    with RAN_LOCK:
        ran = list(RAN)

    # Every valid message ran, once, with its arguments, and succeeded.
    want = collections.Counter((entry.message[1], fingerprint(list(entry.message[2:])))
                               for entry in valid)
    want[("FuzzAny", fingerprint(["after the garbage"]))] += 1
    got = collections.Counter((name, fp) for name, _, fp in ran)
    assert got == want, f"runs differ: missing {_short(want - got)}, extra {_short(got - want)}"
    assert tail in {task_id for _, task_id, _ in ran}
    given_ids = {entry.message[0] for entry in valid if entry.message[0] is not None}
    assert given_ids <= {task_id for _, task_id, _ in ran}
    ended = [line for line in lines if line.get("event") == "task ended"]
    assert len(ended) == len(valid) + 1
    assert all(line["outcome"] == "success" for line in ended), _short(ended)

    # Every garbage entry was logged whole with its reason, and kept.
    want_reasons = collections.Counter(entry.reason for entry in garbage)
    rejected = [line for line in lines if line.get("event") == "rejected"]
    logged = collections.Counter(line["reason"] for line in rejected)
    assert logged == want_reasons, f"logged {logged}, expected {want_reasons}"
    want_logged = collections.Counter((shown(entry.message), entry.reason) for entry in garbage)
    got_logged = collections.Counter((line["message"], line["reason"]) for line in rejected)
    assert got_logged == want_logged, (f"logged differ: missing {_short(want_logged - got_logged)}"
                                       f", extra {_short(got_logged - want_logged)}")
    assert not [line for line in lines if line.get("event") == "reject failed"]
    kept = queue.rejected()
    assert collections.Counter(reason for _, reason in kept) == want_reasons
    want_kept = collections.Counter((keeps(entry.message), entry.reason) for entry in garbage)
    got_kept = collections.Counter((keeps(message), reason) for message, reason in kept)
    assert got_kept == want_kept, (f"kept differ: missing {_short(want_kept - got_kept)}, "
                                   f"extra {_short(got_kept - want_kept)}")

    stats = engine.stats()
    assert stats["succeeded"] == len(valid) + 1
    assert stats["rejected"] == len(garbage)
    assert stats["failed"] == stats["timed_out"] == stats["running"] == 0
    assert stats["queued"] == 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 600 else text[:600] + "..."


# -- SQLite --------------------------------------------------------------------------------

@pytest.fixture
def sqlite_path(tmp_path: Any) -> Any:
    return tmp_path / "fuzz.db"


@settings(FUZZ)
@given(batch=batches(bodies()))
def test_sqlite_rows(make_engine, sqlite_path, batch):
    """Any body in a SQLiteQueue row, TEXT or BLOB, is run or rejected and kept."""
    queue = SQLiteQueue(sqlite_path, name=next(_names))
    try:
        len(queue)  # the queue creates its tables on first use
        with closing(sqlite3.connect(sqlite_path, timeout=10)) as conn, conn:
            conn.executemany(
                f'INSERT INTO "{queue.table}" (queue, body, available_at, enqueued_at) '
                f"VALUES (?, ?, 0, 0)",
                [(queue.name, body if isinstance(body, bytes) else _sqlite_text(body))
                 for body in batch])
        entries = [Entry.durable(_as_read(body), utf8=True) for body in batch]
        run_batch(make_engine, queue, entries)
    finally:
        queue.close()


def _sqlite_text(body: str) -> Any:
    """Text SQLite can take as TEXT; text with unpaired surrogates goes in as its bytes."""
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        return body.encode("utf-8", "surrogatepass")
    return body


def _as_read(body: bytes | str) -> bytes | str:
    """A body as a queue reading UTF-8 (SQLite, PostgreSQL) sees it: text, or bytes if
    they are not UTF-8."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body


# -- Redis ---------------------------------------------------------------------------------

HEADER_MARKS = [b"\xffr", b"\xffa", b"\xffp"]
HEADER_VALUES = [b"86400000", b"0", b"-1", b"1", b"0.000001", b"1e-999999", b"1e999999",
                 b"NaN", b"sNaN", b"Infinity", b"-Infinity", b"2,1733500000.25", b"-3,nan",
                 b"1,", b",", b"5", b"-2147483648", b"99999999999999999999",
                 b"9" * 5000, b"", b" 7 ", b"\xff", b"1_000"]
header_parts = st.tuples(st.sampled_from(HEADER_MARKS),
                         st.sampled_from(HEADER_VALUES)
                         | st.binary(max_size=12).map(lambda raw: raw.replace(b"\n", b"")),
                         st.booleans())


def redis_body(entry: bytes) -> bytes:
    """The message part of a stored Redis entry, as the queue's docstring lays out:
    a result header outermost, then failed attempts, then priority, each up to its newline."""
    for mark in HEADER_MARKS:
        if entry.startswith(mark):
            newline = entry.find(b"\n", 2)
            if newline >= 0:
                entry = entry[newline + 1:]
    return entry


@st.composite
def redis_entries(draw: st.DrawFn) -> bytes:
    """A Redis list entry: optional (fuzzed) headers, then a body."""
    body = draw(bodies())
    entry = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    for mark, value, newline in reversed(draw(st.lists(header_parts, max_size=3))):
        entry = mark + value + (b"\n" if newline else b"") + entry
    return entry


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    yield client
    client.close()


def _drop_redis(client: Any, name: str) -> None:
    keys = list(client.scan_iter(match=f"tempest:{{{name}}}:*", count=1000))
    if keys:
        client.delete(*keys)


@settings(FUZZ, max_examples=25)  # each example a fresh queue and engine: ~0.5 s on Redis
@given(batch=batches(redis_entries()))
def test_redis_entries(make_engine, redis_url, redis_client, batch):
    """Any entry LPUSH-ed onto a RedisQueue's waiting list, headers included, is run or
    rejected and kept."""
    from tempest.queues.redis import RedisQueue

    name = next(_names)
    # The 5 bytes of the wake token are dropped wherever met, by design (see redis.py).
    entries = [entry if isinstance(entry, bytes) else entry.encode("utf-8", "surrogatepass")
               for entry in batch]
    entries = [entry for entry in entries if entry != b"\xffwake"]
    queue = RedisQueue(redis_url, name)
    try:
        if entries:
            redis_client.lpush(f"{queue.prefix}waiting", *entries)
        run_batch(make_engine, queue,
                  [Entry.durable(redis_body(entry)) for entry in entries])
    finally:
        queue.close()
        _drop_redis(redis_client, name)


# -- PostgreSQL ----------------------------------------------------------------------------

@pytest.fixture
def pg_table(postgres_dsn: str) -> Iterator[str]:
    """A fresh table (and its companions), dropped after the test."""
    import psycopg

    table = f"fuzz_{uuid.uuid4().hex[:12]}"
    yield table
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_rejected, {table}_scheduled, "
                     f"{table}_fired, {table}_failed, {table}_results")


def _pg_text(body: bytes | str) -> str:
    """What a text column can hold: UTF-8 without NUL (bytes go in as the text they spell)."""
    if isinstance(body, str):
        body = body.encode("utf-8", "replace")  # unpaired surrogates become "?"
    return body.decode("utf-8", "replace").replace("\x00", "")


@settings(FUZZ)
@given(batch=batches(bodies(nul=False, surrogates=False), ascii_only=True))
def test_postgres_rows(make_engine, postgres_dsn, pg_table, batch):
    """Any text a PostgresQueue row can hold is run or rejected and kept."""
    import psycopg

    from tempest.queues.postgres import PostgresQueue

    texts_ = [_pg_text(body) for body in batch]
    queue = PostgresQueue(postgres_dsn, pg_table, name=next(_names))
    try:
        len(queue)  # the queue creates its tables on first use
        with psycopg.connect(postgres_dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {pg_table} (queue, body) VALUES (%s, %s)",
                            [(queue.name, text) for text in texts_])
        run_batch(make_engine, queue, [Entry.durable(text) for text in texts_])
    finally:
        queue.close()


# -- MemoryQueue: whatever Python object it holds ---------------------------------------

class BadRepr:
    """An object whose repr raises, as user code can put into a MemoryQueue."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def _deep(depth: int, leaf: Any = None) -> list[Any]:
    value: list[Any] = [] if leaf is None else [leaf]
    for _ in range(depth - 1):
        value = [value]
    return value


objects = st.one_of(
    st.builds(object), st.builds(BadRepr), st.just(float("nan")), st.just(math.inf),
    st.binary(max_size=8), st.builds(bytearray, st.binary(max_size=8)),
    st.frozensets(st.integers(), max_size=3), st.complex_numbers(allow_nan=False),
    st.builds(_deep, st.integers(5_000, 20_000)))


@st.composite
def memory_messages(draw: st.DrawFn) -> Any:
    """A JSON-shaped message, a tuple, or one holding non-JSON objects anywhere."""
    kind = draw(st.sampled_from(["json", "json", "tuple", "objects", "object", "deep", "text"]))
    if kind == "json":  # not None: MemoryQueue refuses it (dequeue's None means "empty")
        return draw(messages.filter(lambda message: message is not None))
    if kind == "tuple":
        return tuple(draw(messages.filter(lambda m: isinstance(m, list))))
    if kind == "objects":  # any position may hold one
        message = draw(messages.filter(lambda m: isinstance(m, list) and m))
        where = draw(st.integers(0, len(message)))
        return [*message[:where], draw(objects), *message[where:]]
    if kind == "object":
        return draw(objects)
    if kind == "deep":  # 10,000 levels in some position: no JSON in between to refuse it
        deep = _deep(draw(st.integers(5_000, 20_000)))
        return draw(st.sampled_from([deep, [deep, "FuzzAny"], ["deep", deep],
                                     ["deep", "FuzzNoSuch", deep], ["deep", "FuzzAny", deep],
                                     ["deep", "FuzzPair", deep]]))
    return draw(texts)


@settings(FUZZ, max_examples=60)  # cheap: no storage, no megabytes
@given(batch=st.lists(memory_messages(), min_size=1, max_size=15))
def test_memory_objects(make_engine, batch):
    """Whatever object a MemoryQueue holds (None aside) is run or rejected and kept."""
    queue = MemoryQueue()
    for message in batch:
        queue.enqueue(message)
    entries = [Entry(message, reason_for(message)) for message in batch]
    # MemoryQueue hands out the very objects it holds: kept means kept as they were.
    run_batch(make_engine, queue, entries, keeps=id)


# -- regressions the fuzz found (plain tests) ---------------------------------------------

def test_json_nested_past_the_recursion_limit_is_undecodable():
    """protocol.decode hands back 10,000-deep JSON raw instead of raising RecursionError."""
    body = "[" * 10_000 + "]" * 10_000
    assert protocol.decode(body) is body
    raw = body.encode()
    assert protocol.decode(raw) is raw


def test_sqlite_row_nested_past_the_recursion_limit_is_rejected(make_engine, sqlite_path):
    """A 10,000-deep JSON row is rejected as Undecodable and kept; the claim does not fail."""
    queue = SQLiteQueue(sqlite_path)
    try:
        len(queue)
        body = "[" * 10_000 + "]" * 10_000
        with closing(sqlite3.connect(sqlite_path, timeout=10)) as conn, conn:
            conn.execute(f'INSERT INTO "{queue.table}" (queue, body, available_at, '
                         f"enqueued_at) VALUES (?, ?, 0, 0)", (queue.name, body))
        RAN.clear()
        engine = make_engine(queue=queue)
        after = engine.submit(FuzzAny, "after")
        burst(engine)
        assert [task_id for _, task_id, _ in RAN] == [after]
        assert queue.rejected() == [(body, "Undecodable")]
        log = main_log(engine)
        assert "dequeue failed" not in log and "reason=Undecodable" in log
    finally:
        queue.close()


def test_memory_message_nested_past_the_recursion_limit_is_rejected(make_engine):
    """Messages holding 10,000 nested lists, or objects whose repr raises, are rejected
    with their reason and logged abridged: no worker crashes."""
    deep = _deep(10_000)
    bad = [[deep, "FuzzAny"], ["deep-name", deep], ["deep-unknown", "FuzzNoSuch", deep],
           BadRepr(), ["bad-repr", "FuzzNoSuch", BadRepr()], deep]
    queue = MemoryQueue()
    for message in bad:
        queue.enqueue(message)
    RAN.clear()
    engine = make_engine(queue=queue)
    after = engine.submit(FuzzAny, "after")
    burst(engine)
    assert [task_id for _, task_id, _ in RAN] == [after]
    assert [(id(message), reason) for message, reason in queue.rejected()] == [
        (id(bad[0]), "BadTaskId"), (id(bad[1]), "UnknownTask"), (id(bad[2]), "UnknownTask"),
        (id(bad[3]), "NotAList"), (id(bad[4]), "UnknownTask"), (id(bad[5]), "TooShort")]
    log = main_log(engine)
    assert "crashed" not in log
    assert log.count(" rejected ") == len(bad)
    assert log.count("abridged: repr() raised RecursionError") >= 3
    assert "abridged: repr() raised RuntimeError" in log


def test_debug_log_of_arguments_nested_near_the_recursion_limit(make_engine, tmp_path):
    """At DEBUG, the "started" line of arguments nested as deep as JSON decodes (990
    levels) is written, abridged where the renderer cannot recurse: the task runs."""
    for fmt in ("text", "json"):
        queue = MemoryQueue()
        RAN.clear()
        engine = make_engine(queue=queue, log_level="DEBUG", log_format=fmt)
        queue.enqueue([f"deep-{fmt}", "FuzzAny", _deep(990)])  # as JSON could decode it
        burst(engine)
        assert [task_id for _, task_id, _ in RAN] == [f"deep-{fmt}"]
        assert "crashed" not in main_log(engine)


def test_submit_refuses_arguments_nested_too_deep_for_json(make_engine):
    """submit raises TypeError for an argument JSON cannot write or read back, and the
    queue is left as it was."""
    queue = MemoryQueue()
    engine = make_engine(queue=queue)
    for depth in (990, 5_000):
        with pytest.raises(TypeError, match=r"argument 0 of FuzzAny .*nested too deep"):
            engine.submit(FuzzAny, _deep(depth))
    assert len(queue) == 0


def test_shown_never_raises():
    """messages.shown is repr where repr works, an abridged form where it raises."""
    assert shown(["a", 1]) == repr(["a", 1])
    assert shown(_deep(10_000)).endswith("(abridged: repr() raised RecursionError)")
    assert "BadRepr" in shown(BadRepr())
    assert shown([1, BadRepr()]).startswith("[1, <")


def test_memory_queue_refuses_none():
    """None is no message: dequeue's None means "empty", so a stored None would vanish
    (and, taken in a batch, hang a burst run); enqueue and schedule raise TypeError."""
    queue = MemoryQueue()
    with pytest.raises(TypeError, match="cannot be None"):
        queue.enqueue(None)
    with pytest.raises(TypeError, match="cannot be None"):
        queue.schedule(None, delay=1)
    assert len(queue) == 0 and queue.scheduled_count() == 0


def test_redis_entry_with_a_priority_header_that_is_no_integer(redis_url, redis_client):
    """A ``\\xffp`` header that is no integer counts as priority 0 on both sides: the
    entry is given back to ``waiting`` (not stranded in ``waiting:<header>``), and a
    rejection keeps the message the engine saw."""
    from tempest.queues.redis import RedisQueue

    name = next(_names)
    queue = RedisQueue(redis_url, name)
    try:
        waiting = f"{queue.prefix}waiting"
        redis_client.lpush(waiting, b'\xffpabc\n["strand", "FuzzAny"]')
        message = queue.dequeue(timeout=1)
        assert message == ["strand", "FuzzAny"] and queue.attempts(message) == 0
        queue.requeue(message)  # refused by ZADD before: the entry went to waiting:abc
        assert len(queue) == 1
        again = queue.dequeue(timeout=1)
        assert again == ["strand", "FuzzAny"]
        queue.ack(again)
        assert not [key for key in redis_client.scan_iter(match=f"{queue.prefix}waiting:*")]

        # Acked after its lease ran out and it was recovered: the ack finds it where
        # recovery put it, in ``waiting`` (it looked in waiting:abc before: a rerun).
        redis_client.lpush(waiting, b'\xffpabc\n["late", "FuzzAny"]')
        message = queue.dequeue(timeout=1)
        entry = redis_client.lpop(queue._inflight)  # recovered, as by another consumer
        redis_client.lpush(waiting, entry)
        queue.ack(message)
        assert len(queue) == 0 and redis_client.llen(waiting) == 0

        # Two failed-attempts headers: the second is the message, for the engine as for
        # the rejected list (the scripts skipped both before).
        redis_client.lpush(waiting, b'\xffa1,2.5\n\xffa\n\xffp5\n["x"]')
        message = queue.dequeue(timeout=1)
        assert message == b'\xffa\n\xffp5\n["x"]'
        queue.reject(message, "Undecodable")
        assert queue.rejected() == [(b'\xffa\n\xffp5\n["x"]', "Undecodable")]
    finally:
        queue.close()
        _drop_redis(redis_client, name)
