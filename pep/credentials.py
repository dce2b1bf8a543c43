"""Upstream credentials the PEP injects on allowed requests: the agent never holds them.

A value comes from a file (re-read when it changes, at most a second later, and on SIGHUP) or from an
environment variable (read at start). A missing or empty value, or one with a control character (it would
split the header), is unavailable: requests on that route are denied `credential_unavailable`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

from pep.config import Credential
from pep.secret_file import FileSecret

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


class CredentialSource:
    __slots__ = ("_file", "_static", "config", "header")

    def __init__(self, config: Credential, environ: Mapping[str, str] = os.environ) -> None:
        self.config = config
        self.header = config.header
        self._file: FileSecret | None = None
        self._static: str | None = None
        if config.jit is not None:
            # Obtained per request after the allow (pep/credentials_oauth.py): there is nothing to hold here.
            raise ValueError("a just-in-time credential has no static value")
        if config.value_file is not None:
            self._file = FileSecret(config.value_file, config.format)
        else:
            raw = environ.get(config.value_env or "", "").strip()
            self._static = config.format.replace("{}", raw, 1) if raw else None

    def value(self) -> str | None:
        value = self._file.value() if self._file is not None else self._static
        if value is None or _CONTROL.search(value):
            return None
        return value

    def problem(self) -> str | None:
        """Why `value()` is None, as `key: what` naming the file or variable (never the value), or None."""
        value = self._file.value() if self._file is not None else self._static
        if self._file is not None:
            where = f"value_file: {self._file.path!r}"
            missing = "is missing, unreadable or empty"
        else:
            where = f"value_env: {self.config.value_env}"
            missing = "is not set or empty"
        if value is None:
            return f"{where} {missing}"
        if _CONTROL.search(value):
            return f"{where} holds a control character"
        return None

    def refresh(self) -> None:
        if self._file is not None:
            self._file.refresh()
