"""The one place that chooses between the Cython fast path and its pure-Python twin.

``RELAYCORE_NO_EXTENSIONS=1`` forces the twin; a missing extension falls back to it.
``ACCELERATED`` tells which one is in use, and ``FALLBACK_REASON`` why the twin is (``None``
when accelerated). Nothing else imports ``_fastpath`` or ``_fastpath_py`` directly.
"""

from __future__ import annotations

import os

ACCELERATED = False
#: Why the pure-Python twin is in use, for the relay's start line; ``None`` when accelerated.
FALLBACK_REASON: str | None = None

if os.environ.get("RELAYCORE_NO_EXTENSIONS", "") not in ("", "0"):
    FALLBACK_REASON = "disabled by RELAYCORE_NO_EXTENSIONS"
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
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._fastpath":
            # Installed without it: no compiler or Cython at install time, or
            # RELAYCORE_BUILD_EXTENSION=no.
            FALLBACK_REASON = f"extension not built: {exc}"
        else:  # built, but it does not load here (another Python, a missing symbol)
            FALLBACK_REASON = f"extension failed to load: {exc}"
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
    "FALLBACK_REASON",
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
