"""Arguments to JSON, JSON to canonical bytes (RFC 8785), bytes to keys. Pure: no I/O.

The key of a call is ``v1:`` + SHA-256 of the canonical JSON of ``{"v": 1, "workflow_id", "tool",
"args"}`` where ``args`` are the (possibly key-subset) normalised arguments. The payload hash is the same
over the *full* normalised arguments and the tool, so a key-subset tool can still tell a changed payload.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import rfc8785
from pydantic import BaseModel

from .errors import InvalidArguments

__all__ = [
    "DEFAULT_MAX_ARGS_BYTES",
    "KEY_VERSION",
    "MAX_DEPTH",
    "canonical",
    "compute_key",
    "diff_fields",
    "key_from_canonical",
    "normalise",
    "payload_from_canonical",
    "payload_hash",
    "redacted",
    "Redaction",
    "REDACTED_TEXT",
]

KEY_VERSION = 1
DEFAULT_MAX_ARGS_BYTES = 1024 * 1024
_SAFE_INT = 2**53 - 1


MAX_DEPTH = 100
"""Levels of nesting (dicts, lists) allowed in arguments: deeper values are refused."""
_MAX_INT_BITS = 13_000
"""Bits of the largest integer argument, about 3,900 digits (Python's own int-to-str limit is 4300)."""
_TAGS = frozenset({"$bytes", "$int", "$redacted"})
"""Keys of the one-member objects that stand for values JSON has no form of (bytes, big ints,
redacted values). A literal key equal to one of them, or starting with ``$$``, gets one more ``$``
in front, so a literal ``{"$bytes": "AAA="}`` and ``b"\\0\\0"`` never share a key."""


def _escaped_key(key: str) -> str:
    """A literal dict key as stored: ``$`` doubled in front of a tag name or of a key starting ``$$``."""
    if key[:1] == "$" and (key in _TAGS or key[:2] == "$$"):
        return "$" + key
    return key


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "holds a NUL character (\\x00), which Postgres cannot store"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate, which is not valid Unicode and has no JSON form"
    return None


def normalise(value: Any, path: str = "args") -> Any:
    """Map ``value`` to plain JSON (dict/list/str/int/float/bool/None), or raise ``InvalidArguments``.

    datetime -> UTC RFC 3339 (naive datetimes are refused: their instant is ambiguous), date -> ISO date,
    time -> ISO time, UUID -> str, Decimal -> str, Enum -> its value, bytes -> ``{"$bytes": base64}``,
    set/frozenset -> sorted list, tuple -> list, dataclass -> dict of fields, pydantic model ->
    ``model_dump(mode="json")``, ints beyond 2**53 -> ``{"$int": "digits"}`` (JSON numbers lose them).
    A literal dict key that could be read as one of those tags (``$bytes``, ``$int``, ``$redacted``, or
    any key starting with ``$$``) is stored with one more ``$`` in front, so no literal dict reads as a tag.
    Refused: strings holding NUL or a lone surrogate, nesting deeper than ``MAX_DEPTH``, integers of
    more than 13,000 bits (about 3,900 digits).
    """
    try:
        return _normalise(value, path, 0)
    except RecursionError as exc:  # a pydantic model or dataclass that refers to itself
        raise InvalidArguments(f"{path} nests too deeply to have a JSON form", path=path) from exc


def _normalise(value: Any, path: str, depth: int) -> Any:
    if type(value) is int and -_SAFE_INT <= value <= _SAFE_INT:  # the commonest values first, by exact type
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if "\x00" in value or not value.isascii():  # inline: most strings are ASCII without NUL
            problem = _string_problem(value)
            if problem is not None:
                raise InvalidArguments(f"{path} {problem}", path=path)
        return value
    if isinstance(value, enum.Enum):
        return _normalise(value.value, path, depth)
    if isinstance(value, int):
        if -_SAFE_INT <= value <= _SAFE_INT:
            return int(value)
        if value.bit_length() > _MAX_INT_BITS:
            raise InvalidArguments(f"{path} is an integer of more than {_MAX_INT_BITS} bits", path=path)
        return {"$int": str(int(value))}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArguments(f"{path} is {value!r}: NaN and infinities have no JSON form", path=path)
        return value
    if depth >= MAX_DEPTH and isinstance(value, (Mapping, list, tuple, set, frozenset)):
        raise InvalidArguments(f"{path} nests more than {MAX_DEPTH} levels deep", path=path)
    if type(value) is dict or isinstance(value, Mapping):  # (an ABC check costs more than the dict's own)
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArguments(
                    f"{path} has a key of type {type(k).__name__} ({k!r}): dict keys must be strings",
                    path=path,
                )
            name = k
            if k[:1] == "$" or "\x00" in k or not k.isascii():  # inline: most keys are plain ASCII names
                problem = _string_problem(k)
                if problem is not None:
                    raise InvalidArguments(f"{path} has a key {k!r} that {problem}", path=path)
                name = _escaped_key(k)
            out[name] = _normalise(v, f"{path}.{k}", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_normalise(v, f"{path}{{}}", depth + 1) for v in value]
        return sorted(items, key=canonical)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArguments(
                f"{path} is a naive datetime ({value.isoformat()}): give it a timezone "
                f"(e.g. datetime.now(timezone.utc)) so the instant is unambiguous",
                path=path,
            )
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidArguments(f"{path} is Decimal({str(value)!r}): it has no JSON form", path=path)
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, BaseModel):
        return _normalise(value.model_dump(mode="json"), path, depth)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _normalise(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)},
            path,
            depth,
        )
    raise InvalidArguments(
        f"{path} has type {type(value).__module__}.{type(value).__qualname__}, which has no canonical "
        f"JSON form: pass JSON values, datetimes, UUIDs, Decimals, Enums, bytes, sets, tuples, "
        f"dataclasses or pydantic models",
        path=path,
    )


