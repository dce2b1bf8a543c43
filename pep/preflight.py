"""What `pep run` refuses at start, and what will deny at once, known before anything listens.

`config.parse` stays pure; this reads the files a config names, so a config that parses but cannot work is
refused at start with the key path, not at the first request. `pep check` and `pep run` both call
`startup_problems` (so they cannot drift), and both print `startup_warnings`. Neither binds a socket: a port that
is taken, or that needs privileges, stops `pep run` only (check may run on another machine, such as CI on the
rendered ConfigMap). Nothing here creates or changes a file.
"""

from __future__ import annotations

import importlib.util
import os
import ssl

from pep.config import Config, OAuthClientConfig, TlsConfig
from pep.credentials import CredentialSource
from pep.identity.keys import FileKeys, KeysError
from pep.identity.spiffe import server_context
from pep.oauth.client_auth import ClientAuth
from pep.pdp.cedar import CedarLoadError, CedarPdp
from pep.pdp.transport import tls_context
from pep.seal import SealKeyError, key_file_warning, read_key
from pep.secret_file import FileSecret


def startup_problems(config: Config) -> list[str]:
    """`file: key.path: message` for everything that stops `pep run` at start (sockets aside)."""
    problems = file_problems(config)
    log = decision_log_problem(config)
    if log is not None:
        problems.append(f"{config.source}: {log}")
    tracing = tracing_problem(config)
    if tracing is not None:
        problems.append(f"{config.source}: {tracing}")
    return problems


def startup_warnings(config: Config) -> list[str]:
    """`file: key.path: message` for what starts but denies at once (a route credential that is not there), and
    for key files any user of the machine may read."""
    warnings = [
        credential_warning(config, i, problem)
        for i, route in enumerate(config.routes)
        if route.credential is not None
        and route.credential.jit is None  # obtained per request: its files are startup problems instead
        and (problem := CredentialSource(route.credential).problem()) is not None
    ]
    for key, path in _private_files(config):
        warning = key_file_warning(path)
        if warning is not None:
            warnings.append(f"{config.source}: {key}: {warning}")
    return warnings


def _private_files(config: Config) -> list[tuple[str, str]]:
    """(key path, file) of the keys and secrets only the PEP should read: seal and ticket keys, OAuth client
    credentials, and the credentials it injects or presents upstream (an agent that can read those holds them)."""
    found: list[tuple[str, str]] = [(f"seal_key_files[{i}]", p) for i, p in enumerate(config.seal_key_files)]
    approvals = config.approvals
    if approvals is not None:
        found += [(f"approvals.ticket_key_files[{i}]", p) for i, p in enumerate(approvals.ticket_key_files)]
        found += _client_files("approvals", approvals.client)
    for i, route in enumerate(config.routes):
        credential = route.credential
        if credential is None:
            continue
        jit = credential.jit
        if jit is not None:
            found += _client_files(f"routes[{i}].credential", jit.client)
            if jit.actor_token_file is not None:
                found.append((f"routes[{i}].credential.actor_token_file", jit.actor_token_file))
        elif credential.value_file is not None:
            found.append((f"routes[{i}].credential.value_file", credential.value_file))
    return found


def _client_files(where: str, client: OAuthClientConfig) -> list[tuple[str, str]]:
    files = (("client_secret_file", client.secret_file), ("client_key_file", client.key_file))
    return [(f"{where}.{key}", path) for key, path in files if path is not None]


def _oauth_problems(src: str, where: str, client: OAuthClientConfig, tls: TlsConfig | None) -> list[str]:
    """The client's credential file and the TLS files of an OAuth server (approvals, a JIT credential)."""
    problems: list[str] = []
    problem = ClientAuth(client).problem()
    if problem is not None:
        key = "client_key_file" if client.method == "private_key_jwt" else "client_secret_file"
        problems.append(f"{src}: {where}.{key}: {problem}")
    if tls is not None:
        try:
            tls_context(tls.ca_file, tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{src}: {where}.tls: {exc}")
    return problems


def approval_problems(config: Config) -> list[str]:
    """The ticket keys, the OP client's credential and TLS files, and each JIT credential's files."""
    src = config.source
    problems: list[str] = []
    approvals = config.approvals
    if approvals is not None:
        for i, path in enumerate(approvals.ticket_key_files):
            try:
                read_key(path)
            except SealKeyError as exc:
                problems.append(f"{src}: approvals.ticket_key_files[{i}]: {exc}")
        problems += _oauth_problems(src, "approvals", approvals.client, approvals.tls)
    for i, route in enumerate(config.routes):
        jit = route.credential.jit if route.credential is not None else None
        if jit is None:
            continue
        where = f"routes[{i}].credential"
        problems += _oauth_problems(src, where, jit.client, jit.tls)
        if jit.actor_token_file is not None and FileSecret(jit.actor_token_file).value() is None:
            problems.append(
                f"{src}: {where}.actor_token_file: {jit.actor_token_file!r} is missing, unreadable or empty"
            )
    return problems


def credential_warning(config: Config, index: int, problem: str) -> str:
    """The line for routes[index]'s credential `problem` (from `CredentialSource.problem`)."""
    name = config.routes[index].name
    return (
        f"{config.source}: routes[{index}].credential.{problem}: requests on route {name} are denied"
        " (credential_unavailable)"
    )


def file_problems(config: Config) -> list[str]:
    """`file: key.path: message` for every named file that cannot be used (also checked on every reload)."""
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
    for i, path in enumerate(config.seal_key_files):
        try:
            read_key(path)
        except SealKeyError as exc:
            problems.append(f"{src}: seal_key_files[{i}]: {exc}")
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
    problems += approval_problems(config)
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


def decision_log_problem(config: Config) -> str | None:
    """Why `pep run` could not open `decision_log.path` for appending (creating it if missing), or None.

    Judged without opening or creating anything: an existing path must be a writable file, a missing one needs a
    writable directory. `pep run` still opens it at start and says so if that fails anyway."""
    log = config.decision_log
    if log.sink != "file" or log.path is None:
        return None
    path = log.path
    real = os.path.realpath(path)  # what O_CREAT would create through a symbolic link
    if os.path.isdir(real):
        return f"decision_log.path: {path!r} is a directory"
    if os.path.exists(real):
        return None if os.access(real, os.W_OK) else f"decision_log.path: {path!r} is not writable"
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):
        return f"decision_log.path: cannot create {path!r}: the directory {directory!r} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"decision_log.path: cannot create {path!r}: the directory {directory!r} is not writable"
    return None


def tracing_problem(config: Config) -> str | None:
    """`tracing` needs the `otel` extra; without it `pep run` could not build its exporter."""
    tracing = config.tracing
    if tracing is None:
        return None
    needed = ["opentelemetry.sdk"]
    if tracing.exporter == "otlp":
        needed.append("opentelemetry.exporter.otlp.proto.http")
    for module in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"tracing: needs the OpenTelemetry SDK ({module}): pip install 'failclosed-pep[otel]'"
    return None


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be opened for reading, or None. (ssl's own errors do not say which file they mean.)"""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"{path!r}: {exc.strerror or exc}"
