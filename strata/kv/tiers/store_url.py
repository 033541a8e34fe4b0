"""Remote store URLs: what redis-py is given, and what may be shown (logs, reports).

Both are pure string functions, importable without redis-py.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_SCHEMES = {"valkey://": "redis://", "valkeys://": "rediss://"}


def redact_url(url: str) -> str:
    """The URL as it may be shown: its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redis_url(url: str) -> str:
    """The URL redis-py understands: valkey:// and valkeys:// map to redis:// and rediss://."""
    for scheme, replacement in _SCHEMES.items():
        if url.startswith(scheme):
            return replacement + url[len(scheme) :]
    return url