def _plain(value: Any) -> bool:
    """True when ``json.dumps`` is already RFC 8785 for this value: no floats (ECMAScript number
    formatting differs) and ASCII object keys (UTF-16 and code-point sort orders agree on them)."""
    if isinstance(value, str) or value is None or isinstance(value, (bool, int)):
        return not isinstance(value, float)
    if isinstance(value, dict):
        return all(k.isascii() and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return False


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def acyclic_encoder(*, canonical: bool) -> Callable[[Any], str]:
    """A JSON encoder built once, for values that cannot hold a cycle (normalised arguments, the
    ledger's own audit details): ``canonical`` gives sorted keys, no spaces and no ASCII escaping (the
    bytes of RFC 8785 for the values ``canonical()`` hands it); otherwise exactly ``json.dumps(value)``.

    On CPython the C encoder itself is reused: ``JSONEncoder.encode`` builds a new one, and a dict to
    track cycles, on every call, which costs twice what encoding a small payload does. A cycle given to
    it anyway ends in ``RecursionError``, never a hang.
    """
    make = getattr(json.encoder, "c_make_encoder", None)  # CPython's C encoder (not in the type stubs)
    if make is None:  # pragma: no cover - Pythons without the C accelerator
        if canonical:
            return json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
        return json.dumps
    if canonical:
        encode = make(None, _refuse, json.encoder.encode_basestring, None, ":", ",", True, False, True)
    else:
        encode = make(None, _refuse, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)

    def dumps(value: Any) -> str:
        return "".join(encode(value, 0))

    return dumps


_ENCODE = acyclic_encoder(canonical=True)


def canonical(value: Any) -> bytes:
    """RFC 8785 canonical JSON bytes of an already-normalised value.

    Values without floats and with ASCII keys take the C JSON encoder, whose output is the same bytes
    (same escapes, sorted keys, no spaces); everything else goes through ``rfc8785``. A property test
    checks the two agree.
    """
    if _plain(value):
        try:
            return _ENCODE(value).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: let rfc8785 decide
            pass
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:  # pragma: no cover - normalise() prevents these
        raise InvalidArguments(f"arguments cannot be canonicalised: {exc}") from exc


def _hex(data: bytes) -> str:
    return f"v{KEY_VERSION}:" + hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=4096)
def _canonical_name(name: str) -> bytes:
    """Canonical JSON of a workflow id or tool name (cached: every call of a workflow repeats them)."""
    return canonical(name)


def key_from_canonical(workflow_id: str, tool: str, key_args: bytes) -> str:
    """``compute_key`` from the canonical bytes of the (key) arguments, computed once by the caller.

    RFC 8785 sorts members by name, so the envelope ``{"args", "tool", "v", "workflow_id"}`` can be
    assembled around bytes already canonical: the result is byte for byte ``canonical({...})``.
    """
    return _hex(
        b'{"args":'
        + key_args
        + b',"tool":'
        + _canonical_name(tool)
        + b',"v":1,"workflow_id":'
        + _canonical_name(workflow_id)
        + b"}"
    )


