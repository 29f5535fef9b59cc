"""Sans-I/O WebSocket framing and close handshake (RFC 6455 §5-§7).

Bytes go in through :meth:`WebSocketProtocol.receive_data` and
:meth:`WebSocketProtocol.receive_eof`; events come out of
:meth:`WebSocketProtocol.events_received` and bytes to write out of
:meth:`WebSocketProtocol.data_to_send`. Nothing here touches a socket, a clock or a random
source: a client's mask keys come from a callable the driver passes in. The opening HTTP
handshake belongs to the HTTP layer; this module only offers :func:`accept_key` and
:func:`is_valid_client_key` for it.

A driver is one loop::

    ws = WebSocketProtocol(Role.SERVER)
    while True:
        data = await stream.receive_some()
        if data:
            ws.receive_data(data)
        else:
            ws.receive_eof()
        for event in ws.events_received():
            ...
        await stream.send_all(ws.data_to_send())
        if ws.close_expected():
            await stream.aclose()
            break
"""

from __future__ import annotations

import base64
import codecs
import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from relaycore._accel import (
    apply_mask,
    encode_frame_header,
    parse_frame_header,
    unmask_messages,
)
from relaycore.protocol._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "BinaryMessage",
    "CloseCode",
    "CloseReceived",
    "Opcode",
    "Ping",
    "Pong",
    "Role",
    "State",
    "TextMessage",
    "WebSocketProtocol",
    "accept_key",
    "frame",
    "is_valid_client_key",
]


class Role(enum.IntEnum):
    """Which end of the connection this protocol object plays (RFC 6455 §5.1: masking)."""

    #: Accepts the connection; sends unmasked frames, requires masked ones.
    SERVER = 0
    #: Opens the connection; sends masked frames, requires unmasked ones.
    CLIENT = 1


class Opcode(enum.IntEnum):
    """Frame opcodes, RFC 6455 §5.2. 3-7 and 0xB-0xF are reserved and fail the connection."""

    #: §5.2 %x0: a continuation frame, the next fragment of the message in progress.
    CONTINUATION = 0x0
    #: §5.2 %x1: the first frame of a text message (UTF-8).
    TEXT = 0x1
    #: §5.2 %x2: the first frame of a binary message.
    BINARY = 0x2
    #: §5.2 %x8: a connection close (control frame, §5.5.1).
    CLOSE = 0x8
    #: §5.2 %x9: a ping (control frame, §5.5.2); the peer answers with a pong.
    PING = 0x9
    #: §5.2 %xA: a pong (control frame, §5.5.3), an answer to a ping or a unilateral heartbeat.
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close status codes, RFC 6455 §7.4.1."""

    #: The purpose for which the connection was established has been fulfilled.
    NORMAL_CLOSURE = 1000
    #: The endpoint is going away: a server going down, a browser leaving the page.
    GOING_AWAY = 1001
    #: The endpoint is terminating the connection due to a protocol error.
    PROTOCOL_ERROR = 1002
    #: The endpoint received a type of data it cannot accept (say, binary when it wants text).
    UNSUPPORTED_DATA = 1003
    #: Never on the wire: the Close frame carried no status code.
    NO_STATUS_RCVD = 1005
    #: Never on the wire: the connection closed without a Close frame.
    ABNORMAL_CLOSURE = 1006
    #: A message's data was not consistent with its type (non-UTF-8 in a text message).
    INVALID_FRAME_PAYLOAD_DATA = 1007
    #: A message violated the endpoint's policy (the generic code when no other fits).
    POLICY_VIOLATION = 1008
    #: A message was too big for the endpoint to process.
    MESSAGE_TOO_BIG = 1009
    #: The client expected the server to negotiate an extension that it did not.
    MANDATORY_EXTENSION = 1010
    #: The server met an unexpected condition that prevented it from fulfilling the request.
    INTERNAL_ERROR = 1011


class State(enum.IntEnum):
    """Where a connection is in its life (RFC 6455 §4.1, §7); CONNECTING is the HTTP layer's."""

    #: Messages flow both ways.
    OPEN = 1
    #: A Close frame has been sent or received (or the connection was failed); no more sends.
    CLOSING = 2
    #: The close handshake is complete and flushed, or the TCP connection has ended.
    CLOSED = 3


