"""Field lines: checking an unchecked block, the comma lists framing depends on, and the functions in C that find a
head, split the field lines llhttp has checked, write a head's field lines and keep the end-to-end fields
(pep/http1/_fieldlines.c), each beside the Python twin that pure Python uses.

Checks use `bytes.translate`: one C pass per field, where a regular expression would cost about ten times as much
per byte. Deleting the allowed bytes and looking at what is left builds a table on every call; on the hot paths a
fixed table (`keeping`) that maps every allowed byte to itself and every other byte elsewhere does the same check
at a third of the cost: the bytes are all allowed exactly when they come back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pep.http1.errors import LocalProtocolError, ProtocolError
from pep.http1.events import Fields
from pep.http1.limits import Limits

# RFC 9110 5.6.2 tchar
TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 5.5 field-vchar, SP and HTAB: every byte but the controls (CR, LF and NUL among them) and DEL
VALUE: Final = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
_OWS: Final = b" \t"


def keeping(allowed: bytes) -> bytes:
    """A `bytes.translate` table under which `data.translate(table) == data` holds exactly when every byte of
    `data` is in `allowed` (each allowed byte maps to itself, each other byte to a different one)."""
    return bytes(b if b in allowed else b ^ 1 for b in range(256))


KEEP_VALUE: Final = keeping(VALUE)


def is_token(data: bytes) -> bool:
    return bool(data) and not data.translate(None, TOKEN)


def is_value(data: bytes) -> bool:
    return not data.translate(None, VALUE)


def parse_fields(block: bytes, limits: Limits, what: str) -> Fields:
    """Field lines nobody has checked yet (a trailer section), held to the same rules as a head's."""
    if not block:
        return []
    lines = block.split(b"\r\n")
    if len(lines) > limits.max_fields:
        raise ProtocolError(f"more than {limits.max_fields} {what} fields", 431)
    fields = []
    for line in lines:
        if len(line) > limits.max_field_bytes:
            raise ProtocolError(f"a {what} field over {limits.max_field_bytes} bytes", 431)
        name, colon, value = line.partition(b":")
        if not colon or not is_token(name):
            raise ProtocolError(f"malformed {what} field (no token before a colon, or a folded line)")
        if not is_value(value):
            raise ProtocolError(f"control character in a {what} field value")
        fields.append((name, value.strip(_OWS)))
    return fields


def head_bounds(buf: bytearray, max_head: int, max_line: int) -> tuple[int, int] | None:
    """Where a head's CR LF CR LF starts, if it ends within `max_head` bytes (None if not), and where its first
    LF is, if within `max_line + 2` bytes (else -1)."""
    end = buf.find(b"\r\n\r\n", 0, max_head)
    if end < 0:
        return None
    return end, buf.find(b"\n", 0, max_line + 2)


def split_lines(buf: bytearray, start: int, stop: int, wanted: tuple[bytes, ...]) -> tuple[Fields, Fields]:
    """The field lines of buf[start:stop], a block llhttp has accepted (each line a token, a colon and a value
    without controls, CR LF between them): names as sent, values without the spaces and tabs around them. And the
    fields whose lower-cased name is one of `wanted` (lower case), as (that name, value): those a reader acts on."""
    fields: Fields = []
    picked: Fields = []
    if stop <= start:
        return fields, picked
    for line in bytes(buf[start:stop]).split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("a field line without a colon")
        value = value.strip(_OWS)
        fields.append((name, value))
        key = name.lower()
        if key in wanted:
            picked.append((key, value))
    return fields, picked


def keep_fields(fields: Fields, drop: frozenset[bytes]) -> tuple[Fields, list[bytes]]:
    """The fields whose lower-cased name is not in `drop`, in order, and the values of the Connection fields."""
    kept: Fields = []
    connection: list[bytes] = []
    for field in fields:
        name = field[0].lower()
        if name == b"connection":
            connection.append(field[1])
        if name not in drop:
            kept.append(field)
    return kept, connection


