"""The mTLS listener follows its files: a rotated certificate or trust bundle applies to new connections
without a restart, and a broken rotation keeps the last good certificates."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tests.conftest import PepStarter
from tests.support.fault_pdp import FaultPdp
from tests.support.upstream import RecordingUpstream

WAIT_S = 5.0  # upper bound for a change to be seen (checked every second)


def write_pki(tmp: Path, ca: trustme.CA, name: str) -> tuple[Path, Path, Path]:
    """The bundle, the listener's chain and key, written where the config points (replaced atomically)."""
    files = (tmp / "bundle.pem", tmp / "server.pem", tmp / "server.key")
    cert = ca.issue_cert("127.0.0.1", f"{name}.test")
    blobs = (ca.cert_pem.bytes(), b"".join(b.bytes() for b in cert.cert_chain_pems), cert.private_key_pem.bytes())
    for path, blob in zip(files, blobs, strict=True):
        staged = path.with_suffix(".new")
        staged.write_bytes(blob)
        os.replace(staged, path)
    return files


def client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ca.issue_cert("client.test").configure_cert(ctx)  # trusted, but no SPIFFE ID: answered 401
    return ctx


async def status(url: str, ctx: ssl.SSLContext) -> int | str:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=ctx, timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            return response.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def wait_for(url: str, ctx: ssl.SSLContext, wanted: int) -> int | str:
    got: int | str = "never tried"
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        got = await status(url, ctx)
        if got == wanted:
            return got
        await asyncio.sleep(0.1)
    return got


async def test_a_rotated_bundle_and_certificate_apply_without_restart(
    tmp_path: Path, fault_pdp: FaultPdp, upstream: RecordingUpstream, make_pep: PepStarter
) -> None:
    old, new = trustme.CA(), trustme.CA()
    bundle, chain, key = write_pki(tmp_path, old, "old")

    def mtls(cfg: dict[str, Any]) -> None:
        cfg["identity"]["mtls"] = {"ca_file": str(bundle), "cert_file": str(chain), "key_file": str(key)}

    pep = await make_pep(mtls)
    url = f"https://127.0.0.1:{pep.port}/tools/x"
    assert await status(url, client(old)) == 401  # handshake accepted; no SPIFFE ID in this certificate
    assert isinstance(await status(url, client(new)), str)  # the new CA is not trusted yet

    write_pki(tmp_path, new, "new")
    assert await wait_for(url, client(new), 401) == 401
    assert isinstance(await status(url, client(old)), str)  # the old bundle and certificate are gone

    key.write_text("not a key")  # a broken rotation: the last good certificates stay
    await asyncio.sleep(1.2)
    assert await status(url, client(new)) == 401
    assert upstream.seen == []
