"""The one place that chooses between the Cython fast path and its pure-Python twin.

``RELAYCORE_NO_EXTENSIONS=1`` forces the twin; a missing extension falls back to it.
``ACCELERATED`` tells which one is in use. Nothing else imports ``_fastpath`` or
``_fastpath_py`` directly.
"""

from __future__ import annotations

import os

ACCELERATED = False

if os.environ.get("RELAYCORE_NO_EXTENSIONS", "") not in ("", "0"):
    from ._fastpath_py import (
        apply_mask,
        decode_varint,
        encode_frame_header,
        encode_varint,
        parse_frame_header,
        queue_frame,
        split_records,
        split_varint_frames,
        unmask_messages,
    )
else:
    try:
        from ._fastpath import (  # type: ignore[import-not-found,no-redef,unused-ignore]
            apply_mask,
            decode_varint,
            encode_frame_header,
            encode_varint,
            parse_frame_header,
            queue_frame,
            split_records,
            split_varint_frames,
            unmask_messages,
        )

        ACCELERATED = True
    except ImportError:
        from ._fastpath_py import (
            apply_mask,
            decode_varint,
            encode_frame_header,
            encode_varint,
            parse_frame_header,
            queue_frame,
            split_records,
            split_varint_frames,
            unmask_messages,
        )

__all__ = [
    "ACCELERATED",
    "apply_mask",
    "decode_varint",
    "encode_frame_header",
    "encode_varint",
    "parse_frame_header",
    "queue_frame",
    "split_records",
    "split_varint_frames",
    "unmask_messages",
]
