"""tempest's web dashboard: see and act on every engine and queue, from a browser.

``tempest web MODULE:ENGINE`` serves it; :func:`dashboard` gives the ASGI app
to mount in an application of one's own (FastAPI, Starlette)::

    from fastapi import FastAPI
    from tempest.web import dashboard
    from myapp.tasks import MathTempest

    app = FastAPI()
    app.mount("/tempest", dashboard(MathTempest, auth="admin:s3cret"))

Needs the ``web`` extra: ``pip install 'task-tempest[web]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tempest.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from starlette.applications import Starlette

    from tempest.engine import Engine

__all__ = ["dashboard"]


def dashboard(engine: type[Engine], *, read_only: bool = False, auth: str | None = None,
              allowed_hosts: Iterable[str] | None = None) -> Starlette:
    """The dashboard of *engine* (an Engine subclass), as a Starlette (ASGI) app.

    It reads the engine's queue -- shared with every engine on it, on Redis,
    PostgreSQL or SQLite -- and the engine class's periodic schedules; its
    ``/metrics`` page adds the counters of the engine when it runs in this
    process. Pages whose queue method is missing say "not available for this
    queue".

    *read_only*: no retry or delete button, and every action is refused (403).
    *auth*: ``"user:password"``; every request then needs HTTP Basic auth with
    them (ValueError if it is not of that form). Every action is a POST with a
    CSRF token, refused (403) when the browser says another site sent it.

    *allowed_hosts*: host names (any port; ``"*"`` for any host) that requests
    may name in their ``Host`` header besides ``localhost`` and the loopback
    addresses; any other gets 400. Without *auth* the check is always made: it
    keeps out web sites that make their name resolve to 127.0.0.1 (DNS
    rebinding). With *auth* it is made only when *allowed_hosts* is given.
    Mounted under a public name without *auth* (behind a proxy that
    authenticates), list that name. TypeError or ValueError for a list that is
    not of host names.

    Raises ConfigurationError when the ``web`` extra is missing.
    """
    try:
        from tempest.web.app import build  # noqa: PLC0415 - the extra may be missing
    except ImportError as exc:
        raise ConfigurationError(
            f"the dashboard needs the web extra ({exc.name or exc} is missing): "
            f"pip install 'task-tempest[web]'") from None
    return build(engine, read_only=read_only, auth=auth, allowed_hosts=allowed_hosts)