def payload_from_canonical(tool: str, args: bytes) -> str:
    """``payload_hash`` from the canonical bytes of the full arguments."""
    return _hex(b'{"args":' + args + b',"tool":' + _canonical_name(tool) + b',"v":1}')


def compute_key(workflow_id: str, tool: str, key_args: Mapping[str, Any]) -> str:
    """The deterministic key of a call: versioned SHA-256 of workflow id, tool and (normalised) args."""
    return _hex(canonical({"v": KEY_VERSION, "workflow_id": workflow_id, "tool": tool, "args": key_args}))


def payload_hash(tool: str, args: Mapping[str, Any]) -> str:
    """Hash of the full normalised payload (tool + all args); approvals and mismatches compare it."""
    return _hex(canonical({"v": KEY_VERSION, "tool": tool, "args": args}))


def redacted(value: Any, key: bytes | None = None) -> dict[str, str]:
    """What is stored instead of a redacted argument: its HMAC-SHA256 under the ledger's redaction key.

    Equal values give equal hashes, so a changed redacted argument is still detected (and named), while
    the value itself never reaches the database. The ledger always passes its key (``redact=`` without
    ``Ledger(redaction_key=...)`` is refused): a plain hash of a low-entropy value (a PIN, a card
    number) is reversed by enumeration. Without ``key`` this returns that plain hash.
    """
    data = canonical(value)
    if key:
        return {"$redacted": "hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest()}
    return {"$redacted": "sha256:" + hashlib.sha256(data).hexdigest()}


REDACTED_TEXT = "[redacted]"
"""What replaces a redacted value's text in recorded error messages, tracebacks and result reprs."""


def _texts(value: Any, out: set[str]) -> None:
    """The texts a value shows in messages: ``str`` and ``repr`` of it and of every leaf inside it."""
    if value is None or isinstance(value, bool):
        return  # "None"/"True"/"False" are everywhere in tracebacks; such a value is one bit anyway
    if isinstance(value, Mapping):
        for v in value.values():
            _texts(v, out)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _texts(v, out)
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.add(repr(raw))
        out.add(raw.decode("utf-8", "replace"))
        out.add(base64.b64encode(raw).decode("ascii"))
        return
    for text in (str, repr):
        with contextlib.suppress(Exception):  # a str/repr that raises: nothing to scrub
            out.add(text(value))


@dataclasses.dataclass(frozen=True)
class Redaction:
    """One call's redacted arguments: how they are hashed, and the texts to scrub from records.

    The key and the payload hash of a call are computed over its arguments with each redacted value
    replaced by ``redacted(value, key)`` (the form stored in ``args``), so nothing stored or sent
    about the call can be checked against a guessed value without the redaction key.
    """

    names: frozenset[str]
    key: bytes
    texts: tuple[str, ...] = ()
    """The redacted values as text (longest first), removed from errors, tracebacks and reprs."""

    @classmethod
    def of(
        cls, names: tuple[str, ...], key: bytes, call_args: Mapping[str, Any], normalised: Mapping[str, Any]
    ) -> Redaction:
        """The redaction of one call (its values' texts collected from the given and normalised args)."""
        found: set[str] = set()
        for name in names:
            if name in call_args:
                _texts(call_args[name], found)
            if name in normalised:
                value = normalised[name]
                _texts(value, found)
                if isinstance(value, (dict, list)):
                    found.add(canonical(value).decode("utf-8", "replace"))
                    found.add(json.dumps(value))
        found.discard("")
        return cls(frozenset(names), key, tuple(sorted(found, key=len, reverse=True)))

    def args(self, normalised: Mapping[str, Any]) -> dict[str, Any]:
        """The normalised arguments with each redacted value replaced by its keyed hash."""
        return {k: (redacted(v, self.key) if k in self.names else v) for k, v in normalised.items()}

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of a redacted value's text replaced by ``[redacted]``."""
        for secret in self.texts:
            if secret in text:
                text = text.replace(secret, REDACTED_TEXT)
        return text


def diff_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Names of the top-level arguments whose normalised values differ between two payloads."""
    if old is None:
        return []
    names = sorted(set(old) | set(new))
    return [n for n in names if n not in old or n not in new or canonical(old[n]) != canonical(new[n])]
