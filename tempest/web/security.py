"""The dashboard's locks: Host and Origin checks, HTTP Basic auth, CSRF tokens, notices,
the response headers.

CSRF tokens are *signed double-submit* tokens. The first page a browser loads
sets a cookie holding a random nonce; every form carries
``HMAC-SHA256(secret, nonce)``. A POST is accepted only when its form token
matches the signature of the nonce in its cookie, compared in constant time.
Another site can make a browser send the cookie, but can neither read it nor
compute the signature without the secret, which never leaves the process.
The cookie is ``SameSite=Strict`` and ``HttpOnly`` as well.

Without auth, a dashboard on 127.0.0.1 is open to whatever can send it a
request, and *DNS rebinding* lets a web site be that: its name is made to
resolve to 127.0.0.1, and its page then reads the dashboard as "same origin".
Its requests still carry its own name in ``Host``, so :class:`TrustedHosts`
answers only requests naming a loopback address, ``localhost`` or a host the
application allows. An action is refused as well when the browser says it
comes from another site (:func:`from_elsewhere`), whatever its token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tempest.web._checks import is_loopback

__all__ = [
    "CSRF_COOKIE",
    "HEADERS",
    "NOTICE_COOKIE",
    "SECRET_ENV",
    "BasicAuth",
    "Csrf",
    "Notices",
    "SecurityHeaders",
    "TrustedHosts",
    "from_elsewhere",
    "host_name",
    "parse_hosts",
]

CSRF_COOKIE = "tempest_csrf"

NOTICE_COOKIE = "tempest_notice"
"""Carries what an action did (signed) from its redirect to the page that says it."""

SECRET_ENV = "TEMPEST_WEB_SECRET"
"""Sets the CSRF signing secret; needed only when several processes serve one dashboard."""

HEADERS = {
    # No inline script or style at all: even markup that slipped through could not run.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


class BasicAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Basic user:password``."""

    def __init__(self, app: ASGIApp, auth: str) -> None:
        self.app = app
        self.expected = auth.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an authorised request on; answer any other with 401."""
        if scope["type"] != "http" or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"www-authenticate", b'Basic realm="tempest", charset="UTF-8"'),
            (b"content-type", b"text/plain; charset=utf-8"),
            *((k.encode(), v.encode()) for k, v in HEADERS.items())]})
        await send({"type": "http.response.body", "body": b"authentication required\n"})

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, encoded = value.partition(b" ")
                if scheme.lower() != b"basic":
                    return False
                try:
                    given = base64.b64decode(encoded.strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                return hmac.compare_digest(given, self.expected)
        return False


class SecurityHeaders:
    """ASGI middleware: the headers of :data:`HEADERS` on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the headers to the response's start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)


class Csrf:
    """Issues and checks the signed double-submit tokens of one dashboard app."""

    def __init__(self, secret: bytes | None = None) -> None:
        env = os.environ.get(SECRET_ENV)
        self.secret = secret or (env.encode("utf-8") if env else secrets.token_bytes(32))

    @staticmethod
    def new_nonce() -> str:
        """A fresh cookie value."""
        return secrets.token_urlsafe(32)

    def token(self, nonce: str) -> str:
        """The form token that goes with the cookie *nonce*."""
        return hmac.new(self.secret, nonce.encode("utf-8"), hashlib.sha256).hexdigest()

    def valid(self, nonce: str | None, token: str | None) -> bool:
        """Whether *token* (from the form) is the one for *nonce* (from the cookie)."""
        if not nonce or not token:
            return False
        # As bytes: compare_digest raises TypeError for a str that is not ASCII.
        return hmac.compare_digest(self.token(nonce).encode(), token.encode("utf-8"))


