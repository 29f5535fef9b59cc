"""Errors of the sans-I/O protocol layer.

As in h11: ``RemoteProtocolError`` means the peer broke the protocol (answer with a handshake
error, a Close message or an HTTP 4xx); ``LocalProtocolError`` means this side was asked to do
something the protocol does not allow (a bug in the caller). Every message says what was wrong
and what was expected.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised by ``relaycore.protocol``."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class LocalProtocolError(ProtocolError):
    """This side was asked to send something the protocol does not allow."""
