"""The dashboard's locks: HTTP Basic auth, CSRF tokens, the response headers.

CSRF tokens are *signed double-submit* tokens. The first page a browser loads
sets a cookie holding a random nonce; every form carries
``HMAC-SHA256(secret, nonce)``. A POST is accepted only when its form token
matches the signature of the nonce in its cookie, compared in constant time.
Another site can make a browser send the cookie, but can neither read it nor
compute the signature without the secret, which never leaves the process.
The cookie is ``SameSite=Strict`` and ``HttpOnly`` as well.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSRF_COOKIE", "HEADERS", "SECRET_ENV", "BasicAuth", "Csrf", "SecurityHeaders"]

CSRF_COOKIE = "tempest_csrf"

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
        return hmac.compare_digest(self.token(nonce), token)
