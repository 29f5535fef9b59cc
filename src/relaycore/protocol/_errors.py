"""Errors of the sans-I/O protocol layer.

As in h11: ``RemoteProtocolError`` means the peer broke the protocol (answer with a handshake
error, a Close message or an HTTP 4xx); ``LocalProtocolError`` means this side was asked to do
something the protocol does not allow (a bug in the caller). Every message says what was wrong
and what was expected.
"""

from __future__ import annotations

import reprlib
from typing import Any


class ProtocolError(Exception):
    """Base class of every error raised by ``relaycore.protocol``."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """This side was asked to send something the protocol does not allow."""


#: How received values are quoted in error messages: a few levels, a few items, short strings,
#: so that neither a 60 KB string nor a value nested a thousand deep makes a long (or a
#: recursive) error text.
_SHOWN = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHOWN.maxlevel = 3
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = 4
_SHOWN.maxstring = _SHOWN.maxother = 50
_SHOWN.maxlong = 40
_SHOW_LIMIT = 60


def show_value(value: Any) -> str:
    """A received value described for an error message: its type and a short, bounded repr."""
    text = _SHOWN.repr(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 3] + "..."
    return f"{type(value).__name__} {text}"


def unpack_error_text(exc: Exception) -> str:
    """Why a MessagePack body did not unpack, for an error message: msgpack's own text, or
    for its nesting limit (a ``StackError`` has no text) what it means."""
    if type(exc).__name__ == "StackError":
        return "values nested too deeply"
    return str(exc) or type(exc).__name__