class TrustedHosts:
    """ASGI middleware: 400 to a request whose ``Host`` is not this machine or an allowed host.

    Loopback addresses (``127.0.0.1``, ``[::1]``) and ``localhost`` are always
    allowed, with any port; *allowed* adds host names (any port), and ``"*"``
    allows every host, which turns the check off.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = parse_hosts(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a request for a trusted host on; answer any other with 400."""
        if scope["type"] not in ("http", "websocket") or self.trusted(
                Headers(scope=scope).get("host")):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "http.response.start", "status": 400, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            *((k.encode(), v.encode()) for k, v in HEADERS.items())]})
        await send({"type": "http.response.body", "body": (
            b"this dashboard answers requests for localhost, its loopback addresses and the "
            b"hosts named in dashboard(..., allowed_hosts=[...]) only\n")})

    def trusted(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header is answered."""
        if "*" in self.allowed:
            return True
        name = host_name(host or "")
        return name is not None and (is_loopback(name) or name in self.allowed)


def parse_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """*hosts* as :class:`TrustedHosts` compares them; TypeError or ValueError for a
    mistake (one str instead of a list, a port, a URL)."""
    if isinstance(hosts, (str, bytes)):
        raise TypeError(f"allowed_hosts takes a list of host names, such as "
                        f"[{hosts!r}], not one str")
    names = set()
    for host in hosts:
        if not isinstance(host, str):
            raise TypeError(f"allowed_hosts takes host names (str), not {host!r}")
        if host == "*":
            names.add(host)
            continue
        name = host.strip().strip("[]").lower().removesuffix(".")
        if ":" in name:
            try:
                name = str(ipaddress.IPv6Address(name))
            except ValueError:
                raise ValueError(f"allowed_hosts takes host names without a scheme or a "
                                 f"port, such as 'dash.example.com', not {host!r}") from None
        elif not name or any(c in name for c in "/@ \t") or not name.isascii():
            raise ValueError(f"allowed_hosts takes host names, such as 'dash.example.com' "
                             f"(IDNA-encoded), not {host!r}")
        names.add(name)
    return frozenset(names)


def host_name(host: str) -> str | None:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``): lowercase,
    without its port, brackets or final dot; None when the header is not of that form."""
    split = _host_and_port(host)
    return split[0] if split else None


def from_elsewhere(request: Request) -> bool:
    """Whether the browser says another site's page sent *request*: ``Sec-Fetch-Site:
    cross-site``, or an ``Origin`` that is not the request's own (its host and port, as
    the ``Host`` header names them; ``Origin: null`` is never its own)."""
    headers = request.headers
    if headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    scheme, sep, netloc = origin.strip().partition("://")
    theirs = _host_and_port(netloc) if sep and scheme.lower() in ("http", "https") else None
    ours = _host_and_port(headers.get("host", ""))
    if theirs is None or ours is None:
        return True
    return _site(*theirs, scheme.lower()) != _site(*ours, request.url.scheme)


def _host_and_port(host: str) -> tuple[str, int | None] | None:
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
        try:
            name = str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    else:
        name, colon, port_text = host.partition(":")
        port = port_text if colon else None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    name = name.lower().removesuffix(".")
    return (name, int(port) if port is not None else None) if name else None


def _site(name: str, port: int | None, scheme: str) -> tuple[str, int | None]:
    # A port left out and the scheme's default are the same. Behind a proxy that speaks
    # HTTPS the Origin says https and the request http: neither usually names a port.
    return name, None if port == (443 if scheme in ("https", "wss") else 80) else port


class Notices:
    """Signs what an action did, for the page its redirect leads to (a cookie that no
    other site can forge: a link cannot make the dashboard say anything)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def seal(self, notice: dict[str, str]) -> str:
        """*notice* as a cookie value."""
        body = base64.urlsafe_b64encode(json.dumps(notice).encode("utf-8")).decode("ascii")
        return f"{body}.{self._sign(body)}"

    def open(self, sealed: str | None) -> dict[str, str] | None:
        """The notice of a cookie value, or None when it is missing or not one of ours."""
        if not sealed or len(sealed) > 4096:
            return None
        body, _, signature = sealed.rpartition(".")
        if not hmac.compare_digest(self._sign(body).encode(), signature.encode("utf-8")):
            return None
        try:
            notice = json.loads(base64.urlsafe_b64decode(body.encode("ascii")))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(notice, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in notice.items()):
            return None
        return notice

    def _sign(self, body: str) -> str:
        # The CSRF tokens' secret, under a prefix of its own: a notice's signature must
        # never be a valid token for some cookie nonce, nor the other way round.
        return hmac.new(self.secret, b"notice\0" + body.encode("utf-8"),
                        hashlib.sha256).hexdigest()