# Events: what the peer did, as nouns (RFC 6455 §6.2 "a WebSocket message has been received").


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A complete text message, reassembled from its fragments and validated as UTF-8."""

    data: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    """A complete binary message, reassembled from its fragments."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """A Ping frame; the protocol has already queued the Pong (§5.5.2) unless it is closing."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A Pong frame (§5.5.3)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's Close frame (§5.5.1): its code (1005 when it had none) and its reason."""

    code: int
    reason: str


Event = TextMessage | BinaryMessage | Ping | Pong | CloseReceived

#: RFC 6455 §1.3: the GUID appended to Sec-WebSocket-Key before hashing.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: RFC 6455 §5.5: control frames carry at most 125 bytes of payload.
_MAX_CONTROL_PAYLOAD = 125
#: RFC 6455 §5.5.1: a close reason fits in a control frame after the 2-byte code.
_MAX_CLOSE_REASON = _MAX_CONTROL_PAYLOAD - 2
#: RFC 6455 §5.2: bits of the first header byte.
_FIN = 0x80
_RSV = 0x70
_OPCODE = 0x0F
_MASK = 0x80
#: ``max_message_size=None`` for the fast path: no frame can be longer.
_NO_LIMIT = (1 << 63) - 1
#: Codes other than these, outside 3000-4999 (§7.4.2: libraries and private use), are invalid
#: in a Close frame (§7.4.1: 1004 reserved, 1005/1006/1015 local only; 1012-1014 are
#: IANA-registered since). 1005 is only valid as "no code at all".
_WIRE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def _is_wire_close_code(code: int) -> bool:
    return code in _WIRE_CLOSE_CODES or 3000 <= code <= 4999


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key`` (§4.2.2).

    >>> accept_key("dGhlIHNhbXBsZSBub25jZQ==")
    's3pPLMBiTxaQ9kYGzzhZRbK+xOo='
    """
    digest = hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def is_valid_client_key(key: str) -> bool:
    """True when ``key`` is a valid ``Sec-WebSocket-Key``: base64 of 16 bytes (§4.1, §11.3.1)."""
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except ValueError:  # binascii.Error and UnicodeEncodeError are both ValueErrors
        return False


def frame(opcode: int, payload: bytes | bytearray | memoryview, fin: bool = True) -> bytes:
    """One unmasked (server-to-client) frame: header and payload.

    The relay's fan-out encodes a message once with this and writes the same bytes to every
    recipient's socket, bypassing each connection's :class:`WebSocketProtocol`.

    >>> frame(Opcode.TEXT, b"Hello")
    b'\\x81\\x05Hello'
    """
    n = len(payload)
    if opcode & 0x08 and n > _MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError(
            f"control frame payload of {n} bytes; RFC 6455 §5.5 allows at most 125"
        )
    return encode_frame_header(opcode, n, fin) + payload


def _close_payload(code: int, reason: str) -> bytes:
    """The payload of a Close frame, the reason cut at a character boundary to fit."""
    if code == CloseCode.NO_STATUS_RCVD:
        return b""
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_CLOSE_REASON:
        raw = raw[:_MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + raw


# Theory of operation
# -------------------
#
# The connection is OPEN when the HTTP handshake hands it over. Four flags move it on; each is
# set once and never cleared:
#
# * ``_close_sent``: a Close frame is queued, by ``send_close()``, by echoing the peer's Close,
#   or by failing the connection. No frame may be queued after it (send_* raise), and pings are
#   no longer answered.
# * ``_close_rcvd``: the peer's Close arrived. All later input is ignored (§5.5.1: the peer
#   sends nothing after its Close).
# * ``error``: the peer broke the protocol. We queue a Close with the code that says why
#   (unless one was already queued) and ignore all later input: §7.1.7 "fail the WebSocket
#   connection". The driver closes TCP once the Close is flushed.
# * ``_eof``: the TCP connection ended. Everything stops.
#
# ``state`` is derived from them: CLOSED once EOF arrived, or once both Close frames crossed
# and ours has left through ``data_to_send()``; CLOSING once either close flag is set; OPEN
# before. ``close_expected()`` says "close TCP after this flush": the handshake is complete,
# the connection was failed, or TCP already ended. The server closes TCP first (§7.1.1); a
# client may wait for it, but closing is harmless.
#
# Receive path: a complete frame is parsed from the buffer and only then consumed, so the
# header is re-parsed when a frame arrives in pieces (cheap: a few bytes) and a frame's payload
# is copied once, out of the buffer, unmasked by ``apply_mask``. When the buffer is empty the
# caller's bytes are parsed in place and only an incomplete tail is copied in. Limits
# (control-frame length, message size) are checked from the header, before the payload is
# buffered.


class WebSocketProtocol:
    """One WebSocket connection after its opening handshake, as a sans-I/O state machine.

    ``max_message_size`` bounds a reassembled incoming message in bytes (``None``: no bound);
    a bigger one fails the connection with 1009. ``max_message_frames`` bounds the frames one
    fragmented message may take, control frames between its fragments included (default:
    ``max_message_size // 256``, at least 64; so a flood of tiny or empty fragments ends in
    1009 too, after a few thousand frames rather than millions). A ``CLIENT`` must pass
    ``mask_key``, a
    callable returning 4 fresh random bytes per frame (§5.3); a ``SERVER`` must not.

    Attributes:
        close_code: the code of the Close that ended or is ending the connection, whichever
            side sent it first; 1006 when TCP ended without a complete close handshake.
            ``None`` while OPEN.
        close_reason: the reason that came with ``close_code``.
        error: the :class:`RemoteProtocolError` that failed the connection, if the peer broke
            the protocol.
    """

    __slots__ = (
        "role", "max_message_size", "_mask_key", "close_code", "close_reason", "error",
        "_close_sent", "_close_rcvd", "_close_unflushed", "_eof", "_input_done", "_buf",
        "_events", "_out", "_msg_opcode", "_msg_len", "_msg_buf", "_msg_decoder",
        "max_message_frames", "_msg_frames",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_message_size: int | None = 1 << 20,
        mask_key: Callable[[], bytes] | None = None,
        max_message_frames: int | None = None,
    ) -> None:
        if role is Role.CLIENT and mask_key is None:
            raise ValueError("a CLIENT must mask its frames (RFC 6455 §5.3): pass mask_key")
        if role is Role.SERVER and mask_key is not None:
            raise ValueError("a SERVER must not mask its frames (RFC 6455 §5.1): drop mask_key")
        self.role = role
        self.max_message_size = max_message_size
        if max_message_frames is None and max_message_size is not None:
            max_message_frames = max(64, max_message_size // 256)
        self.max_message_frames = max_message_frames
        self._mask_key = mask_key

        self.close_code: int | None = None
        self.close_reason = ""
        self.error: RemoteProtocolError | None = None

        self._close_sent = False
        self._close_rcvd = False
        self._close_unflushed = False
        self._eof = False
        # True once input is ignored: Close received, connection failed, or EOF.
        self._input_done = False

        self._buf = bytearray()
        self._events: list[Event] = []
        self._out: list[bytes] = []

        # The fragmented message in progress (§5.4): its opcode (None when there is none),
        # its length so far, its payload so far (one buffer: a fragment keeps only its bytes,
        # so a flood of tiny or empty fragments holds no more than their payload, which
        # ``max_message_size`` bounds) and, for text, the incremental decoder that validates
        # UTF-8 as fragments arrive (a bad byte fails the connection without waiting for FIN).
        self._msg_opcode: int | None = None
        self._msg_len = 0
        self._msg_frames = 0
        self._msg_buf = bytearray()
        self._msg_decoder: codecs.IncrementalDecoder | None = None

    # Questions -----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """OPEN, CLOSING or CLOSED; see the theory of operation above."""
        if self._eof or (self._close_sent and self._close_rcvd and not self._close_unflushed):
            return State.CLOSED
        if self._close_sent or self._close_rcvd:
            return State.CLOSING
        return State.OPEN

    def close_expected(self) -> bool:
        """True when the driver should close TCP once :meth:`data_to_send` is flushed."""
        return self._eof or self.error is not None or (self._close_sent and self._close_rcvd)

    # Output -------------------------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Return the events received since the last call, and forget them."""
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Return the bytes queued for the peer since the last call, and forget them."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self._close_unflushed = False
        return out[0] if len(out) == 1 else b"".join(out)

    # Sending ------------------------------------------------------------------------------

    def send_text(self, data: str | bytes) -> None:
        """Queue a text message; ``bytes`` must already be UTF-8 (they are not re-checked)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._check_can_send()
        self._queue_frame(Opcode.TEXT, data)

    def send_binary(self, data: bytes | bytearray | memoryview) -> None:
        """Queue a binary message."""
        self._check_can_send()
        self._queue_frame(Opcode.BINARY, data)

    def send_ping(self, payload: bytes = b"") -> None:
        """Queue a Ping (§5.5.2); the payload is at most 125 bytes."""
        self._check_can_send()
        self._check_control_payload("ping", payload)
        self._queue_frame(Opcode.PING, payload)

    def send_pong(self, payload: bytes = b"") -> None:
        """Queue an unsolicited Pong (§5.5.3); Pings are answered without being asked."""
        self._check_can_send()
        self._check_control_payload("pong", payload)
        self._queue_frame(Opcode.PONG, payload)

    def send_close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the close handshake (§7.1.2): queue a Close frame and move to CLOSING.

        ``reason`` is cut to fit 123 bytes of UTF-8. ``code`` 1005 sends a Close without a
        code (and without a reason); other codes must be valid on the wire (§7.4).
        """
        self._check_can_send()
        if code != CloseCode.NO_STATUS_RCVD and not _is_wire_close_code(code):
            raise LocalProtocolError(
                f"close code {code} may not be sent; expected 1000-1003, 1007-1014, "
                "3000-4999, or 1005 for no code (RFC 6455 §7.4)"
            )
        self._queue_close(code, reason if code != CloseCode.NO_STATUS_RCVD else "")

    def _check_can_send(self) -> None:
        if self._close_sent or self._eof:
            raise LocalProtocolError(
                f"cannot send in state {self.state.name}: a Close frame was already sent "
                "or the connection ended; expected an OPEN connection"
            )

    @staticmethod
    def _check_control_payload(what: str, payload: bytes) -> None:
        if len(payload) > _MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError(
                f"{what} payload of {len(payload)} bytes; RFC 6455 §5.5 allows at most 125"
            )

    def _queue_frame(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        if self._mask_key is None:
            self._out.append(encode_frame_header(opcode, len(payload)) + payload)
        else:
            mask = self._mask_key()
            self._out.append(
                encode_frame_header(opcode, len(payload), True, mask) + apply_mask(payload, mask)
            )

    def _queue_close(self, code: int, reason: str) -> None:
        self._queue_frame(Opcode.CLOSE, _close_payload(code, reason))
        self._close_sent = True
        self._close_unflushed = True
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    # Receiving ----------------------------------------------------------------------------

    def receive_eof(self) -> None:
        """The TCP connection ended (the peer's FIN, or the driver closed it): CLOSED.

        Without a complete close handshake the close code becomes 1006 (§7.1.5), unless this
        side had failed the connection, whose code is kept as the reason it ended.
        """
        if self._eof:
            return
        self._eof = True
        self._input_done = True
        self._buf.clear()
        self._reset_message()
        if self.error is None and not (self._close_sent and self._close_rcvd):
            self.close_code = CloseCode.ABNORMAL_CLOSURE
            self.close_reason = ""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the connection; read the results from :meth:`events_received`
        and :meth:`data_to_send`. Bytes after the peer's Close, or after a failure, are
        ignored."""
        if self._input_done or not data:
            return
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data
        view = memoryview(src)
        try:
            pos = self._parse(src, view)
            if src is not buf and pos < len(view) and not self._input_done:
                buf += view[pos:]
        finally:
            view.release()
        if self._input_done:
            buf.clear()
        elif src is buf and pos:
            # CPython drops a bytearray's head by moving its start pointer: no copy.
            del buf[:pos]

    def receive_messages(self, data: bytes, text: bool = True) -> list[bytes] | None:
        """A server's shortcut past :meth:`receive_data` for its most common read.

        When nothing is pending from earlier reads (no partial frame, no fragmented message,
        input not over) and ``data`` is nothing but whole, masked data messages within
        ``max_message_size`` (text ones valid UTF-8, and only binary ones unless ``text``),
        returns their payloads in order, text as its UTF-8 bytes, and no events: the state is
        what :meth:`receive_data` would have left. Otherwise returns ``None`` having consumed
        nothing, and the caller feeds the same ``data`` to :meth:`receive_data`.
        """
        if (
            self._buf
            or self._msg_opcode is not None
            or self._input_done
            or self.role is not Role.SERVER
        ):
            return None
        limit = self.max_message_size
        return unmask_messages(data, _NO_LIMIT if limit is None else limit, text)

    def _parse(self, src: bytes | bytearray | memoryview, view: memoryview) -> int:
        """Handle every complete frame in ``src``; return the offset of the first byte left."""
        pos = 0
        end = len(view)
        server = self.role is Role.SERVER
        limit = self.max_message_size
        while not self._input_done:
            try:
                header = parse_frame_header(src, pos)
            except ValueError:
                self._fail(
                    CloseCode.PROTOCOL_ERROR,
                    "invalid frame length",
                    "a 64-bit payload length had its most significant bit set; "
                    "expected it clear (RFC 6455 §5.2)",
                )
                break
            if header is None:
                break
            b0, b1, mask, length, header_len = header
            opcode = b0 & _OPCODE
            if b0 & _RSV:
                self._fail(
                    CloseCode.PROTOCOL_ERROR,
                    "reserved bits set",
                    f"a frame had RSV bits {b0 & _RSV:#04x} set; no extension was "
                    "negotiated, so RSV1-3 must be 0 (RFC 6455 §5.2)",
                )
                break
            if opcode & 0x08:
                if opcode > Opcode.PONG:
                    self._fail_unknown_opcode(opcode)
                    break
                if not b0 & _FIN:
                    self._fail(
                        CloseCode.PROTOCOL_ERROR,
                        "fragmented control frame",
                        f"a control frame (opcode {opcode:#x}) had FIN clear; control "
                        "frames must not be fragmented (RFC 6455 §5.5)",
                    )
                    break
                if length > _MAX_CONTROL_PAYLOAD:
                    self._fail(
                        CloseCode.PROTOCOL_ERROR,
                        "control frame too long",
                        f"a control frame (opcode {opcode:#x}) announced {length} bytes; "
                        "expected at most 125 (RFC 6455 §5.5)",
                    )
                    break
            elif opcode > Opcode.BINARY:
                self._fail_unknown_opcode(opcode)
                break
            elif opcode == Opcode.CONTINUATION:
                if self._msg_opcode is None:
                    self._fail(
                        CloseCode.PROTOCOL_ERROR,
                        "unexpected continuation frame",
                        "a continuation frame arrived with no message in progress; expected "
                        "a text or binary frame first (RFC 6455 §5.4)",
                    )
                    break
            elif self._msg_opcode is not None:
                self._fail(
                    CloseCode.PROTOCOL_ERROR,
                    "expected continuation frame",
                    f"a new data frame (opcode {opcode:#x}) arrived while a fragmented "
                    "message was in progress; expected a continuation frame (RFC 6455 §5.4)",
                )
                break
            if server and mask is None:
                self._fail(
                    CloseCode.PROTOCOL_ERROR,
                    "unmasked frame",
                    "a client sent an unmasked frame; expected every frame masked (RFC 6455 §5.1)",
                )
                break
            if not server and mask is not None:
                self._fail(
                    CloseCode.PROTOCOL_ERROR,
                    "masked frame",
                    "a server sent a masked frame; expected no masking (RFC 6455 §5.1)",
                )
                break
            if self._msg_opcode is not None:
                self._msg_frames += 1
                frames = self.max_message_frames
                if frames is not None and self._msg_frames > frames:
                    self._fail(
                        CloseCode.MESSAGE_TOO_BIG,
                        f"message in more than {frames} frames",
                        f"a fragmented message went on past {frames} frames (control frames "
                        f"between its fragments included); expected at most {frames}",
                    )
                    break
            if limit is not None and not opcode & 0x08 and self._msg_len + length > limit:
                self._fail(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"message exceeds {limit} bytes",
                    f"a message of more than {limit} bytes arrived "
                    f"({self._msg_len} buffered + a frame of {length}); "
                    f"expected at most max_message_size={limit}",
                )
                break

            start = pos + header_len
            stop = start + length
            if stop > end:
                break
            if mask is None:
                payload = view[start:stop].tobytes()
            else:
                payload = apply_mask(view[start:stop], mask)
            pos = stop

            if opcode & 0x08:
                self._handle_control(opcode, payload)
            else:
                self._handle_data(opcode, bool(b0 & _FIN), payload)
        return pos

    def _handle_data(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode != Opcode.CONTINUATION:
            if fin:
                # The common case: a message in a single frame.
                if opcode == Opcode.TEXT:
                    try:
                        text = payload.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        self._fail_utf8(exc)
                        return
                    self._events.append(TextMessage(text))
                else:
                    self._events.append(BinaryMessage(payload))
                return
            self._msg_opcode = opcode
            self._msg_len = 0
            self._msg_frames = 1
            if opcode == Opcode.TEXT:
                self._msg_decoder = codecs.getincrementaldecoder("utf-8")()
        self._msg_len += len(payload)
        decoder = self._msg_decoder
        if decoder is not None:
            try:
                decoder.decode(payload, fin)  # validation only: the text is decoded at FIN
            except UnicodeDecodeError as exc:
                self._fail_utf8(exc)
                return
        self._msg_buf += payload
        if fin:
            data = bytes(self._msg_buf)
            if decoder is None:
                self._events.append(BinaryMessage(data))
            else:
                self._events.append(TextMessage(data.decode("utf-8")))
            self._reset_message()

    def _handle_control(self, opcode: int, payload: bytes) -> None:
        if opcode == Opcode.PING:
            self._events.append(Ping(payload))
            if not self._close_sent:
                self._queue_frame(Opcode.PONG, payload)
        elif opcode == Opcode.PONG:
            self._events.append(Pong(payload))
        else:
            self._handle_close(payload)

    def _handle_close(self, payload: bytes) -> None:
        n = len(payload)
        if n == 0:
            code, reason = int(CloseCode.NO_STATUS_RCVD), ""
        elif n == 1:
            self._fail(
                CloseCode.PROTOCOL_ERROR,
                "invalid close frame",
                "a Close frame carried 1 byte; expected none, or a 2-byte code and an "
                "optional reason (RFC 6455 §5.5.1)",
            )
            return
        else:
            code = int.from_bytes(payload[:2], "big")
            if not _is_wire_close_code(code):
                self._fail(
                    CloseCode.PROTOCOL_ERROR,
                    "invalid close code",
                    f"a Close frame carried code {code}; expected 1000-1003, 1007-1014 "
                    "or 3000-4999 (RFC 6455 §7.4)",
                )
                return
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError as exc:
                self._fail_utf8(exc, "close reason")
                return
        self._events.append(CloseReceived(code, reason))
        self._close_rcvd = True
        self._input_done = True
        self._reset_message()
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if not self._close_sent:
            # §5.5.1: echo the status code; the peer's payload is that code and a valid reason.
            self._queue_frame(Opcode.CLOSE, payload)
            self._close_sent = True
            self._close_unflushed = True

    def _reset_message(self) -> None:
        self._msg_opcode = None
        self._msg_len = 0
        self._msg_frames = 0
        self._msg_buf = bytearray()
        self._msg_decoder = None

    def _fail_unknown_opcode(self, opcode: int) -> None:
        self._fail(
            CloseCode.PROTOCOL_ERROR,
            f"unknown opcode {opcode:#x}",
            f"a frame had the reserved opcode {opcode:#x}; expected 0x0-0x2 or 0x8-0xA "
            "(RFC 6455 §5.2)",
        )

    def _fail_utf8(self, exc: UnicodeDecodeError, what: str = "text message") -> None:
        self._fail(
            CloseCode.INVALID_FRAME_PAYLOAD_DATA,
            f"invalid UTF-8 in {what}",
            f"a {what} was not valid UTF-8 ({exc.reason}); expected UTF-8 (RFC 6455 §8.1)",
        )

    def _fail(self, code: int, reason: str, message: str) -> None:
        """Fail the WebSocket connection (§7.1.7): Close with ``code``, ignore all input."""
        self.error = RemoteProtocolError(message)
        self._input_done = True
        self._reset_message()
        if not self._close_sent and not self._eof:
            self._queue_close(code, reason)
