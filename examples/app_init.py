"""Loading an application before the engine starts.

``before_initialize`` runs first, before anything else in start-up, so it
can load what the rest needs: here a settings object and a database. Options
given as callables (``log_dir``) are evaluated *after* it, so they may use
what it loaded. ``after_initialize`` runs once the logs are open, just before
the workers start. Run it::

    python examples/app_init.py

It writes its logs under a temporary folder chosen by the "application" and
prints where.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tempest import Engine, Task


@dataclass
class Application:
    """Stands in for a framework's app object (settings, connections, ...)."""

    log_dir: Path
    db: sqlite3.Connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, word: str, length: int) -> None:
        with self.lock:  # one connection shared by the worker threads
            self.db.execute("INSERT INTO words VALUES (?, ?)", (word, length))


app: Application | None = None


def load_application(engine: type[Engine]) -> None:
    global app
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("CREATE TABLE words (word TEXT, length INTEGER)")
    app = Application(log_dir=Path(tempfile.mkdtemp(prefix="tempest-app-")), db=db)


def announce(engine: type[Engine]) -> None:
    print(f"{engine.__name__} is up; logs in {app.log_dir}")


class WordTempest(Engine):
    class configure:
        threads = 4
        before_initialize = load_application
        after_initialize = announce
        log_dir = lambda: app.log_dir  # noqa: E731 - evaluated after before_initialize


class MeasureWord(Task):
    def process(self, word):
        app.record(word, len(word))
        self.task_logger.info("measured", word=word, length=len(word))


if __name__ == "__main__":
    for word in ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]:
        WordTempest.submit(MeasureWord, word)
    WordTempest.run(burst=True)
    rows = app.db.execute("SELECT COUNT(*), SUM(length) FROM words").fetchone()
    print(f"{rows[0]} words recorded, {rows[1]} letters in all")
