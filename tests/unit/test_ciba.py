"""The pure parts of approvals over CIBA and of the OAuth client: reading answers, the binding message, the poll
schedule, and client authentication from files."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.approvals.ciba import (
    Approved,
    CibaClient,
    CibaConfig,
    IdTokens,
    NotApproved,
    Pending,
    Started,
    read_poll,
    read_started,
)
from pep.approvals.message import MIN_LIMIT, binding_message, clean
from pep.decision import Reason
from pep.oauth.client_auth import ASSERTION_TYPE, ClientAuth, ClientAuthConfig, ClientAuthError
from pep.oauth.endpoint import Answer, Endpoint, OAuthError, Reply, Unavailable, classify
from tests.support.jwt_keys import ec_key, jwks

JSON = "application/json"

# --- reading answers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected"),
    [
        (200, JSON, b'{"a":1}', Reply(200, {"a": 1})),
        (200, "application/json; charset=utf-8", b'{"a":1}', Reply(200, {"a": 1})),
        (200, JSON, b'{"a":1,"a":2}', Unavailable("malformed", "")),
        (200, JSON, b'{"a":1} x', Unavailable("malformed", "")),
        (200, JSON, b"[1]", Unavailable("malformed", "")),
        (200, "text/html", b'{"a":1}', Unavailable("malformed", "")),
        (400, JSON, b'{"error":"authorization_pending"}', OAuthError(400, "authorization_pending")),
        (401, JSON, b'{"error":"invalid_client","error_description":"no"}', OAuthError(401, "invalid_client", "no")),
        (403, JSON, b'{"error":"access_denied"}', Unavailable("error", "status 403")),
        (400, JSON, b'{"error":5}', Unavailable("error", "status 400")),
        (400, "text/plain", b"error=x", Unavailable("error", "status 400")),
        (503, JSON, b'{"error":"temporarily_unavailable"}', Unavailable("error", "status 503")),
        (302, JSON, b"{}", Unavailable("error", "status 302")),
    ],
)
def test_classify(status: int, content_type: str, body: bytes, expected: Answer) -> None:
    found = classify(status, content_type, body, False, False)
    if isinstance(expected, Unavailable) and not expected.detail:
        assert isinstance(found, Unavailable)
        assert found.kind == expected.kind
    else:
        assert found == expected


def test_oversize_and_undecodable_are_malformed_and_descriptions_are_cut() -> None:
    assert classify(200, JSON, b"{}", True, False) == Unavailable("malformed", "answer larger than 262144 bytes")
    assert isinstance(classify(200, JSON, b"{}", False, True), Unavailable)
    long = b'{"error":"x","error_description":"' + b"d\\n" * 300 + b'"}'
    found = classify(400, JSON, long, False, False)
    assert isinstance(found, OAuthError)
    assert found.description is not None
    assert len(found.description) == 200
    assert "\n" not in found.description


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "nul\0", "\u20ac"])
async def test_a_header_that_cannot_be_framed_is_an_error_answer_and_nothing_is_sent(value: str) -> None:
    """The PDP client refuses to frame such a header (`RequestError`) before it connects: the endpoint answers it
    as an error, like any other exchange problem, rather than letting the exception out (port 1: were anything
    sent, the answer would be `unreachable`)."""
    endpoint = Endpoint(None)
    try:
        found = await endpoint.post_form("http://127.0.0.1:1/token", {"a": "b"}, {"X-Secret": value}, 1.0)
    finally:
        await endpoint.close()
    assert isinstance(found, Unavailable)
    assert found.kind == "error"
    assert "X-Secret" in found.detail


def test_read_started() -> None:
    body = {"auth_req_id": "r1", "expires_in": 120, "interval": 2}
    assert read_started(Reply(200, body), 1000.0, 5.0, 1.0) == Started("r1", 1120.0, 2.0)
    without_interval = {"auth_req_id": "r1", "expires_in": 120}
    assert read_started(Reply(200, without_interval), 1000.0, 5.0, 1.0) == Started("r1", 1120.0, 5.0)
    assert read_started(Reply(200, {**body, "interval": 0}), 1000.0, 5.0, 0.5) == Started("r1", 1120.0, 0.5)
    denied = read_started(OAuthError(400, "access_denied"), 0, 5, 1)
    assert isinstance(denied, NotApproved)
    assert denied.reason is Reason.APPROVAL_DENIED


@pytest.mark.parametrize(
    "body",
    [
        {"expires_in": 120},
        {"auth_req_id": "", "expires_in": 120},
        {"auth_req_id": "x" * 1025, "expires_in": 120},
        {"auth_req_id": 5, "expires_in": 120},
        {"auth_req_id": "r1"},
        {"auth_req_id": "r1", "expires_in": 0},
        {"auth_req_id": "r1", "expires_in": "120"},
        {"auth_req_id": "r1", "expires_in": True},
        {"auth_req_id": "r1", "expires_in": 1.5},
        {"auth_req_id": "r1", "expires_in": 120, "interval": -1},
        {"auth_req_id": "r1", "expires_in": 120, "interval": "5"},
        {"auth_req_id": "r1", "expires_in": 120, "interval": False},
    ],
)
def test_a_malformed_backchannel_answer_is_unavailable(body: dict[str, Any]) -> None:
    found = read_started(Reply(200, body), 0, 5, 1)
    assert isinstance(found, NotApproved)
    assert found.reason is Reason.APPROVAL_UNAVAILABLE


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (OAuthError(400, "authorization_pending"), Pending(2.0)),
        (OAuthError(400, "slow_down"), Pending(7.0)),
        (OAuthError(400, "access_denied"), Reason.APPROVAL_DENIED),
        (OAuthError(400, "expired_token"), Reason.APPROVAL_TIMEOUT),
        (OAuthError(400, "invalid_grant"), Reason.APPROVAL_INVALID),
        (OAuthError(401, "invalid_client"), Reason.APPROVAL_UNAVAILABLE),
        (OAuthError(400, "unauthorized_client"), Reason.APPROVAL_UNAVAILABLE),
        (OAuthError(400, "transaction_failed"), Reason.APPROVAL_UNAVAILABLE),
        (Unavailable("timeout", "x"), Reason.APPROVAL_UNAVAILABLE),
        (Unavailable("error", "status 500"), Reason.APPROVAL_UNAVAILABLE),
    ],
)
def test_read_poll(answer: Answer, expected: Pending | Reason) -> None:
    found = read_poll(answer, 2.0)
    if isinstance(expected, Pending):
        assert found == expected
    else:
        assert isinstance(found, NotApproved)
        assert found.reason is expected


def test_a_token_reply_is_handed_on_for_its_id_token() -> None:
    assert read_poll(Reply(200, {"id_token": "x"}), 2.0) == Reply(200, {"id_token": "x"})


# --- the binding message -------------------------------------------------------------------------------------------


def test_binding_message_shapes() -> None:
    assert binding_message("3f2a9c", "crm", "POST", "Refund over 100") == "Refund over 100 #3f2a9c"
    assert binding_message("3F2A9C", "crm", "POST", None) == "POST crm #3F2A9C"
    assert binding_message("3F2A9C", "crm", "post", "") == "request crm #3F2A9C"
    assert binding_message("3F2A9C", "crm", "POST", "a" * 100, limit=20) == "aaaaaaaaaaa~ #3F2A9C"
    assert len(binding_message("3F2A9C", "crm", "POST", "a" * 100, limit=20)) == 20
    assert binding_message("3F2A9C", "crm", "POST", "x", limit=1).endswith("#3F2A9C")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Pay \u202eemag\u202c now", "Pay emag now"),  # a right-to-left override cannot reorder the text
        ("Refund\n\nto <evil@x>", "Refund to evil@x"),
        ("Approve \u0430pple", "Approve pple"),  # a Cyrillic look-alike is dropped, not shown as an a
        ("tab\there", "tab here"),
        ('"quoted" {json} [x] $5 & 10%', "quoted json x 5 10"),
    ],
)
def test_characters_that_could_mislead_are_dropped(text: str, shown: str) -> None:
    assert clean(text) == shown


@given(st.text(max_size=300), st.text(max_size=20), st.text(max_size=10), st.integers(0, 200))
def test_binding_messages_are_short_plain_ascii_and_keep_the_code(
    message: str, route: str, method: str, limit: int
) -> None:
    shown = binding_message("ABCDEF", route, method, message, limit)
    assert len(shown) <= max(limit, MIN_LIMIT)
    assert shown.endswith("#ABCDEF")
    assert all(32 <= ord(c) < 127 for c in shown)
    assert "  " not in shown


# --- the poll schedule --------------------------------------------------------------------------------------------


class Script:
    """An endpoint that answers from a list, and a clock that sleeping advances."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.posts: list[float] = []
        self.now = 1000.0

    async def post_form(self, url: str, form: dict[str, str], headers: dict[str, str], timeout_s: float) -> Answer:
        self.posts.append(self.now)
        return self.answers.pop(0)

    async def get_json(self, url: str, timeout_s: float) -> Answer:
        raise AssertionError("no ID token is verified here")


