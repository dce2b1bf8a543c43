"""Checks of the files a config names (policies, CA bundle, PDP token), run by `pep check` and before `pep run`.

`config.parse` stays pure; this reads the files, so a config that parses but cannot work is still refused
at start with the key path, not at the first request.
"""

from __future__ import annotations

import ssl

from pep.config import Config
from pep.pdp.cedar import CedarLoadError, CedarPdp
from pep.pdp.transport import tls_context
from pep.secret_file import FileSecret


def file_problems(config: Config) -> list[str]:
    """`file: key.path: message` for every named file that cannot be used."""
    problems: list[str] = []
    src = config.source
    pdp = config.pdp
    if pdp.kind == "cedar" and pdp.policies is not None:
        try:
            CedarPdp(pdp.policies, pdp.entities)
        except CedarLoadError as exc:
            problems.append(f"{src}: {exc}")
    if pdp.tls is not None:
        try:
            tls_context(pdp.tls.ca_file, pdp.tls.cert_file, pdp.tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{src}: pdp.tls: {exc}")
    if pdp.auth is not None and FileSecret(pdp.auth.value_file).value() is None:
        problems.append(f"{src}: pdp.auth.value_file: {pdp.auth.value_file!r} is missing, unreadable or empty")
    return problems
