"""The web console's authentication, importable without the ``console`` extra.

``ConsoleAuth`` says who may use the console: per-user tokens (``users={"alice": TOKEN}``, sent as
``Authorization: Bearer TOKEN`` by scripts, or typed into the login form, which sets a signed session
cookie) and/or a trusted header set by an SSO reverse proxy (``trusted_header="X-Forwarded-User"``).
The app itself (``Ledger.console_app``) lives in ``_app`` and imports Starlette and Jinja2 only when it
is built, so ``import agent_ledger`` loads neither.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping

from .._text import MAX_NAME, text_problem
from ..errors import ConfigurationError

__all__ = ["MIN_TOKEN", "ConsoleAuth", "read_users"]

MIN_TOKEN = 16
"""Fewest characters in a user's token (e.g. ``python -c 'import secrets; print(secrets.token_urlsafe())'``)."""


class ConsoleAuth:
    """Who may use the console, and the key its session cookies and CSRF tokens are signed with.

    ``users`` maps each user name to their token (at least 16 characters). ``trusted_header`` names a
    request header that a reverse proxy in front of the console sets to the signed-in user's name (the
    proxy must strip it from what clients send, and the console must be reachable only through the
    proxy). At least one of the two is required: the console never runs without authentication.
    ``secret_key`` signs session cookies and CSRF tokens (default: random per process, so sessions end
    when the process restarts); ``session_seconds`` is how long a login lasts.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        trusted_header: str | None = None,
        secret_key: str | bytes | None = None,
        session_seconds: int = 12 * 3600,
    ) -> None:
        chosen = dict(users or {})
        for name, token in chosen.items():
            problem = text_problem(name, MAX_NAME)
            if problem is not None or ":" in name or name != name.strip():
                raise ConfigurationError("a console user name must be 1-255 characters, without ':' or edge spaces")
            if not isinstance(token, str) or len(token) < MIN_TOKEN or not token.isprintable() or " " in token:
                raise ConfigurationError(
                    f"the token of console user {name!r} must be at least {MIN_TOKEN} printable characters "
                    "without spaces (e.g. secrets.token_urlsafe())"
                )
        if trusted_header is not None:
            header = trusted_header.strip()
            if not header or not header.isascii() or any(c in header for c in " :\r\n\t"):
                raise ConfigurationError(f"trusted_header must be a header name, not {trusted_header!r}")
            trusted_header = header.lower()
        if not chosen and trusted_header is None:
            raise ConfigurationError(
                "the console needs authentication: users={name: token} and/or trusted_header='X-Forwarded-User'"
            )
        if secret_key is None:
            key = secrets.token_bytes(32)
        elif isinstance(secret_key, (str, bytes)):
            key = secret_key.encode() if isinstance(secret_key, str) else secret_key
            if len(key) < 32:
                raise ConfigurationError("secret_key must be at least 32 bytes (e.g. secrets.token_hex(32))")
        else:
            raise ConfigurationError("secret_key must be a str or bytes secret")
        if isinstance(session_seconds, bool) or not isinstance(session_seconds, int) or session_seconds <= 0:
            raise ConfigurationError(f"session_seconds must be a positive int, not {session_seconds!r}")
        self._tokens = {name: hashlib.sha256(token.encode()).digest() for name, token in chosen.items()}
        self.trusted_header = trusted_header
        """The lower-cased header an SSO proxy sets to the user's name, or None."""
        self.secret_key = key
        self.session_seconds = session_seconds

    def __repr__(self) -> str:  # never the tokens nor the key
        return f"ConsoleAuth(users={sorted(self._tokens)!r}, trusted_header={self.trusted_header!r})"

    @property
    def users(self) -> list[str]:
        """The names of the users with a token."""
        return sorted(self._tokens)

    def user_for_token(self, token: str) -> str | None:
        """The user whose token this is, or None (compared in constant time with every user's)."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    def check(self, user: str, token: str) -> bool:
        """Whether ``token`` is ``user``'s token."""
        expected = self._tokens.get(user)
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        matches = hmac.compare_digest(digest, expected or bytes(32))  # as long for an unknown user
        return expected is not None and matches

    def has_user(self, user: str) -> bool:
        """Whether ``user`` has a token (a session of a removed user is no longer valid)."""
        return user in self._tokens

    def csrf_token(self, binding: str) -> str:
        """The CSRF token for a session id (or a trusted-header user): an HMAC under the secret key."""
        return hmac.new(self.secret_key, f"csrf|{binding}".encode("utf-8", "surrogateescape"), "sha256").hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: object) -> ConsoleAuth:
        """``ConsoleAuth`` with the users of a file of ``name:token`` lines (see ``read_users``)."""
        return cls(read_users(path), **options)  # type: ignore[arg-type]


def read_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """Users from a file of ``name:token`` lines (blank lines and ``#`` comments are skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read the users file {os.fspath(path)!r}: {type(e).__name__}") from None
    users: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep or not name.strip() or not token.strip():
            raise ConfigurationError(f"{os.fspath(path)}:{n}: expected name:token")  # never the line itself
        if name.strip() in users:
            raise ConfigurationError(f"{os.fspath(path)}:{n}: user {name.strip()!r} appears twice")
        users[name.strip()] = token.strip()
    return users
