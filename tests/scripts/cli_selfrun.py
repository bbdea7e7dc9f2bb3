"""A module that runs its engine itself at import (no ``if __name__ == '__main__':``)."""

from __future__ import annotations

from tempest import Engine


class CliSelfRunEngine(Engine):
    class configure:
        threads = 1
        report_every = None


CliSelfRunEngine.run(burst=True)
