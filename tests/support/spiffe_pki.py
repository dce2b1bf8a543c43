"""A throwaway SPIFFE trust domain for tests: X509-SVIDs from a test CA, and JWT-SVID-style bearer tokens.

trustme cannot put URI SANs in a certificate, so the CAs here are built with `cryptography`. `SpiffePki.create`
writes every PEM to one directory:
- `ca.pem`, the trust bundle (`identity.mtls.ca_file`), and `server.pem`/`server.key` for the PEP's listener
  (IP SAN 127.0.0.1);
- client certificates of the trusted CA: `svid` (exactly one spiffe:// URI SAN, the SVID), `no_uri` (a DNS SAN
  only), `two_uris` (two spiffe:// URI SANs), `not_spiffe` (one https:// URI SAN);
- `untrusted`: a valid-looking SVID from a second, unrelated CA that the PEP does not trust.

`JwtAuthority` is the token side: an ES256 key pair, its public JWKS written to a file (`identity.jwt.jwks_file`),
and `mint(...)` for signed tokens; `forger()` is another key that claims the same `kid`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "example.org"
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/agents/sa/bot"
OTHER_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/agents/sa/other"
UNTRUSTED_SPIFFE_ID = "spiffe://evil.example/ns/agents/sa/bot"
NOT_SPIFFE_URI = "https://example.org/ns/agents/sa/bot"

_LIFETIME = datetime.timedelta(hours=1)
_SKEW = datetime.timedelta(minutes=5)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert_file: Path
    key_file: Path


class TestCA:
    """A self-signed root that issues leaf certificates directly (no intermediates)."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str) -> None:
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        directory: Path,
        name: str,
        sans: Sequence[x509.GeneralName],
        *,
        server: bool = False,
        lifetime: datetime.timedelta = _LIFETIME,
    ) -> Issued:
        """A leaf certificate with `sans`, for a server (serverAuth) or a client (clientAuth), valid from a few
        minutes ago for `lifetime`, written to `directory/name.pem` and `directory/name.key`."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
        issued.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key_file.write_bytes(_key_pem(key))
        return issued


def uri(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(value)


def dns(value: str) -> x509.GeneralName:
    return x509.DNSName(value)


@dataclass(frozen=True)
class SpiffePki:
    """The files of one test trust domain. `clients` holds `svid`, `no_uri`, `two_uris`, `not_spiffe`, `untrusted`."""

    directory: Path
    ca_file: Path
    server: Issued
    clients: dict[str, Issued]
    other_ca_file: Path  # the untrusted CA's bundle (a client would need it only to present `untrusted` knowingly)
    ca: TestCA
    other_ca: TestCA

    @classmethod
    def create(cls, directory: Path) -> SpiffePki:
        directory.mkdir(parents=True, exist_ok=True)
        ca, other = TestCA("failclosed-pep test trust domain"), TestCA("an unrelated CA")
        ca_file, other_ca_file = directory / "ca.pem", directory / "other-ca.pem"
        ca_file.write_bytes(ca.cert_pem)
        other_ca_file.write_bytes(other.cert_pem)
        server = ca.issue(directory, "server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], server=True)
        clients = {
            "svid": ca.issue(directory, "svid", [uri(SPIFFE_ID)]),
            "no_uri": ca.issue(directory, "no_uri", [dns("bot.example.org")]),
            "two_uris": ca.issue(directory, "two_uris", [uri(SPIFFE_ID), uri(OTHER_SPIFFE_ID)]),
            "not_spiffe": ca.issue(directory, "not_spiffe", [uri(NOT_SPIFFE_URI)]),
            "untrusted": other.issue(directory, "untrusted", [uri(UNTRUSTED_SPIFFE_ID)]),
        }
        return cls(directory, ca_file, server, clients, other_ca_file, ca, other)

    def issue_svid(self, name: str, lifetime: datetime.timedelta, spiffe_id: str = SPIFFE_ID) -> None:
        """Adds client `name` to `clients`: an SVID of the trusted CA valid for `lifetime` from now."""
        self.clients[name] = self.ca.issue(self.directory, name, [uri(spiffe_id)], lifetime=lifetime)

    def mtls_config(self) -> dict[str, str]:
        """`identity.mtls` for a PEP listening with this trust domain's server certificate."""
        return {
            "ca_file": str(self.ca_file),
            "cert_file": str(self.server.cert_file),
            "key_file": str(self.server.key_file),
        }

    def client_context(self, client: str | None = "svid") -> ssl.SSLContext:
        """A client context that verifies the PEP's certificate and presents `client` (None: no certificate)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        if client is not None:
            issued = self.clients[client]
            ctx.load_cert_chain(str(issued.cert_file), str(issued.key_file))
        return ctx


class JwtAuthority:
    """Signs bearer tokens with an ES256 key whose public half is published in a JWKS file."""

    def __init__(self, jwks_file: Path, issuer: str, audience: str, kid: str = "test-key") -> None:
        self.jwks_file = jwks_file
        self.issuer = issuer
        self.audience = audience
        self.kid = kid
        self._key = _key()
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        jwks_file.write_text(json.dumps({"keys": [{**public, "kid": kid, "use": "sig", "alg": "ES256"}]}))

    def jwt_config(self, **changes: Any) -> dict[str, Any]:
        """`identity.jwt` trusting this authority."""
        return {
            "issuers": [self.issuer],
            "audiences": [self.audience],
            "jwks_file": str(self.jwks_file),
            "algorithms": ["ES256"],
            **changes,
        }

    def mint(self, sub: str = "agent-7", *, lifetime_s: float = 300.0, **claims: Any) -> str:
        """A signed token for `sub`; `claims` are added (or override the defaults, e.g. `exp`, `iss`)."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime_s),
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(payload, self._key, algorithm="ES256", headers={"kid": self.kid})

    def forger(self) -> JwtAuthority:
        """Another key with the same issuer, audience and `kid`, whose JWKS nobody publishes: its tokens are forged."""
        return JwtAuthority(
            self.jwks_file.with_name(f"forged-{self.jwks_file.name}"), self.issuer, self.audience, self.kid
        )
