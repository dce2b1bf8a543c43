"""Sealed tickets: small JSON payloads the PEP hands out and takes back, unreadable and unforgeable by the holder.

A ticket is `pt1.` followed by base64url (no padding) of `key id (8) | nonce (12) | AES-256-GCM ciphertext and tag`.
The associated data binds the purpose (an approval ticket never opens as anything else) and the format version;
the expiry is inside the sealed payload, so it cannot be changed without breaking the tag. AES-GCM comes from
`cryptography`, already in the tree through PyJWT: an AEAD from a maintained library, nothing hand-made.

Keys come from files (`approvals.ticket_key_files`): each holds 32 random bytes, raw or in base64. The first key
seals, every key opens, so an operator rotates by putting a new key first and dropping the old one after the
longest ticket lifetime. A ticket names its key by an id derived from the key (not the key's position), so it
opens in every process that has that key: after a restart and in every worker. Expiry uses the wall clock, the
only clock that means the same in two processes. Random 96-bit nonces are safe for well over 2**32 tickets per
key; rotate long before that.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX: Final = "pt1."
KEY_BYTES: Final = 32
KID_BYTES: Final = 8
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MAX_TICKET_CHARS: Final = 4096  # a ticket longer than this is refused before any decoding
_AAD: Final = b"failclosed-pep/ticket/v1\x00"
_KID_LABEL: Final = b"failclosed-pep/ticket-key-id\x00"


class SealKeyError(Exception):
    """A key file that cannot be used. The message names the file and what is wrong, never key material."""


class TicketProblem(enum.StrEnum):
    """Why a ticket does not open. All of them mean the same to a caller (`approval_invalid`); the log says which."""

    MALFORMED = "malformed"  # not a ticket of this format (wrong prefix, encoding, length)
    UNKNOWN_KEY = "unknown_key"  # sealed with a key this process does not hold (rotated out, another deployment)
    FORGED = "forged"  # the tag does not verify: changed, truncated, or sealed for another purpose
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Unsealed:
    data: dict[str, Any]
    expires_at: float  # seconds since the epoch


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(_KID_LABEL + key).digest()[:KID_BYTES]


def parse_key(raw: bytes) -> bytes | None:
    """32 bytes as written: raw, or base64 (standard or URL-safe, padding optional) with surrounding whitespace."""
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    if not text or len(text) > 64:
        return None
    text = text.replace(b"-", b"+").replace(b"_", b"/")
    try:
        decoded = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == KEY_BYTES else None


def read_key(path: str) -> bytes:
    """The key in `path`. Raises SealKeyError naming the path."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1024)
    except OSError as exc:
        raise SealKeyError(f"{path!r}: {exc.strerror or exc}") from None
    key = parse_key(raw)
    if key is None:
        raise SealKeyError(f"{path!r} does not hold a {KEY_BYTES}-byte key (raw, or base64 of {KEY_BYTES} bytes)")
    return key


def key_file_warning(path: str) -> str | None:
    """A key file any user of the machine may read works, but anyone who reads it can forge tickets."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & stat.S_IROTH:
        return f"{path!r} is readable by every user (mode {stat.S_IMODE(mode):04o}); make it 0400 or 0440"
    return None


def new_key_text() -> str:
    """A fresh key in base64, for an operator to write to a key file."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    if not text or any(c not in _B64URL for c in text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


_B64URL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class Sealer:
    """Seals with the first key, opens with any. `clock` is the wall clock (seconds since the epoch)."""

    def __init__(self, keys: Sequence[bytes], clock: Callable[[], float] = time.time) -> None:
        if not keys or any(len(k) != KEY_BYTES for k in keys):
            raise ValueError(f"a Sealer needs at least one key of {KEY_BYTES} bytes")
        self._seal_kid = key_id(keys[0])
        self._seal_with = AESGCM(keys[0])
        self._open_with = {key_id(k): AESGCM(k) for k in reversed(keys)}  # the first key wins an id collision
        self._clock = clock

    @classmethod
    def from_files(cls, paths: Sequence[str], clock: Callable[[], float] = time.time) -> Sealer:
        return cls([read_key(p) for p in paths], clock)

    def seal(self, purpose: str, data: dict[str, Any], expires_at: float) -> str:
        """A ticket for `purpose` holding `data` until `expires_at` (seconds since the epoch)."""
        payload = orjson.dumps({"exp": expires_at, "data": data})
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._seal_with.encrypt(nonce, payload, _AAD + purpose.encode())
        ticket = PREFIX + base64.urlsafe_b64encode(self._seal_kid + nonce + sealed).rstrip(b"=").decode("ascii")
        if len(ticket) > MAX_TICKET_CHARS:
            raise ValueError("the ticket would be longer than MAX_TICKET_CHARS")
        return ticket

    def open(self, purpose: str, ticket: str) -> Unsealed | TicketProblem:
        """The payload, or why there is none. Never raises for anything a caller can send."""
        if not isinstance(ticket, str) or len(ticket) > MAX_TICKET_CHARS or not ticket.startswith(PREFIX):
            return TicketProblem.MALFORMED
        raw = _b64decode(ticket[len(PREFIX) :])
        if raw is None or len(raw) < KID_BYTES + NONCE_BYTES + TAG_BYTES:
            return TicketProblem.MALFORMED
        aead = self._open_with.get(raw[:KID_BYTES])
        if aead is None:
            return TicketProblem.UNKNOWN_KEY
        nonce, sealed = raw[KID_BYTES : KID_BYTES + NONCE_BYTES], raw[KID_BYTES + NONCE_BYTES :]
        try:
            payload = aead.decrypt(nonce, sealed, _AAD + purpose.encode())
        except InvalidTag:
            return TicketProblem.FORGED
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:  # only this process's keys seal: a key shared with something else
            return TicketProblem.FORGED
        if not isinstance(body, dict):
            return TicketProblem.FORGED
        expires_at, data = body.get("exp"), body.get("data")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or not isinstance(data, dict):
            return TicketProblem.FORGED
        if self._clock() >= expires_at:
            return TicketProblem.EXPIRED
        return Unsealed(data, float(expires_at))
