"""tempest's quick start: three tasks, one engine, both logs.

Run it from anywhere::

    python examples/quickstart.py

It writes MathTempest.log (one line per outcome) and MathTempest.task.log
(what each task logged, every line prefixed with its task id) in the current
directory, then prints a summary. Try ``grep <task_id> MathTempest.task.log``
with an id from the main log.
"""

from __future__ import annotations

import random

from tempest import Engine, Task
from tempest.queues import MemoryQueue


class MathTempest(Engine):
    class configure:
        threads = 2
        queue = MemoryQueue()
        log_level = "DEBUG"  # the task log then also shows each task's start and arguments

        def after_failure(task, exc):  # engine-wide: called after the task's own callback
            print(f"  ! {task.task_name} {task.task_id} failed: {exc!r}")


class Adder(Task):
    def process(self, a, b):
        c = a + b
        self.task_logger.info(f"{a} + {b} = {c}")
        return c


class Averager(Task):
    class configure:
        timeout = 1.5  # seconds; overrides the engine's default

    def process(self, *numbers):
        return sum(numbers) / len(numbers)  # no numbers: ZeroDivisionError, a failure

    def after_success(self, result):
        self.task_logger.info("average computed", numbers=list(self.args), average=result)

    def after_failure(self, exc):
        self.task_logger.warning("could not average", numbers=list(self.args))


class Fibonacci(Task):
    """Deliberately slow: fib(35) takes longer than its half-second limit."""

    class configure:
        timeout = 0.5

    def process(self, n):
        def fib(k):
            return k if k < 2 else fib(k - 1) + fib(k - 2)

        return fib(n)

    def after_timeout(self):
        self.task_logger.warning("gave up", n=self.args[0])


if __name__ == "__main__":
    for _ in range(10):
        MathTempest.submit(Adder, random.randrange(10), random.randrange(10))
    MathTempest.submit(Averager, 2, 4, 6)
    MathTempest.submit(Averager)
    MathTempest.submit(Fibonacci, 20)
    slow = MathTempest.submit(Fibonacci, 35)

    # burst=True: return once the queue is empty and no task runs. Without it,
    # run() serves until SIGTERM or Ctrl-C (a second Ctrl-C stops at once).
    MathTempest.run(burst=True)

    stats = MathTempest.stats()
    print(f"processed {stats['processed']}: {stats['succeeded']} succeeded, "
          f"{stats['failed']} failed, {stats['timed_out']} timed out")
    print("main log: MathTempest.log    task log: MathTempest.task.log")
    print(f"the story of the slow task: grep {slow} MathTempest.task.log")
