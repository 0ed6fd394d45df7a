"""Limits on what the ledger accepts, checks for the strings it stores, a safe form of hostile text.

Every string that reaches a column or a JSON document must be storable on both backends: Postgres
refuses NUL characters in text and JSONB, and lone surrogates have no UTF-8 form at all. Names must
also fit their columns. Checking here, before anything is written, turns what would be a
``StorageError`` (HTTP 500 in the approvals app) on Postgres into a clear ``InvalidArguments`` or 4xx,
and makes SQLite refuse the same inputs.
"""

from __future__ import annotations

import functools

from .errors import InvalidArguments

__all__ = [
    "DEFAULT_AUDIT_INTERVAL",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_APPROVAL_ID",
    "MAX_NAME",
    "MAX_REASON",
    "check_name",
    "check_text",
    "printable",
    "storable",
    "text_problem",
]

MAX_NAME = 255
"""Characters in a workflow id, a tool name, a decider (``by``) or a webhook message id."""
MAX_APPROVAL_ID = 40
"""Characters in an approval id (the ledger's own are ``apr_`` + 32 hex digits)."""
MAX_REASON = 4000
"""Characters in the reason given with a decision."""
DEFAULT_MAX_BODY_BYTES = 256 * 1024
"""Largest request body the approvals app reads (Slack interaction payloads are a few kilobytes)."""
DEFAULT_AUDIT_INTERVAL = 60.0
"""Seconds between two audit rows of the same unauthenticated refusal (endpoint and status)."""


def text_problem(value: object, limit: int, *, allow_empty: bool = False) -> str | None:
    """Why ``value`` cannot be stored as a string of at most ``limit`` characters, or None if it can."""
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    if not value and not allow_empty:
        return "is empty"
    if len(value) > limit:
        return f"is {len(value)} characters long, over the limit of {limit}"
    if "\x00" in value:
        return "holds a NUL character, which Postgres cannot store"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate, which is not valid Unicode"
    return None


def check_text(value: object, what: str, limit: int, *, allow_empty: bool = False) -> str:
    """``value`` if it is a storable string of at most ``limit`` characters, else ``InvalidArguments``."""
    problem = text_problem(value, limit, allow_empty=allow_empty)
    if problem is not None:
        raise InvalidArguments(f"{what} '{printable(value, 80)}' {problem}")
    assert isinstance(value, str)
    return value


@functools.lru_cache(maxsize=4096)
def check_name(value: str, what: str) -> None:
    """Refuse a workflow id or tool name that could not be stored (cached: calls repeat them)."""
    check_text(value, what, MAX_NAME)


def printable(value: object, limit: int = 200) -> str:
    """A form of ``value`` safe to store and to print: cut to ``limit`` characters, and every character
    that is not printable (NUL, lone surrogates, terminal escapes, bidirectional overrides) except
    newlines and tabs written as a Python escape (``\\x00``, ``\\ud800``, ``\\x1b``, ``\\u202e``)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c in "\n\t" else _escape(c) for c in text)
    return text


def storable(text: str) -> str:
    """``text`` with only what no backend can store escaped: NUL (``\\x00``) and lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")
