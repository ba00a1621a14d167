"""Pure encode/decode of wire messages (JSON via msgspec).

A payload that is too large, is not JSON, does not match its schema or has
another schema version raises :class:`~torchloom.errors.DecodeError`; callers
count it and drop it.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import msgspec

from torchloom.errors import DecodeError
from torchloom.protocol.messages import SCHEMA_VERSION

MAX_MESSAGE_BYTES = 256 * 1024
"""Largest payload torchloom decodes, in bytes (NATS' own default limit is 1 MiB)."""

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(msg: Any) -> bytes:
    """Encode a message struct (or any msgspec-encodable value) to JSON bytes."""
    return _encoder.encode(msg)


def decode(data: bytes, type_: type[T], *, kind: str | None = None) -> T:
    """Decode ``data`` into ``type_`` and check its schema version.

    Args:
        data: the raw payload.
        type_: a message struct with a ``v`` field.
        kind: the name used in the error (defaults to the type's name).

    Raises:
        DecodeError: oversized, malformed, nested too deeply, wrong schema, or ``v`` not
            ``SCHEMA_VERSION``.
    """
    name = kind or type_.__name__
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(name, f"{len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        msg = dec.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(name, str(exc)) from None
    except RecursionError:  # found by tests/unit/test_fuzz.py: [[[[…]]]] thousands deep
        raise DecodeError(name, "nested too deeply") from None
    v = getattr(msg, "v", SCHEMA_VERSION)
    if v != SCHEMA_VERSION:
        raise DecodeError(name, f"schema version {v}, this side speaks {SCHEMA_VERSION}")
    return cast(T, msg)


def from_builtins(data: Any, type_: type[T], *, kind: str | None = None) -> T:
    """Convert plain dicts/lists (e.g. a reply's ``data``) into a message struct.

    Raises:
        DecodeError: the data does not fit the schema.
    """
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise DecodeError(kind or type_.__name__, str(exc)) from None


def to_builtins(msg: Any) -> Any:
    """A message as plain dicts and lists (for ``--json`` output and the HTTP API)."""
    return msgspec.to_builtins(msg)