Bounds = Callable[[bytearray, int, int], "tuple[int, int] | None"]
SplitLines = Callable[[bytearray, int, int, tuple[bytes, ...]], tuple[Fields, Fields]]
JoinLines = Callable[[Fields], "bytes | None"]
KeepFields = Callable[[Fields, frozenset[bytes]], "tuple[Fields, list[bytes]] | None"]


def _native_bounds() -> Bounds:
    try:
        from pep.http1._fieldlines import bounds  # optional: only `make native` builds it
    except ImportError:  # pure Python (PEP_PURE=1, or no build or a stale one: pep/native.py)
        return head_bounds
    return bounds


def _native_split() -> SplitLines:
    try:
        from pep.http1._fieldlines import split
    except ImportError:  # as in _native_bounds
        return split_lines
    return split


def _native_join() -> JoinLines | None:
    try:
        from pep.http1._fieldlines import join
    except ImportError:  # as in _native_bounds: pep/http1/writer.py writes without it
        return None
    return join


def _native_keep() -> KeepFields:
    try:
        from pep.http1._fieldlines import keep
    except ImportError:  # as in _native_bounds
        return keep_fields
    return keep


# In C when the request path is compiled (pep/http1/_fieldlines.c), where the profile of a GET and a 2 KB MCP
# call (callgrind, instructions per request) asked for it:
# - a head's bounds and its field lines: through llhttp's `on_header` callback, one call into Python per field,
#   the three heads of a request (the request, the PDP's answer, the upstream's answer) took 18k, two
#   `bytearray.find` per head 1.5k each, and the readers' loops over every field for the few they act on 10k;
BOUNDS: Final = _native_bounds()
SPLIT_LINES: Final = _native_split()
# - the writer's field lines: a list of four pieces per field, one join and a marking pass over the block took 24k
#   over the three heads an MCP call writes (the PDP request, the upstream request, the answer);
JOIN_LINES: Final = _native_join()
# - the end-to-end fields of the upstream request and of the answer (pep/headers.py): 12k, a `lower()` per field.
KEEP_FIELDS: Final = _native_keep()


def check_fields(fields: Fields) -> None:
    """Fields this side is about to send: names are tokens, values hold no control characters (no CR or LF
    that would end the line and start another field)."""
    names = [name for name, _ in fields]
    if b"" in names or b"".join(names).translate(None, TOKEN):
        raise LocalProtocolError(f"a field name is not a token: {names!r}")
    if b"".join([value for _, value in fields]).translate(None, VALUE):
        raise LocalProtocolError("a field value holds a control character")


def comma_tokens(value: bytes) -> list[bytes]:
    """The members of a comma-separated list field, lower-cased, empty members dropped (RFC 9110 5.6.1)."""
    value = value.lower()
    if value.find(b",") < 0:  # one member, as in most Connection fields (`in` would raise and clear a TypeError)
        return [value] if value else []
    return [member for part in value.split(b",") if (member := part.strip(_OWS))]


def check_line_sizes(block: bytes, limits: Limits, status: int) -> None:
    """No field line of a head over `max_field_bytes` (only a block longer than that can hold one)."""
    if len(block) > limits.max_field_bytes and max(map(len, block.split(b"\r\n"))) > limits.max_field_bytes:
        raise ProtocolError(f"a header field over {limits.max_field_bytes} bytes", status)


def persists(version: bytes, connection: bytes | None) -> bool:
    """Whether the connection may carry another message after this one (RFC 9112 9.3): HTTP/1.1 unless
    Connection has `close`, HTTP/1.0 only with `keep-alive` (and no `close`). Connection is read here as a
    list, not by llhttp: llhttp misses `close` after another member without a space (`x,close`) and lets
    `keep-alive, close` keep the connection."""
    if connection is None:
        return version == b"1.1"
    if len(connection) == 10 and connection.lower() == b"keep-alive":  # what most clients send
        return True
    tokens = comma_tokens(connection)
    return b"close" not in tokens and (version == b"1.1" or b"keep-alive" in tokens)
