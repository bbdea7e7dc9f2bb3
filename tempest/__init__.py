"""tempest: an embeddable thread-pool task engine with pluggable queues.

Subclass :class:`Engine`, give it a ``class configure:`` block, write
:class:`Task` classes with a ``process`` method, ``submit`` work from
anywhere and ``run()`` the engine.
"""

from tempest.engine import Engine
from tempest.exceptions import (
    ConfigurationError,
    Retry,
    TaskFailed,
    TaskTimeout,
    TempestError,
    TooManyAbandoned,
    UnknownTask,
    Unsupported,
)
from tempest.periodic import cron, every
from tempest.task import Task

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "Engine",
    "Retry",
    "Task",
    "TaskFailed",
    "TaskTimeout",
    "TempestError",
    "TooManyAbandoned",
    "UnknownTask",
    "Unsupported",
    "__version__",
    "cron",
    "every",
]
