"""A module whose engine has a mistyped configure option: ConfigurationError at import."""

from __future__ import annotations

from tempest import Engine


class CliBadEngine(Engine):
    class configure:
        thread = 4  # the option is ``threads``
