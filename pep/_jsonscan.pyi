"""Facts about a JSON text orjson accepted, from C (pep/_jsonscan.c; built by `make native`)."""

from typing import Any

def scan(
    data: bytes, value: dict[str, Any] | list[Any], fold: bool, /
) -> tuple[bool, int, int, list[dict[str, Any]]] | None: ...
