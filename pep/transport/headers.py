"""The case-insensitive, multi-valued view of a head's fields that the PEP's header logic reads.

The core hands out fields as bytes, in order, as sent. The PEP's modules (headers, integrity, identity, trace,
attributes) read `multidict.CIMultiDictProxy[str]` (`get`, `getall`, `in`, `items`), as aiohttp gave them, so the
view is that type, built only when asked for (one C call over a list). Names and values are decoded as aiohttp
decodes them, UTF-8 with surrogateescape: every byte survives a round trip through `encode_fields`.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

from pep.http1 import Fields


def header_view(fields: Fields) -> CIMultiDictProxy[str]:
    """A read-only case-insensitive multi-valued view of `fields`, in their order. Decoded strictly first (the
    usual head, all UTF-8, whose decode without arguments is the cheaper call, and the same text); a byte that
    is not UTF-8 takes the surrogateescape decode."""
    try:
        items = [(n.decode(), v.decode()) for n, v in fields]
    except UnicodeDecodeError:
        items = [(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in fields]
    return CIMultiDictProxy(CIMultiDict(items))


def encode_fields(items: Iterable[tuple[str, str]]) -> Fields:
    """Fields to send from `(name, value)` strings, byte for byte what `header_view` decoded. Nothing is checked
    here: the writer refuses a name that is not a token and a value with a control character."""
    return [(n.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for n, v in items]
