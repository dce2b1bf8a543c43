"""Checks of the files a config names (policies, CA bundle, PDP token), run by `pep check` and before `pep run`.

`config.parse` stays pure; this reads the files, so a config that parses but cannot work is still refused
at start with the key path, not at the first request.
"""

from __future__ import annotations

import ssl

from pep.config import Config
from pep.identity.keys import FileKeys, KeysError
from pep.identity.spiffe import server_context
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
    jwt = config.identity.jwt
    if jwt is not None and jwt.jwks_file is not None:
        try:
            FileKeys(jwt.jwks_file, jwt.algorithms).load()
        except KeysError as exc:
            problems.append(f"{src}: identity.jwt.jwks_file: {jwt.jwks_file!r} {str(exc).removeprefix('jwks_file ')}")
    if jwt is not None and jwt.jwks_ca_file is not None:
        try:
            ssl.create_default_context(cafile=jwt.jwks_ca_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{src}: identity.jwt.jwks_ca_file: {exc}")
    mtls = config.identity.mtls
    if mtls is not None:
        files = (("ca_file", mtls.ca_file), ("cert_file", mtls.cert_file), ("key_file", mtls.key_file))
        unreadable = [(key, problem) for key, path in files if (problem := _unreadable(path)) is not None]
        problems.extend(f"{src}: identity.mtls.{key}: {problem}" for key, problem in unreadable)
        if not unreadable:  # all three open: what is left is their contents (not PEM, a key of another cert)
            try:
                server_context(mtls)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"{src}: identity.mtls: {exc}")
    return problems


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be opened for reading, or None. (ssl's own errors do not say which file they mean.)"""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"{path!r}: {exc.strerror or exc}"
