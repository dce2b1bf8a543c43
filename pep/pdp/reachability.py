"""Whether the remote PDP can be reached, known before the first request and without traffic.

A PDP that is down at start, or goes down while no request comes, shows nowhere else: the circuit breaker
counts decisions only. So the PEP connects to the PDP's host and port (with the TLS handshake of `pdp.tls` for
https) at start, then every `INTERVAL_S`, or every `RETRY_S` while that fails. A probe sends no request: it
decides nothing, costs the PDP one connection, and never counts against the circuit breaker, whose state stays
a judgement of decisions (a PDP that accepts connections may still fail every decision, and a failed probe must
not open a circuit that no request would have opened). The result is the `pep_pdp_reachable` gauge, one stderr
line per change, and `/readyz` 503 `pdp_unreachable` until the PDP has been reached once: a pod whose PDP was
never there is not put in service. Requests are decided as always: a probe never allows anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from pep.config import PdpConfig
from pep.pdp.transport import tls_context

PROBE_TIMEOUT_S: Final = 2.0  # one connection attempt, handshake included
RETRY_S = 1.0  # between probes while the PDP cannot be reached
INTERVAL_S = 5.0  # between probes while it can

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """Where a remote PDP listens: its origin (all that is ever printed: no path, no credential) and TLS."""

    origin: str
    host: str
    port: int
    tls: bool
    config: PdpConfig

    @classmethod
    def of(cls, pdp: PdpConfig) -> Target | None:
        """The probe target of a config's PDP; None for an in-process one (Cedar), which is always there."""
        if pdp.kind == "cedar":
            return None
        parts = urlsplit(pdp.url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS.get(scheme, 80)
        shown = f"[{host}]" if ":" in host else host
        return cls(f"{scheme}://{shown}:{port}", host, port, scheme == "https", pdp)

    def same_place(self, other: Target | None) -> bool:
        return other is not None and (self.origin, self.config.tls) == (other.origin, other.config.tls)


async def connect(target: Target) -> str | None:
    """None when a connection (and for https the TLS handshake, verified as decisions are) succeeds; else why not."""
    context: ssl.SSLContext | None = None
    try:
        if target.tls:
            tls = target.config.tls
            context = (
                tls_context(tls.ca_file, tls.cert_file, tls.key_file)
                if tls is not None
                else ssl.create_default_context()
            )
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(
                target.host, target.port, ssl=context, server_hostname=target.host if context else None
            )
    except TimeoutError:
        return f"no connection within {PROBE_TIMEOUT_S:g} s"
    except (OSError, ssl.SSLError, ValueError) as exc:  # ssl.SSLError is an OSError; ValueError: a bad host
        return f"{type(exc).__name__}: {exc}"
    writer.transport.abort()  # nothing was sent; no goodbye needed
    return None


class Reachability:
    """Probes the PDP of the config in force (`current()`), for as long as `run()` runs.

    `say` gets one line per change; `gauge` gets 1 or 0 after every probe (1 for an in-process PDP)."""

    def __init__(self, current: Callable[[], PdpConfig], say: Callable[[str], None], gauge: Callable[[int], None]):
        self._current = current
        self._say = say
        self._gauge = gauge
        self._target: Target | None = None
        self._up: bool | None = None  # the last probe's result; None before the first one
        self.reached = False  # the PDP in force was reached at least once (always, for an in-process one)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Probe now (the PDP config may have changed on reload)."""
        self._wake.set()

    async def probe(self) -> None:
        """One probe of the PDP in force; says and counts what changed."""
        target = Target.of(self._current())
        if target is None:
            self._target, self._up, self.reached = None, True, True
            self._gauge(1)
            return
        if target.same_place(self._target):
            assert self._target is not None
            target = self._target
        else:
            self._target, self._up, self.reached = target, None, False  # another PDP: nothing is known about it
        problem = await connect(target)
        if target is not self._target:  # the config changed while this probe ran: its result means nothing
            return
        up = problem is None
        self._gauge(1 if up else 0)
        if up and self._up is False:
            self._say(f"failclosed-pep: PDP {target.origin} reachable")
        elif not up and self._up is not False:
            if self.reached:
                then = "requests are denied while it is down"
            else:
                then = "requests are denied until it answers; /readyz is 503 until it is reached"
            self._say(f"failclosed-pep: warning: PDP {target.origin} unreachable: {problem}; {then}")
        self._up = up
        self.reached = self.reached or up

    async def run(self) -> None:
        """Probe forever (the first probe is the caller's, at start)."""
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), INTERVAL_S if self._up else RETRY_S)
            await self.probe()