def scripted(script: Script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CibaClient:
    secret = tmp_path / "secret"
    secret.write_text("s")
    cfg = CibaConfig(
        "http://op",
        "http://op/bc",
        "http://op/token",
        "http://op/jwks",
        ClientAuthConfig("pep", "client_secret_basic", str(secret)),
    )

    async def sleep(seconds: float) -> None:
        script.now += seconds

    monkeypatch.setattr("pep.approvals.ciba.asyncio.sleep", sleep)
    return CibaClient(cfg, script, clock=lambda: script.now, monotonic=lambda: script.now)  # type: ignore[arg-type]


async def test_wait_polls_at_the_interval_and_backs_off_on_slow_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(
        OAuthError(400, "authorization_pending"),
        OAuthError(400, "slow_down"),
        OAuthError(400, "authorization_pending"),
        OAuthError(400, "access_denied"),
    )
    client = scripted(script, tmp_path, monkeypatch)
    result = await client.wait(Started("r1", 2000.0, 2.0), "alice", 1100.0)
    assert isinstance(result, NotApproved)
    assert result.reason is Reason.APPROVAL_DENIED
    assert script.posts == [1002.0, 1004.0, 1011.0, 1018.0]  # 2 s, 2 s, then 2 + 5 after slow_down, kept


async def test_wait_gives_up_when_the_next_poll_would_pass_the_deadline_or_the_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(*[OAuthError(400, "authorization_pending")] * 10)
    client = scripted(script, tmp_path, monkeypatch)
    by_deadline = await client.wait(Started("r1", 5000.0, 2.0), "alice", 1007.0)
    assert by_deadline == NotApproved(Reason.APPROVAL_TIMEOUT, "nobody approved within the time the request may wait")
    assert script.posts == [1002.0, 1004.0, 1006.0]
    by_expiry = await client.wait(Started("r1", script.now + 3.0, 2.0), "alice", 99999.0)
    assert by_expiry == NotApproved(Reason.APPROVAL_TIMEOUT, "the backchannel request expires before the next poll")


# --- client authentication -------------------------------------------------------------------------------------


def test_client_secret_basic_and_post(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr:t/+\n")
    basic = ClientAuth(ClientAuthConfig("pep client", "client_secret_basic", str(secret)))
    form: dict[str, str] = {}
    headers: dict[str, str] = {}
    basic.apply(form, headers, "http://op/token")
    assert form == {}
    decoded = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode()
    assert decoded == "pep%20client:s3cr%3At%2F%2B"  # each part form-encoded first (RFC 6749 2.3.1)
    post = ClientAuth(ClientAuthConfig("pep", "client_secret_post", str(secret)))
    form, headers = {}, {}
    post.apply(form, headers, "http://op/token")
    assert form == {"client_id": "pep", "client_secret": "s3cr:t/+"}
    assert headers == {}


def test_private_key_jwt(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = ec_key("k")
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    auth = ClientAuth(ClientAuthConfig("pep", "private_key_jwt", key_file=str(path), key_id="k"), clock=lambda: 1000)
    form: dict[str, str] = {}
    auth.apply(form, {}, "http://op/token")
    assert form["client_id"] == "pep"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    claims = jwt.decode(
        form["client_assertion"],
        key.private.public_key(),
        algorithms=["ES256"],
        audience="http://op/token",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert (claims["iss"], claims["sub"], claims["exp"] - claims["iat"]) == ("pep", "pep", 60)
    assert jwt.get_unverified_header(form["client_assertion"])["kid"] == "k"
    second: dict[str, str] = {}
    auth.apply(second, {}, "http://op/token")
    assert jwt.decode(second["client_assertion"], options={"verify_signature": False})["jti"] != claims["jti"]


@pytest.mark.parametrize(
    ("method", "content", "problem"),
    [
        ("client_secret_basic", None, "is missing, unreadable or empty"),
        ("client_secret_basic", "\n", "is missing, unreadable or empty"),
        ("private_key_jwt", None, "is missing or not an unencrypted PEM private key"),
        ("private_key_jwt", "not a key", "is missing or not an unencrypted PEM private key"),
    ],
)
def test_an_unusable_credential_file_is_named_never_shown(
    tmp_path: Path, method: str, content: str | None, problem: str
) -> None:
    path = tmp_path / "credential"
    if content is not None:
        path.write_text(content)
    key = {"key_file": str(path)} if method == "private_key_jwt" else {"secret_file": str(path)}
    auth = ClientAuth(ClientAuthConfig("pep", method, **key))
    assert auth.problem() == f"{str(path)!r} {problem}"
    with pytest.raises(ClientAuthError, match=problem):
        auth.apply({}, {}, "http://op/token")


# --- the ID token's approver claim --------------------------------------------------------------------------------


class Keys:
    """An OP's JWKS endpoint and nothing else."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    async def get_json(self, url: str, timeout_s: float) -> Answer:
        return Reply(200, self.document)


@pytest.mark.parametrize(
    ("claim", "extra", "approved"),
    [
        ("email", {"email_verified": True}, True),
        ("email", {}, True),  # the OP says nothing about it: its resolution of the login hint stands
        ("email", {"email_verified": False}, False),
        ("email", {"email_verified": "true"}, False),
        ("phone_number", {"phone_number_verified": False}, False),
        ("sub", {"email_verified": False}, True),
    ],
)
async def test_an_approver_claim_the_op_says_is_unverified_is_no_approval(
    claim: str, extra: dict[str, Any], approved: bool
) -> None:
    """A person who put alice's address on their own account, unverified, is not alice."""
    key = ec_key("op-1")
    cfg = CibaConfig(
        "https://op", "https://op/bc", "https://op/token", "https://op/jwks", ClientAuthConfig("pep", "x", None)
    )
    cfg = CibaConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "approver_claim": claim})
    now = int(time.time())  # (PyJWT checks exp and iat against the wall clock)
    approver = {"email": "alice@example.com", "phone_number": "+15550100", "sub": "mallory"}[claim]
    token = key.sign(
        {
            "iss": "https://op",
            "aud": "pep",
            "sub": "mallory",
            "iat": now,
            "exp": now + 60,
            "email": "alice@example.com",
            "phone_number": "+15550100",
            **extra,
        },
        kid="op-1",
    )
    tokens = IdTokens(cfg, Keys(jwks(key)), clock=lambda: now)  # type: ignore[arg-type]
    found = await tokens.verify(token, approver)
    assert isinstance(found, Approved) is approved, found
