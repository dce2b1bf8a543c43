"""A PDP that cannot be reached is said at once: on stderr, in `pep_pdp_reachable`, and in /readyz until it was
reached once. Nothing of this weakens the rule: every request is still decided, and denied while the PDP is away.
The probes are connections only; they never count against the circuit breaker."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
import yaml

from pep.pdp import reachability
from tests.conftest import PepStarter, RunningPep, base_config
from tests.support.fault_pdp import FaultPdp
from tests.support.observe import metric
from tests.support.process import ensure_stopped, read_line, start_pep
from tests.support.upstream import RecordingUpstream


async def status(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        body = await r.read()
        return r.status, orjson.loads(body) if r.content_type == "application/json" else body.decode()


async def call(url: str) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        await r.read()
        return r.status, r.headers.get("x-pep-reason")


async def scrape(admin: str) -> str:
    return str((await status(admin + "/metrics"))[1])


@pytest.fixture
async def absent_pdp() -> AsyncIterator[FaultPdp]:
    """A PDP whose port is known but where nothing listens yet (`apply("allow")` brings it up there)."""
    pdp = FaultPdp()
    await pdp.start()
    await pdp.apply("refuse")
    yield pdp
    await pdp.stop()


async def test_a_pdp_absent_at_start_is_said_and_not_ready_until_it_comes(
    tmp_path: Path, absent_pdp: FaultPdp, upstream: RecordingUpstream
) -> None:
    config = tmp_path / "pep.yaml"
    config.write_text(yaml.safe_dump(base_config(absent_pdp.url, upstream.url, tmp_path / "log.jsonl")))
    proc = await start_pep("run", "-c", str(config))
    try:
        assert proc.stderr is not None
        origin = f"http://127.0.0.1:{absent_pdp.port}"
        warning = await read_line(proc.stderr, "failclosed-pep: warning: PDP", 20)
        assert warning.startswith(f"failclosed-pep: warning: PDP {origin} unreachable: ConnectionRefusedError")
        assert warning.rstrip().endswith("requests are denied until it answers; /readyz is 503 until it is reached")
        assert "/v1/data" not in warning  # the origin only
        listening = await read_line(proc.stderr, "proxy on", 20)
        admin = "http://" + listening.rsplit("admin on ", 1)[1].strip()
        proxy = "http://" + listening.split("proxy on ", 1)[1].split(",", 1)[0]

        assert await status(admin + "/readyz") == (503, {"ready": False, "reasons": ["pdp_unreachable"]})
        assert (await status(admin + "/healthz"))[0] == 200
        text = await scrape(admin)
        assert metric(text, "pep_pdp_reachable") == 0
        assert await call(proxy + "/tools/x") == (403, "pdp_unreachable")  # decided, and denied
        assert upstream.seen == []
        text = await scrape(admin)
        assert metric(text, "pep_circuit_transitions_total") == 0  # probes never count against the breaker

        await absent_pdp.apply("allow")
        await read_line(proc.stderr, f"failclosed-pep: PDP {origin} reachable", 3)
        assert await status(admin + "/readyz") == (200, {"ready": True, "reasons": []})
        assert metric(await scrape(admin), "pep_pdp_reachable") == 1
        assert await call(proxy + "/tools/x") == (200, None)
        assert [r.target for r in upstream.seen] == ["/tools/x"]
        assert len(absent_pdp.requests) == 1  # the probes sent no request: only the decision did
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
        await ensure_stopped(proc)


async def test_a_pdp_that_goes_away_without_traffic_is_said_once_per_change(
    make_pep: PepStarter,
    fault_pdp: FaultPdp,
    upstream: RecordingUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reachability, "INTERVAL_S", 0.1)
    monkeypatch.setattr(reachability, "RETRY_S", 0.1)
    pep: RunningPep = await make_pep()
    origin = f"http://127.0.0.1:{fault_pdp.port}"
    assert metric(await scrape(pep.admin_url), "pep_pdp_reachable") == 1
    assert "PDP" not in capsys.readouterr().err  # nothing to say about a PDP that is there

    async def said(text: str) -> str:
        seen = ""
        async with asyncio.timeout(3):
            while text not in seen:
                await asyncio.sleep(0.05)
                seen += capsys.readouterr().err
        return seen

    await fault_pdp.apply("refuse")
    gone = await said(f"failclosed-pep: warning: PDP {origin} unreachable: ")
    assert "requests are denied while it is down" in gone
    assert metric(await scrape(pep.admin_url), "pep_pdp_reachable") == 0
    # Reached once: readiness follows the circuit, which only decisions move.
    assert await status(pep.admin_url + "/readyz") == (200, {"ready": True, "reasons": []})
    assert await call(pep.url + "/tools/x") == (403, "pdp_unreachable")
    await asyncio.sleep(0.5)  # several failed probes: said once
    assert (gone + capsys.readouterr().err).count("unreachable") == 1
    await fault_pdp.apply("allow")
    await said(f"failclosed-pep: PDP {origin} reachable")
    assert metric(await scrape(pep.admin_url), "pep_pdp_reachable") == 1
    assert [r.target for r in upstream.seen] == []
    text = await scrape(pep.admin_url)
    assert metric(text, "pep_circuit_transitions_total") == 0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_to_the_pdp_is_probed_as_decisions_use_it(
    make_pep: PepStarter, tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe does the TLS handshake with `pdp.tls`: a PDP whose certificate is not trusted is unreachable."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    pdp = FaultPdp(tls=context)
    await pdp.start()
    trusted, stranger = tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    ca.cert_pem.write_to_path(str(trusted))
    trustme.CA().cert_pem.write_to_path(str(stranger))
    try:
        for ca_file, reachable in ((stranger, False), (trusted, True)):

            def tls(c: dict[str, Any], ca_file: Path = ca_file) -> None:
                c["pdp"].update(url=pdp.url, tls={"ca_file": str(ca_file)})

            pep: RunningPep = await make_pep(tls)
            err = capsys.readouterr().err
            ready = await status(pep.admin_url + "/readyz")
            if reachable:
                assert ready == (200, {"ready": True, "reasons": []})
                assert "unreachable" not in err
                assert await call(pep.url + "/tools/x") == (200, None)
            else:
                assert ready == (503, {"ready": False, "reasons": ["pdp_unreachable"]})
                assert "unreachable: SSLCertVerificationError" in err
        assert len(pdp.requests) == 1
    finally:
        await pdp.stop()


async def test_an_embedded_cedar_pdp_is_always_reachable(
    make_pep: PepStarter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.cedar"
    policy.write_text("permit(principal, action, resource);")
    pep: RunningPep = await make_pep(lambda c: c.update(pdp={"kind": "cedar", "policies": str(policy)}))
    assert metric(await scrape(pep.admin_url), "pep_pdp_reachable") == 1
    assert await status(pep.admin_url + "/readyz") == (200, {"ready": True, "reasons": []})
    assert "PDP" not in capsys.readouterr().err


def point_pdp_at(config: Path, url: str) -> None:
    raw = yaml.safe_load(config.read_text())
    raw["pdp"]["url"] = url
    config.write_text(yaml.safe_dump(raw))


async def test_a_reload_to_a_pdp_that_is_not_there_is_not_ready(
    make_pep: PepStarter, absent_pdp: FaultPdp, capsys: pytest.CaptureFixture[str]
) -> None:
    pep: RunningPep = await make_pep()
    assert (await status(pep.admin_url + "/readyz"))[0] == 200
    point_pdp_at(Path(pep.server.config.source), absent_pdp.url)
    assert await pep.server.reload_config()
    await pep.server.reachability.probe()  # what the woken prober does next, awaited here
    assert await status(pep.admin_url + "/readyz") == (503, {"ready": False, "reasons": ["pdp_unreachable"]})
    assert f"PDP http://127.0.0.1:{absent_pdp.port} unreachable" in capsys.readouterr().err
