"""The Azure SignalR service protocol, sans-I/O: app server <-> service over the server socket.

Theory of operation
-------------------

An app server opens a binary WebSocket to ``/server/`` and both sides then exchange *service
messages* (``protocol/service-protocol.md`` §1-2):

* The socket is a **byte stream**. A frame is a varint length prefix (the one of
  ``relaycore._accel``) and a body of that many bytes; the body is one MessagePack array whose
  first element is the message type. Frames are not aligned with WebSocket messages: one
  message may hold several frames or part of one. ``ServiceProtocolParser`` buffers the stream
  (``receive_data``) and hands out whole messages (``messages_received``).
* The first message is the app server's ``ServiceHandshakeRequest``; the service answers with a
  ``ServiceHandshakeResponse`` (§3.3). After that either side may send anything its direction
  allows; ``ServicePing`` keeps the connection alive and carries the key/value vocabulary of
  §4.4.
* ``write_message(message)`` gives one whole frame (prefix + body) in the layout the current
  Microsoft SDK writes, byte for byte (§2, ``vectors/service-protocol.json``).
* ``parse_message_body(body)`` reads one body the way the SDK reader does: the array length
  decides which optional trailing fields are present (older SDKs write shorter arrays), extra
  trailing elements are ignored, a message of unknown type is skipped (``None``), strings may
  be nil. Anything else that is wrong raises ``RemoteProtocolError`` naming the message type and
  the field; the connection should then be closed.

Nothing here keeps connection state beyond the parser's buffer; message objects are frozen
dataclasses named after the SDK's classes (``Service...`` where the hub protocol already has the
name). Parsed integers are plain ``int``; the enums here compare equal to them.

The package, by role:

* ``_messages``: the enumerations, and one dataclass per message type with its wire layout,
  its *schema*: the elements of its array in order, each of a kind (string, int32, payload
  map, extension map, ...), and which trailing ones older SDKs leave out.
* ``_codec``: reading and writing any message from its schema, and the errors for malformed
  input; the extension map (§1.1) and its members.
* ``_parser``: the byte stream cut into frames (``ServiceProtocolParser``), and the relay's hot
  paths for client data (raw ConnectionData and UserData, ``write_connection_data``).

A new message type is one declaration in ``_messages``, its dataclass under its ``@schema``;
then its name goes in the ``ServiceMessage`` union and in ``_messages.__all__``, which this
package and ``relaycore.protocol`` re-export.
"""

from . import _codec, _messages, _parser
from ._codec import *  # noqa: F403
from ._messages import *  # noqa: F403
from ._parser import *  # noqa: F403

__all__ = _messages.__all__ + _codec.__all__ + _parser.__all__
