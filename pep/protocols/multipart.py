"""A strict, pure reader of `multipart/form-data` bodies: the text fields a decision needs, or why not.

Written here rather than taken from aiohttp's or python-multipart's readers because those are lenient where
upstream parsers disagree (LF-only delimiters, a preamble, `filename*`, `Content-Transfer-Encoding`, repeated
fields, quoting), and a body two parsers read differently could carry one model past the PEP and another to
the upstream. This reader refuses every such form instead: CRLF delimiters only, no preamble, no epilogue but a
final CRLF, the boundary nowhere in the body except as a delimiter, exactly one `Content-Disposition:
form-data; name="..."` per part (optionally `filename="..."`) and at most a `Content-Type`, and each wanted field
at most once, as UTF-8 text, never a file. It does no IO (bytes in, fields out).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

_BOUNDARY: Final = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PARAM: Final = re.compile(
    r';[ \t]*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)=("[^"\\\r\n]*"|[!#$%&\'*+\-.^_`|~0-9A-Za-z]+)[ \t]*'
)
_MAX_PARTS: Final = 1000


class FormError(ValueError):
    """The form cannot be read strictly; the message says why."""


@dataclass(frozen=True, slots=True)
class Form:
    names: tuple[str, ...]  # every part's field name, in order
    values: dict[str, str]  # the wanted text fields that are present


def _params(text: str) -> dict[str, str]:
    """`; a=b; c="d"` into a dict (keys lower-cased); a repeated or malformed parameter is refused."""
    params: dict[str, str] = {}
    at = 0
    while at < len(text):
        m = _PARAM.match(text, at)
        if m is None:
            raise FormError("a malformed header parameter")
        key = m.group(1).lower()
        if key in params:
            raise FormError(f"a repeated {key!r} parameter")
        value = m.group(2)
        params[key] = value[1:-1] if value.startswith('"') else value
        at = m.end()
    return params


def _split(value: str) -> tuple[str, dict[str, str]]:
    """A header value's main part (lower-cased) and its parameters."""
    main, sep, rest = value.partition(";")
    return main.strip().lower(), _params(sep + rest.rstrip(" \t")) if sep else {}


def boundary(content_type: str) -> str:
    """The boundary of a `multipart/form-data` Content-Type that carries nothing else."""
    media, params = _split(content_type)
    if media != "multipart/form-data":
        raise FormError("not multipart/form-data")
    if set(params) != {"boundary"}:
        raise FormError("Content-Type must carry exactly one parameter, boundary")
    value = params["boundary"]
    if not _BOUNDARY.fullmatch(value):
        raise FormError("an invalid multipart boundary")
    return value


def _part_headers(block: bytes) -> tuple[str, bool, str | None]:
    """(field name, is a file, content type) of one part's header block."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise FormError("a part header that is not ASCII") from None
    disposition: str | None = None
    content_type: str | None = None
    for line in text.split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise FormError("a malformed part header")
        value = value.strip(" \t")
        key = name.lower()
        if key == "content-disposition" and disposition is None:
            disposition = value
        elif key == "content-type" and content_type is None:
            content_type = value
        else:
            raise FormError(f"a repeated or unexpected part header {name[:32]!r}")
    if disposition is None:
        raise FormError("a part without Content-Disposition")
    kind, params = _split(disposition)
    if kind != "form-data" or "name" not in params or not set(params) <= {"name", "filename"}:
        raise FormError("Content-Disposition must be form-data naming the field (and at most a filename)")
    return params["name"], "filename" in params, content_type


def fields(body: bytes, content_type: str, wanted: Iterable[str]) -> Form | str:
    """The `wanted` text fields of a form (each at most once), or why the form cannot be read."""
    try:
        return _fields(body, content_type, frozenset(wanted))
    except FormError as exc:
        return str(exc)


def _fields(body: bytes, content_type: str, wanted: frozenset[str]) -> Form:
    delimiter = b"--" + boundary(content_type).encode("ascii")
    if not body.startswith(delimiter + b"\r\n"):
        raise FormError("a multipart body must start with its boundary (no preamble)")
    parts = body[len(delimiter) + 2 :].split(b"\r\n" + delimiter)
    last = parts.pop()
    if last not in (b"--", b"--\r\n"):
        raise FormError("a multipart body must end with its closing boundary and nothing after it")
    if body.count(delimiter) != len(parts) + 1:
        raise FormError("the multipart boundary appears inside a part")
    if len(parts) > _MAX_PARTS:
        raise FormError("too many multipart parts")
    names: list[str] = []
    values: dict[str, str] = {}
    for index, raw in enumerate(parts):
        part = raw
        if index:
            if not part.startswith(b"\r\n"):
                raise FormError("a multipart boundary followed by something other than CRLF")
            part = part[2:]
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise FormError("a part without a header block")
        name, is_file, part_type = _part_headers(head)
        names.append(name)
        if name not in wanted:
            continue
        if name in values:
            raise FormError(f"the field {name!r} appears more than once")
        if is_file:
            raise FormError(f"the field {name!r} is a file")
        if part_type is not None:
            media, params = _split(part_type)
            if media != "text/plain" or {k: v.lower() for k, v in params.items()} not in ({}, {"charset": "utf-8"}):
                raise FormError(f"the field {name!r} is not UTF-8 text")
        try:
            values[name] = content.decode("utf-8")
        except UnicodeDecodeError:
            raise FormError(f"the field {name!r} is not UTF-8") from None
    return Form(tuple(names), values)
