"""Keeping credentials out of error messages, log lines, audit rows and CLI output. Pure: no I/O.

``hide_url`` masks one URL (its password or bare user-info token, and query values whose names look
like credentials), parsed or not. ``hide`` masks every URL inside a text, and every database password
this process has seen (``remember``), in case a driver quotes one outside a URL.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MASK", "hide", "hide_url", "password_of", "remember"]

MASK = "***"
_SENSITIVE = re.compile(r"pass|pwd|secret|token|key|sig|auth|credential|session|cookie|code", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_QUERY_PAIR = re.compile(r"([?&;#])([^=&;#]*)=([^&;#]*)")
_known: set[str] = set()
_MIN_REMEMBERED = 4  # shorter passwords are only masked inside URLs: removing "pw" everywhere mangles text


def remember(secret: str | None) -> None:
    """Mask this secret (a database password, raw and %-decoded) in every later ``hide``."""
    if not secret:
        return
    for form in (secret, unquote(secret)):
        if len(form) >= _MIN_REMEMBERED:
            _known.add(form)


def password_of(url: str) -> str | None:
    """The password part of a URL's user info (as written, still %-encoded), even when it does not parse."""
    rest = _SCHEME.sub("", url, count=1)
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" not in head:
        return None
    userinfo = head.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def hide_url(url: str) -> str:
    """``url`` with its user info masked (``user:***@``, or ``***@`` for a bare token) and the values of
    credential-like query parameters (``password``, ``token``, ``key``, ``sig``, ...) replaced by ``***``."""
    scheme = _SCHEME.match(url)
    prefix = scheme.group(0) if scheme else ""
    rest = url[len(prefix) :]
    cut = re.search(r"[?#]", rest)
    head, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    if "@" in head:
        userinfo, host = head.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        head = (f"{user}:{MASK}" if user else MASK) + "@" + host
    tail = _QUERY_PAIR.sub(lambda m: m.group(0) if not _SENSITIVE.search(m.group(2)) else f"{m[1]}{m[2]}={MASK}", tail)
    return prefix + head + tail


def hide(text: str) -> str:
    """``text`` with every URL in it passed through ``hide_url`` and every remembered password masked."""
    if "://" in text:
        text = _URL.sub(lambda m: hide_url(m.group(0)), text)
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text
