"""Sealed tickets open only as sealed: for their purpose, before their expiry, with a key the process holds."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.seal import (
    KEY_BYTES,
    MAX_TICKET_CHARS,
    PREFIX,
    Sealer,
    SealKeyError,
    TicketProblem,
    Unsealed,
    key_file_warning,
    new_key_text,
    parse_key,
    read_key,
)

NOW = 1_800_000_000.0
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


def sealer(*keys: bytes, now: float = NOW) -> Sealer:
    return Sealer(list(keys) or [KEY_A], clock=lambda: now)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw(ticket: str) -> bytes:
    body = ticket.removeprefix(PREFIX)
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def test_a_ticket_opens_for_its_purpose_until_it_expires() -> None:
    ticket = sealer().seal("approval", {"id": "a1", "n": [1, 2]}, NOW + 60)
    assert ticket.startswith(PREFIX)
    assert sealer().open("approval", ticket) == Unsealed({"id": "a1", "n": [1, 2]}, NOW + 60)
    assert sealer(now=NOW + 59.9).open("approval", ticket) == Unsealed({"id": "a1", "n": [1, 2]}, NOW + 60)
    assert sealer(now=NOW + 60).open("approval", ticket) is TicketProblem.EXPIRED
    assert sealer().open("credential", ticket) is TicketProblem.FORGED  # the purpose is bound


def test_the_payload_is_not_readable_in_the_ticket() -> None:
    ticket = sealer().seal("approval", {"approver": "alice@example.com"}, NOW + 60)
    assert b"alice" not in raw(ticket)
    assert "alice" not in ticket


def test_two_tickets_of_the_same_payload_differ() -> None:
    s = sealer()
    assert s.seal("approval", {"id": "a1"}, NOW + 60) != s.seal("approval", {"id": "a1"}, NOW + 60)


def test_any_changed_byte_is_forged() -> None:
    ticket = sealer().seal("approval", {"id": "a1"}, NOW + 60)
    data = raw(ticket)
    for i in range(8, len(data)):  # past the key id: the nonce, the ciphertext and the tag
        flipped = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        assert sealer().open("approval", PREFIX + b64(flipped)) is TicketProblem.FORGED, i


def test_truncated_and_extended_tickets_do_not_open() -> None:
    ticket = sealer().seal("approval", {"id": "a1"}, NOW + 60)
    data = raw(ticket)
    for cut in (1, 5, 16, len(data) - 8 - 12 - 1):
        assert sealer().open("approval", PREFIX + b64(data[:-cut])) in (TicketProblem.FORGED, TicketProblem.MALFORMED)
    assert sealer().open("approval", PREFIX + b64(data + b"\x00")) is TicketProblem.FORGED
    assert sealer().open("approval", ticket[:-1]) in (TicketProblem.FORGED, TicketProblem.MALFORMED)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "pt1.",
        "pt2." + "A" * 60,  # another version
        "PT1." + "A" * 60,
        "pt1." + "A" * 10,  # too short to hold a key id, a nonce and a tag
        "pt1." + "!!!!" * 20,  # not base64url
        "pt1." + "A" * 59 + "=",  # padding is not part of the format
        "pt1." + "A" * (MAX_TICKET_CHARS + 1),
    ],
)
def test_what_is_not_a_ticket_is_malformed(text: str) -> None:
    assert sealer().open("approval", text) is TicketProblem.MALFORMED


def test_a_ticket_of_an_unknown_key_is_refused_by_id() -> None:
    ticket = sealer(KEY_B).seal("approval", {"id": "a1"}, NOW + 60)
    assert sealer(KEY_A).open("approval", ticket) is TicketProblem.UNKNOWN_KEY


def test_rotation_the_first_key_seals_every_key_opens() -> None:
    old = sealer(KEY_A).seal("approval", {"id": "old"}, NOW + 60)
    rotated = sealer(KEY_B, KEY_A)
    new = rotated.seal("approval", {"id": "new"}, NOW + 60)
    assert rotated.open("approval", old) == Unsealed({"id": "old"}, NOW + 60)
    assert rotated.open("approval", new) == Unsealed({"id": "new"}, NOW + 60)
    assert sealer(KEY_A).open("approval", new) is TicketProblem.UNKNOWN_KEY  # sealed with the new key
    assert sealer(KEY_B).open("approval", old) is TicketProblem.UNKNOWN_KEY  # the old key was dropped


def test_a_key_id_forged_onto_another_keys_ticket_does_not_open() -> None:
    ticket = sealer(KEY_B).seal("approval", {"id": "a1"}, NOW + 60)
    data = raw(ticket)
    own_id = raw(sealer(KEY_A).seal("approval", {}, NOW + 60))[:8]
    assert sealer(KEY_A).open("approval", PREFIX + b64(own_id + data[8:])) is TicketProblem.FORGED


def test_another_process_with_the_same_key_file_opens_it(tmp_path: Path) -> None:
    key_file = tmp_path / "ticket.key"
    key_file.write_text(new_key_text() + "\n")
    ticket = Sealer.from_files([str(key_file)], clock=lambda: NOW).seal("approval", {"id": "x"}, NOW + 5)
    assert Sealer.from_files([str(key_file)], clock=lambda: NOW).open("approval", ticket).data == {"id": "x"}  # type: ignore[union-attr]


@given(st.text(max_size=200))
def test_no_text_raises(text: str) -> None:
    assert isinstance(sealer().open("approval", text), TicketProblem)


@given(st.binary(max_size=120))
def test_no_bytes_after_the_prefix_raise(data: bytes) -> None:
    assert isinstance(sealer().open("approval", PREFIX + b64(data)), TicketProblem)


def test_key_files_raw_and_base64(tmp_path: Path) -> None:
    key = os.urandom(KEY_BYTES)
    (tmp_path / "raw").write_bytes(key)
    (tmp_path / "std").write_text(base64.b64encode(key).decode() + "\n")
    (tmp_path / "url").write_text(base64.urlsafe_b64encode(key).decode().rstrip("=") + "\n")
    for name in ("raw", "std", "url"):
        assert read_key(str(tmp_path / name)) == key
    assert parse_key(base64.b64decode(new_key_text())) is not None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "does not hold a 32-byte key"),
        (b"short", "does not hold a 32-byte key"),
        (os.urandom(31), "does not hold a 32-byte key"),
        (os.urandom(33), "does not hold a 32-byte key"),
        (base64.b64encode(os.urandom(16)), "does not hold a 32-byte key"),
        (base64.b64encode(os.urandom(48)), "does not hold a 32-byte key"),
        (b"not base64 at all, but long enough to be tried as base64!", "does not hold a 32-byte key"),
    ],
)
def test_bad_key_files_name_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "ticket.key"
    path.write_bytes(content)
    with pytest.raises(SealKeyError, match=problem) as caught:
        read_key(str(path))
    assert str(path) in str(caught.value)


def test_a_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(SealKeyError, match="No such file"):
        read_key(str(tmp_path / "absent.key"))


def test_a_world_readable_key_file_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "ticket.key"
    path.write_text(new_key_text())
    path.chmod(0o644)
    warning = key_file_warning(str(path))
    assert warning is not None
    assert "0644" in warning
    path.chmod(0o440)
    assert key_file_warning(str(path)) is None


def test_a_sealer_needs_keys_of_the_right_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer([])
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer([b"x" * 16])
