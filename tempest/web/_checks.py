"""Checks the command line makes before it imports the web extra."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback", "parse_auth"]


def parse_auth(auth: object) -> tuple[str, str]:
    """``"user:password"`` as (user, password); ValueError if it is not that."""
    if not isinstance(auth, str):
        raise TypeError(f"auth must be a 'user:password' str, not {auth!r}")
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("auth must be 'user:password' with a user and a password, "
                         "such as admin:s3cret")
    return user, password


def is_loopback(host: str) -> bool:
    """Whether *host* is reachable from this machine only (a name other than
    ``localhost`` counts as reachable from others: it may resolve anywhere)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
