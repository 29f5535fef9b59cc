"""Type stubs for the Cython fast path; they mirror ``_fastpath_py.py``, its specification."""

from collections.abc import Iterable
from typing import Protocol, TypeVar

class _Connection(Protocol):
    @property
    def state(self) -> object: ...
    @property
    def wire_format(self) -> str: ...
    @property
    def _out(self) -> bytearray: ...

_C = TypeVar("_C", bound=_Connection)

__all__ = [
    "parse_frame_header",
    "encode_frame_header",
    "apply_mask",
    "unmask_messages",
    "encode_varint",
    "decode_varint",
    "split_records",
    "split_varint_frames",
    "queue_frame",
]

def parse_frame_header(
    data: bytes | bytearray | memoryview, pos: int = 0
) -> tuple[int, int, bytes | None, int, int] | None: ...
def encode_frame_header(
    opcode: int, length: int, fin: bool = True, mask: bytes | None = None, rsv: int = 0
) -> bytes: ...
def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes: ...
def unmask_messages(
    data: bytes | bytearray | memoryview, limit: int, text: bool = True
) -> list[bytes] | None: ...
def encode_varint(value: int) -> bytes: ...
def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None: ...
def split_records(data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]: ...
def split_varint_frames(
    data: bytes | bytearray | memoryview, max_size: int = 2147483647
) -> tuple[list[bytes], int]: ...
def queue_frame(
    targets: Iterable[_C],
    frames: dict[str, bytes | None],
    open_state: object,
    limit: int,
    dirty: list[_C],
) -> tuple[int, list[_C]]: ...
