"""Service messages read and written from one schema each (``protocol/service-protocol.md`` §1-2).

Every message class of ``_messages`` states its layout once, with ``@schema(...)``: its name in
the SDK and the elements of its array after the type, in wire order, each a *field* of a kind
(``string``, ``int32``, ``payloads``, ``EXT``, ...). From that schema come:

* its reader, which follows the SDK reader (§1): the array length decides which optional
  trailing fields are present (``opt``: older SDKs write shorter arrays), extra trailing
  elements are ignored, nil reads as the SDK reads it, and anything else that is wrong raises
  ``RemoteProtocolError`` naming the message, the element and what was expected;
* its writer, which writes the layout of the current SDK byte for byte;
* the layout quoted when an array is too short: ``[6, connectionId, payload, ext?]``.

The extension map (§1.1) is one element of the array; its members are the message's fields
named ``tracing_id`` (key 1), ``ttl`` (2), ``protocol`` (3), ``filter`` (4),
``data_message_type`` (5) and ``is_partial`` (6). A member is written only when set (not
``None``; for keys 5 and 6 not 0/false), in key order, and no key outside 1-6 is ever written:
the 2024-03 SDK reads an unknown key but not its value, and misparses the rest of the message.
Every known key received is checked, whether the message carries it or not; unknown keys are
skipped. A field that is both an element and a member (ClientCompletion's ``protocol``) is
written in both places, and the member wins on reading, as in the SDK.

Two paths serve the schemas. ``_read_generic`` and ``_write_generic`` interpret one, field by
field: the rare messages (handshakes, group management, acks, client results, ...) go that way.
The messages sent once per client message or per client connection (``hot=True``: client data,
broadcasts, pings, OpenConnection and CloseConnection) get a reader and a writer compiled from
the same schema: straight-line Python that calls the same field readers in the same order,
without the interpreter's loop. ``tests/test_service_schema.py`` compiles every schema and
checks that both paths agree on every message.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from functools import partial
from typing import Any, Final, TypeVar

import msgpack  # type: ignore[import-untyped]

from ..._accel import encode_varint
from .._errors import LocalProtocolError, RemoteProtocolError, show_value, unpack_error_text
from .._wire import MAX_FRAME

#: A service message: one of the dataclasses ``_messages`` declares (its union,
#: ``ServiceMessage``, lives there: this module is below the messages it reads and writes).
ServiceMessage = Any

__all__ = [
    "parse_message_body",
    "write_message",
    "write_messages",
]

#: A field reader: checks ``array[index]`` as the SDK reader does and returns the value.
Reader = Callable[[tuple[Any, ...], int, str], Any]

_M = TypeVar("_M")

_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1

#: Extension map keys (§1.1).
_EXT_TRACING_ID: Final = 1
_EXT_TTL: Final = 2
_EXT_PROTOCOL: Final = 3
_EXT_FILTER: Final = 4
_EXT_DATA_MESSAGE_TYPE: Final = 5
_EXT_IS_PARTIAL: Final = 6

#: The extension map's members: attribute -> its key, and for the members written only when
#: not 0/false, what is written (else they are written when not ``None``, as they are).
_EXT_MEMBERS: Final[dict[str, tuple[int, Callable[[Any], Any] | None]]] = {
    "tracing_id": (_EXT_TRACING_ID, None),
    "ttl": (_EXT_TTL, None),
    "protocol": (_EXT_PROTOCOL, None),
    "filter": (_EXT_FILTER, None),
    "data_message_type": (_EXT_DATA_MESSAGE_TYPE, int),
    "is_partial": (_EXT_IS_PARTIAL, bool),
}

_NO_EXT: Final[dict[int, Any]] = {}


# --------------------------------------------------------------------------------------------
# Errors


def _show(value: Any) -> str:
    """Describe a received value for an error message, briefly."""
    if value is None:
        return "nil"
    return show_value(value)


def _kind(array: tuple[Any, ...]) -> str:
    return f"{_BY_TYPE[array[0]].name} message (type {array[0]})"


def _bad(array: tuple[Any, ...], index: int, name: str, expected: str, value: Any) -> Exception:
    return RemoteProtocolError(
        f"{_kind(array)}: element {index} ({name}) must be {expected}, got {_show(value)}"
    )


def _too_short(spec: Schema, array: tuple[Any, ...]) -> Exception:
    return RemoteProtocolError(
        f"{_kind(array)} has {len(array)} elements; expected at least {spec.need}: "
        f"{spec.layout}"
    )


# --------------------------------------------------------------------------------------------
# Field readers: what the SDK reader accepts for each kind of element


def _str(array: tuple[Any, ...], index: int, name: str) -> str:
    value = array[index]
    if type(value) is not str:
        raise _bad(array, index, name, "a string", value)
    return value


def _opt_str(array: tuple[Any, ...], index: int, name: str) -> str | None:
    value = array[index]
    if value is not None and type(value) is not str:
        raise _bad(array, index, name, "a string or nil", value)
    return value


def _int32(array: tuple[Any, ...], index: int, name: str) -> int:
    value = array[index]
    if type(value) is not int or not _INT32_MIN <= value <= _INT32_MAX:
        raise _bad(array, index, name, "an int32", value)
    return value


def _bool(array: tuple[Any, ...], index: int, name: str) -> bool:
    value = array[index]
    if type(value) is not bool:
        raise _bad(array, index, name, "a boolean", value)
    return value


def _bin(array: tuple[Any, ...], index: int, name: str) -> bytes:
    value = array[index]
    if type(value) is bytes:
        return value
    if value is None:
        return b""
    raise _bad(array, index, name, "binary (bin)", value)


def _opt_bin(array: tuple[Any, ...], index: int, name: str) -> bytes | None:
    value = array[index]
    if value is not None and type(value) is not bytes:
        raise _bad(array, index, name, "binary (bin) or nil", value)
    return value


def _strs(array: tuple[Any, ...], index: int, name: str) -> tuple[str, ...]:
    value = array[index]
    if value is None:
        return ()
    if type(value) is not tuple or any(type(item) is not str for item in value):
        raise _bad(array, index, name, "an array of strings", value)
    return value


def _rest_strs(array: tuple[Any, ...], index: int, name: str) -> tuple[str, ...]:
    # Every element from ``index`` on; a nil one reads as "".
    values = array[index:]
    for i, value in enumerate(values, index):
        if type(value) is not str:
            if value is None:
                values = tuple(v or "" for v in values)
                continue
            raise _bad(array, i, name, "a string", value)
    return values


def _payloads(array: tuple[Any, ...], index: int, name: str) -> dict[str, bytes]:
    value = array[index]
    if value is None:
        return {}
    if type(value) is not dict:
        raise _bad(array, index, name, "a map of protocol names to bin", value)
    for key, payload in value.items():
        if type(key) is not str or type(payload) is not bytes:
            if type(key) is str and payload is None:
                value[key] = b""  # the SDK reads a nil bin as empty
                continue
            raise _bad(
                array, index, name, "a map of protocol names to bin", f"{key!r}: {payload!r}"
            )
    return value


class _RepeatedClaim(tuple):  # type: ignore[type-arg]
    """The values of a claim type that came more than once (made by ``_unpack_claims`` only, so
    that an array where a claim's string belongs is still refused)."""

    __slots__ = ()


def _claims(array: tuple[Any, ...], index: int, name: str) -> dict[str, str | tuple[str, ...]]:
    value = array[index]
    if value is None:
        return {}
    if type(value) is not dict or any(
        type(k) is not str or (type(v) is not str and type(v) is not _RepeatedClaim)
        for k, v in value.items()
    ):
        raise _bad(array, index, name, "a map of strings to strings", value)
    if any(type(v) is _RepeatedClaim for v in value.values()):
        return {k: tuple(v) if type(v) is _RepeatedClaim else v for k, v in value.items()}
    return value


def _headers(array: tuple[Any, ...], index: int, name: str) -> dict[str, Sequence[str]]:
    value = array[index]
    if value is None:
        return {}
    if type(value) is not dict or any(
        type(k) is not str or type(v) is not tuple or any(type(s) is not str for s in v)
        for k, v in value.items()
    ):
        raise _bad(array, index, name, "a map of strings to arrays of strings", value)
    return value


def _read_ext(array: tuple[Any, ...], index: int, name: str) -> dict[int, Any]:
    """The extension map at ``index``, its known members checked; unknown keys skipped."""
    ext = array[index]
    if not ext:  # {} (or nil, which a lenient reader takes as empty)
        return _NO_EXT
    if type(ext) is not dict:
        raise _bad(array, index, name, "a map with integer keys", ext)
    for key, value in ext.items():
        if type(key) is not int:
            raise _bad(array, index, name, "a map with integer keys", ext)
        if key == _EXT_TRACING_ID:
            ok = type(value) is int and 0 <= value < 2**64
            expected = "a uint64 tracing id (key 1)"
        elif key == _EXT_TTL or key == _EXT_DATA_MESSAGE_TYPE:
            ok = type(value) is int and _INT32_MIN <= value <= _INT32_MAX
            expected = "an int32 ttl (key 2)" if key == _EXT_TTL else "an int32 (key 5)"
        elif key == _EXT_PROTOCOL or key == _EXT_FILTER:
            ok = value is None or type(value) is str
            expected = f"a string or nil (key {key})"
        elif key == _EXT_IS_PARTIAL:
            ok = type(value) is bool
            expected = "a boolean (key 6)"
        else:
            continue  # unknown member, skipped (later SDKs do the same)
        if not ok:
            raise _bad(array, index, name, expected, value)
    return ext


# --------------------------------------------------------------------------------------------
# Field packers: where MessagePack's own choice is not what the SDK writes


def _pack_claims(packer: Any, claims: dict[str, Any], what: str) -> bytes:
    # One pair per value, a repeated claim type once per value (a dict cannot hold a key
    # twice): the SDK writes its array of claims as a map whose keys repeat.
    pairs = [(name, value) for name, values in claims.items()
             for value in (values if type(values) is tuple else (values,))]
    packed: bytes = packer.pack_map_pairs(pairs)
    return packed


def _pack_int32(packer: Any, value: Any, what: str) -> bytes:
    # MessagePack int32 (d2) whatever the value: the SDK's WriteInt32.
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{what} must be an int, got {value!r}")
    if not _INT32_MIN <= value <= _INT32_MAX:
        raise LocalProtocolError(f"{what} {value} does not fit in int32")
    return b"\xd2" + int(value).to_bytes(4, "big", signed=True)


# --------------------------------------------------------------------------------------------
# Schemas


@dataclass(frozen=True, slots=True)
class Field:
    """One element of a message array after the type: how it is read, written and named."""

    #: The SDK's name for it, in errors and layouts (``connectionId``).
    name: str
    #: The message attribute it fills (``connection_id``); ``""`` for the extension map.
    attr: str
    #: Checks the element and gives the attribute's value; ``None``: the SDK does not read it.
    read: Reader | None
    #: ``(value, message)`` -> what is written, where it is not the attribute's value itself.
    write: Callable[[Any, Any], Any] | None = None
    #: ``(packer, value, what)`` -> the packed element, where MessagePack's own encoding of the
    #: value is not the SDK's.
    pack: Callable[[Any, Any, str], bytes] | None = None
    #: Written only when not ``None`` (the last element of a layout only).
    omit_none: bool = False
    #: Stands for every element from here on (the ping's strings).
    rest: bool = False
    #: How the layout shows it, when not by its name.
    shown: str = ""
    #: For the extension map: the members this message carries, ``(key, attr)`` in key order.
    members: tuple[tuple[int, str], ...] = ()
    #: Read only from this array length on (set by ``schema``; 0: always).
    since: int = 0

    @property
    def is_ext(self) -> bool:
        return not self.attr


@dataclass(frozen=True, slots=True)
class _Optional:
    fields: tuple[Field, ...]


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def string(name: str, attr: str | None = None) -> Field:
    """A string; nil is refused."""
    return Field(name, attr or _snake(name), _str)


def nullable(
    name: str,
    attr: str | None = None,
    *,
    nil: str | None = None,
    write: Callable[[Any, Any], Any] | None = None,
) -> Field:
    """A string or nil; nil reads as ``None``, or as ``nil`` when given."""
    if nil is None:
        return Field(name, attr or _snake(name), _opt_str, write)

    def read(array: tuple[Any, ...], index: int, what: str) -> str:
        return _opt_str(array, index, what) or nil

    return Field(name, attr or _snake(name), read, write)


def int32(name: str, attr: str | None = None) -> Field:
    """An integer that fits in 32 bits."""
    return Field(name, attr or _snake(name), _int32)


def boolean(name: str) -> Field:
    """A boolean; any true value is written as ``true``."""
    return Field(name, _snake(name), _bool, lambda value, message: bool(value))


def binary(name: str) -> Field:
    """A bin; nil reads as ``b""``."""
    return Field(name, _snake(name), _bin)


def nullable_binary(name: str) -> Field:
    """A bin or nil."""
    return Field(name, _snake(name), _opt_bin)


def strings(name: str, attr: str | None = None) -> Field:
    """An array of strings; nil reads as ``()``."""
    return Field(name, attr or _snake(name), _strs)


def enum32(name: str, kind: type[enum.IntEnum], expected: str) -> Field:
    """A member of ``kind``, always written as a MessagePack int32 (``d2 xx xx xx xx``);
    other values are refused on reading, ``expected`` saying which are allowed."""

    def read(array: tuple[Any, ...], index: int, what: str) -> enum.IntEnum:
        value = _int32(array, index, what)
        if value not in kind._value2member_map_:
            raise _bad(array, index, what, expected, value)
        return kind(value)

    return Field(name, _snake(name), read, pack=_pack_int32)


#: The strings after the type, each of them (the ping's key/value list); nil reads as "".
PING_VALUES: Final = Field("ping value", "values", _rest_strs, rest=True,
                           shown="string, string, ...")
#: The payload map: protocol name -> bin; a nil bin reads as ``b""``.
PAYLOADS: Final = Field("payloads", "payloads", _payloads)
#: Claim type -> value (or the tuple of the values of a repeated claim type), on the wire a map
#: whose keys may repeat.
CLAIMS: Final = Field("claims", "claims", _claims, pack=_pack_claims)
#: Header name -> tuple of values.
HEADERS: Final = Field("headers", "headers", _headers)
#: The extension map (§1.1); its members are the message's fields named after them.
EXT: Final = Field("ext", "", _read_ext)
#: An extension map the SDK writes empty and never reads.
UNREAD_EXT: Final = Field("ext", "", None)


def opt(*group: Field, omit_none: bool = False) -> _Optional:
    """Fields that older SDKs leave out: read only when the array reaches the last of them.
    ``omit_none``: the (last) field is written only when not ``None``."""
    if omit_none:
        group = (*group[:-1], replace(group[-1], omit_none=True))
    return _Optional(group)


@dataclass(frozen=True, slots=True)
class Schema:
    """The wire layout of one message class."""

    cls: type[Any]
    #: The message type, element 0.
    type: int
    #: The SDK's name, in errors: ``ConnectionData``.
    name: str
    #: The elements after the type, in wire order.
    fields: tuple[Field, ...]
    #: The shortest array the SDK reader takes.
    need: int
    #: The layout quoted in errors: ``[6, connectionId, payload, ext?]``.
    layout: str
    #: Whether it is compiled into a specialised reader and writer.
    hot: bool
    #: What ``_read_generic`` walks: ``(since, index, read, name, attr, members)`` per field
    #: that is read.
    reading: tuple[tuple[int, int, Reader, str, str, tuple[tuple[int, str], ...]], ...]
    #: The message of an array that is only its type, shared (``[3]``, the keep-alive ping);
    #: ``None`` where that array is too short.
    empty: Any


def _layout(message_type: int, elements: Sequence[Field | _Optional]) -> str:
    def show(field: Field) -> str:
        return field.shown or field.name

    parts = [str(message_type)]
    for element in elements:
        if isinstance(element, Field):
            parts.append(show(element))
        elif len(element.fields) == 1:
            parts.append(f"{show(element.fields[0])}?")
        else:
            parts.append(f"({', '.join(show(f) for f in element.fields)})?")
    return f"[{', '.join(parts)}]"


def _build(cls: type[Any], name: str, elements: Sequence[Field | _Optional], hot: bool) -> Schema:
    message_type = int(cls.message_type)
    attrs = {f.name for f in fields(cls)}
    members = tuple(sorted((key, attr) for attr, (key, _) in _EXT_MEMBERS.items()
                           if attr in attrs))
    flat: list[Field] = []
    need = 1  # the type, then every element outside opt()
    for element in elements:
        group = (element,) if isinstance(element, Field) else element.fields
        since = len(flat) + len(group) + 1 if isinstance(element, _Optional) else 0
        for field in group:
            if field.is_ext:
                field = replace(field, members=members)
            elif field.attr not in attrs:
                raise TypeError(f"{cls.__name__} has no field {field.attr!r} for {field.name}")
            flat.append(replace(field, since=since))
        if isinstance(element, Field) and not element.rest:
            if need < len(flat) - 1:
                raise TypeError(f"{cls.__name__}: {element.name} is required after optional ones")
            need = len(flat) + 1
    if members and not any(field.is_ext for field in flat):
        raise TypeError(f"{cls.__name__} has extension members but no extension map")
    if any(field.omit_none for field in flat[:-1]):
        raise TypeError(f"{cls.__name__}: only the last field may be left out when None")
    reading = tuple((field.since, index, field.read, field.name, field.attr, field.members)
                    for index, field in enumerate(flat, 1) if field.read is not None)
    return Schema(cls, message_type, name, tuple(flat), need, _layout(message_type, elements),
                  hot, reading, cls() if need == 1 else None)


#: Every schema, by class and by message type.
_SCHEMAS: Final[dict[type[Any], Schema]] = {}
_BY_TYPE: Final[dict[int, Schema]] = {}
#: What reads a body's array, by message type, and what writes a message's body, by class.
_READERS: Final[dict[int, Callable[[tuple[Any, ...]], Any]]] = {}
_WRITERS: Final[dict[type[Any], Callable[[Any], bytes]]] = {}
#: Where the claims map is, for the message types that carry one (see ``_unpack_claims``).
_CLAIMS_AT: Final[dict[int, int]] = {}


def schema(
    name: str, *elements: Field | _Optional, hot: bool = False
) -> Callable[[type[_M]], type[_M]]:
    """Declare the wire layout of a message dataclass: its SDK name, then the elements of its
    array after the type, in order (``opt(...)`` for those older SDKs leave out).

    ``hot``: compile a specialised reader and writer for it (see the module docstring).
    """

    def register(cls: type[_M]) -> type[_M]:
        spec = _build(cls, name, elements, hot)
        _SCHEMAS[cls] = _BY_TYPE[spec.type] = spec
        _READERS[spec.type] = _compile_reader(spec) if hot else partial(_read_generic, spec)
        _WRITERS[cls] = _compile_writer(spec) if hot else partial(_write_generic, spec)
        for index, field in enumerate(spec.fields, 1):
            if field.read is _claims:
                _CLAIMS_AT[spec.type] = index
        return cls

    return register


# --------------------------------------------------------------------------------------------
# The generic path: a schema interpreted


def _read_generic(spec: Schema, array: tuple[Any, ...]) -> Any:
    """The message of ``spec`` that ``array`` holds."""
    n = len(array)
    if n < spec.need:
        raise _too_short(spec, array)
    if n == 1 and spec.empty is not None:
        return spec.empty
    values: dict[str, Any] = {}
    for since, index, read, name, attr, members in spec.reading:
        if n < since:
            break
        value = read(array, index, name)
        if attr:
            values[attr] = value
        for key, member in members:  # the extension map's
            if key in value:
                values[member] = value[key]
    return spec.cls(**values)


def _ext_of(members: Iterable[tuple[int, str]], message: Any) -> dict[int, Any]:
    ext: dict[int, Any] = {}
    for key, attr in members:
        value = getattr(message, attr)
        convert = _EXT_MEMBERS[attr][1]
        if convert is None:
            if value is not None:
                ext[key] = value
        elif value:
            ext[key] = convert(value)
    return ext


def _write_generic(spec: Schema, message: Any) -> bytes:
    """The body of ``message``, element by element."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [b"", packer.pack(spec.type)]
    for field in spec.fields:
        if not field.attr:  # the extension map
            parts.append(packer.pack(_ext_of(field.members, message)))
            continue
        value = getattr(message, field.attr)
        if field.rest:
            parts.extend(packer.pack(item) for item in value)
            continue
        if value is None and field.omit_none:
            continue
        if field.write is not None:
            value = field.write(value, message)
        if field.pack is None:
            parts.append(packer.pack(value))
        else:
            parts.append(field.pack(packer, value, f"{spec.name} {field.attr}"))
    parts[0] = packer.pack_array_header(len(parts) - 1)
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# The specialised path: a schema compiled into straight-line Python


def _default(cls: type[Any], attr: str, namespace: dict[str, Any]) -> str:
    """An expression for the default of ``attr``, with what it needs put in ``namespace``."""
    spec = cls.__dataclass_fields__[attr]
    if spec.default is not MISSING:
        namespace[f"d_{attr}"] = spec.default
        return f"d_{attr}"
    if spec.default_factory is not MISSING:
        namespace[f"f_{attr}"] = spec.default_factory
        return f"f_{attr}()"
    raise TypeError(f"{cls.__name__}.{attr} is optional on the wire but has no default")


def _compile(source: list[str], name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    exec(compile("\n".join(source), f"<{name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    function.__source__ = "\n".join(source)  # type: ignore[attr-defined]
    return function


def _compile_reader(spec: Schema) -> Callable[[tuple[Any, ...]], Any]:
    """What ``_read_generic`` does for ``spec``, as one function of its own."""
    ns: dict[str, Any] = {"cls": spec.cls, "NO_EXT": _NO_EXT, "EMPTY": spec.empty,
                          "too_short": partial(_too_short, spec)}
    name = f"read_{spec.name}"
    code = [f"def {name}(a):", "    n = len(a)"]
    if spec.empty is not None:  # every array has a type: never too short
        code += ["    if n == 1:", "        return EMPTY"]
    else:
        code += [f"    if n < {spec.need}:", "        raise too_short(a)"]
    value_of: dict[str, str] = {}  # attribute -> the expression of its value so far
    numbered = enumerate(spec.fields, 1)
    for since, group in itertools.groupby(numbered, key=lambda item: item[1].since):
        read, absent, taken, untaken = [], [], [], []
        ext = ""
        for index, field in group:
            if field.read is None:
                continue
            ns[f"r{index}"] = field.read
            var = f"e{index}" if field.is_ext else f"v{index}"
            read.append(f"{var} = r{index}(a, {index}, {field.name!r})")
            if field.is_ext:
                ext = var
                absent.append(f"{var} = NO_EXT")
                for key, attr in field.members:
                    default = value_of.get(attr) or _default(spec.cls, attr, ns)
                    taken.append(f"x_{attr} = {var}.get({key}, {default})")
                    untaken.append(f"x_{attr} = {default}")
                    value_of[attr] = f"x_{attr}"
            else:
                if since > spec.need:
                    absent.append(f"{var} = {_default(spec.cls, field.attr, ns)}")
                value_of[field.attr] = var
        if since > spec.need and read:
            code += [f"    if n >= {since}:", *(f"        {line}" for line in read),
                     "    else:", *(f"        {line}" for line in absent)]
        else:
            code += [f"    {line}" for line in read]
        if taken:  # most extension maps are empty: no lookups then
            code += [f"    if {ext}:", *(f"        {line}" for line in taken),
                     "    else:", *(f"        {line}" for line in untaken)]
    arguments = [value_of.get(f.name) or _default(spec.cls, f.name, ns)
                 for f in fields(spec.cls)]
    code.append(f"    return cls({', '.join(arguments)})")
    return _compile(code, name, ns)


def _compile_writer(spec: Schema) -> Callable[[Any], bytes]:
    """What ``_write_generic`` does for ``spec``, as one function of its own: the array packed
    at once, or element by element where a field packs itself."""
    ns: dict[str, Any] = {"packb": msgpack.packb, "Packer": msgpack.Packer, "NO_EXT": _NO_EXT}
    name = f"write_{spec.name}"
    code = [f"def {name}(m):"]
    elements = [str(spec.type)]  # expressions of the values to pack
    packed: set[int] = set()  # the positions of those that are packed already
    array = ""
    for index, field in enumerate(spec.fields, 1):
        if field.is_ext:
            if not field.members:
                elements.append("NO_EXT")
                continue
            code.append("    ext = {}")
            for key, attr in field.members:
                convert = _EXT_MEMBERS[attr][1]
                if convert is None:
                    code += [f"    if m.{attr} is not None:", f"        ext[{key}] = m.{attr}"]
                else:
                    ns[f"c{key}"] = convert
                    code += [f"    if m.{attr}:", f"        ext[{key}] = c{key}(m.{attr})"]
            elements.append("ext")
            continue
        value = f"m.{field.attr}"
        if field.write is not None:
            ns[f"w{index}"] = field.write
            value = f"w{index}({value}, m)"
        if field.pack is not None:
            ns[f"k{index}"] = field.pack
            packed.add(len(elements))
            elements.append(f"k{index}(p, {value}, {f'{spec.name} {field.attr}'!r})")
        elif field.rest:
            elements.append(f"*m.{field.attr}")
        elif field.omit_none:  # the last field
            array = "array"
            code += [f"    array = [{', '.join(elements)}]", f"    if m.{field.attr} is not None:",
                     f"        array.append({value})"]
        else:
            elements.append(value)
    if not packed:
        array = array or f"[{', '.join(elements)}]"
        code.append(f"    return packb({array}, use_bin_type=True)")
        return _compile(code, name, ns)
    if array or any(field.rest for field in spec.fields):
        raise TypeError(f"{spec.name}: a field that packs itself needs a fixed layout")
    packer = msgpack.Packer(use_bin_type=True)
    ns["HEAD"] = packer.pack_array_header(len(elements)) + packer.pack(spec.type)
    parts = ["HEAD", *(e if i in packed else f"p.pack({e})"
                       for i, e in enumerate(elements) if i)]
    code += ["    p = Packer(use_bin_type=True)", f"    return b''.join(({', '.join(parts)}))"]
    return _compile(code, name, ns)


# --------------------------------------------------------------------------------------------
# Writing


def _body(message: ServiceMessage) -> bytes:
    writer = _WRITERS.get(type(message))
    if writer is None:
        raise LocalProtocolError(
            f"cannot write {type(message).__name__}: expected a service message "
            "(OpenConnectionMessage, ConnectionDataMessage, ServicePing, ...)"
        )
    try:
        return writer(message)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            f"cannot encode {type(message).__name__} as MessagePack ({exc}); expected str, "
            "bytes, int (64-bit), bool, None, and lists and maps of them in its fields"
        ) from None


def write_message(message: ServiceMessage) -> bytes:
    """Encode one service message as a frame: varint length prefix + MessagePack body.

    The layout is the one the current SDK writes (§2), byte for byte. Raises
    ``LocalProtocolError`` for something that is not a service message, or holds values
    MessagePack cannot carry.

    >>> write_message(ConnectionDataMessage("c1", b"{}\\x1e")).hex()
    '0b9406a26331c4037b7d1e80'
    """
    body = _body(message)
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(
            f"{type(message).__name__} of {len(body)} bytes exceeds the service protocol's "
            f"limit of {MAX_FRAME} bytes"
        )
    return encode_varint(len(body)) + body


def write_messages(messages: Iterable[ServiceMessage]) -> bytes:
    """Encode several messages into one buffer, in order (one WebSocket message may carry
    several frames)."""
    return b"".join([write_message(message) for message in messages])


# --------------------------------------------------------------------------------------------
# Reading


def _unpack(body: bytes | bytearray | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=False)
    except msgpack.ExtraData as exc:
        # The SDK reads one array from the frame and never looks at what follows it.
        return exc.unpacked
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(
            f"service message{_type_hint(body)} of {len(body)} bytes is not valid MessagePack "
            f"({unpack_error_text(exc)}); expected one array"
        ) from None


def _unpack_claims(body: bytes | bytearray | memoryview, at: int) -> Any:
    """A body whose claims map (element ``at``) is read pair by pair, so that a repeated claim
    type keeps every value (a tuple, in order) as the SDK's array of claims does; anything
    unexpected goes to ``_unpack`` and the readers, which say what is wrong."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=False)
    unpacker.feed(body)
    try:
        length = unpacker.read_array_header()
        if length > at:
            head = [unpacker.unpack() for _ in range(at)]
            claims: dict[str, Any] = {}
            for _ in range(unpacker.read_map_header()):
                name, value = unpacker.unpack(), unpacker.unpack()
                if type(name) is not str or type(value) is not str:
                    break
                earlier = claims.get(name)
                if earlier is None:
                    claims[name] = value
                elif type(earlier) is _RepeatedClaim:
                    claims[name] = _RepeatedClaim((*earlier, value))
                else:
                    claims[name] = _RepeatedClaim((earlier, value))
            else:
                return (*head, claims, *(unpacker.unpack() for _ in range(length - at - 1)))
    except Exception:  # truncated, or not this layout: the plain reader reports it
        pass
    return _unpack(body)


def _type_hint(body: bytes | bytearray | memoryview) -> str:
    # Say which message failed to unpack (e.g. a string that is not UTF-8): the array header
    # and the type are its first bytes.
    try:
        unpacker = msgpack.Unpacker(raw=True, strict_map_key=False)
        unpacker.feed(body)
        unpacker.read_array_header()
        message_type = unpacker.unpack()
    except Exception:  # the body is too broken to tell
        return ""
    if type(message_type) is not int:
        return ""
    known = _BY_TYPE.get(message_type)
    return f" ({known.name if known else 'unknown'}, type {message_type})"


def parse_message_body(body: bytes | bytearray | memoryview) -> ServiceMessage | None:
    """Decode one service message body (no length prefix).

    Returns ``None`` for a message type this protocol does not know (41-43 included, whose
    layouts are unconfirmed): the SDK skips them too. Raises ``RemoteProtocolError`` naming
    the message type and the field when the body is not a valid message.

    >>> parse_message_body(bytes.fromhex("9103"))
    ServicePing(values=())
    """
    # A message with claims (a fixarray of 3 or more, then its type) keeps repeated claim types.
    claims_at = _CLAIMS_AT.get(body[1]) if len(body) > 1 and 0x93 <= body[0] <= 0x9F else None
    array = _unpack(body) if claims_at is None else _unpack_claims(body, claims_at)
    if type(array) is not tuple or not array:
        raise RemoteProtocolError(
            f"service message body is {_show(array)}; expected a non-empty array whose first "
            "element is the message type"
        )
    message_type = array[0]
    if type(message_type) is not int:
        raise RemoteProtocolError(
            f"service message: element 0 (type) must be an integer, got {_show(message_type)}"
        )
    reader = _READERS.get(message_type)
    if reader is None:
        return None
    message: ServiceMessage = reader(array)
    return message
