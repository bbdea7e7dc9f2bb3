"""A module that fails at import with an error of its own (not an ImportError)."""

from __future__ import annotations

from tempest import Engine


class CliBrokenEngine(Engine):
    pass


RATIO = 1 / 0
