"""A PDP's "approval required": read strictly from OPA, AuthZEN (ARAP's requestable denial) and Cedar annotations,
never an allow, anything malformed in it `pdp_malformed`; carried by the engine and combined over a batch; the
approval fact reaches AuthZEN and Cedar as `context.approval`; the denials an agent gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from pep.approvals.binding import ApprovalPending
from pep.config import PdpConfig
from pep.decision import Deny, Reason
from pep.engine import Check, Engine, combine
from pep.metrics import Metrics
from pep.pdp import ApprovalAsk, Failure, Pdp, Verdict
from pep.pdp.authzen import parse_decision
from pep.pdp.cedar import CedarLoadError, CedarPdp
from pep.pdp.mapping import default_parts
from pep.pdp.opa import parse_answer
from pep.pdp.transport import RawAnswer
from pep.protocols import Inspected, Message
from pep.responses import MCP_DENIED, MCP_URL_ELICITATION_REQUIRED, deny, deny_mcp, deny_openai
from tests.support.documents import pep_document


def opa(result: Any) -> Verdict | Failure:
    return parse_answer(RawAnswer(200, "application/json", orjson.dumps({"result": result}), False))


# --- OPA -------------------------------------------------------------------------------------------------------


def test_opa_approval_required() -> None:
    found = opa({"allow": False, "approval": {"approver": "alice@example.com", "message": "Refund over 100"}})
    assert found == Verdict(
        False, Reason.APPROVAL_REQUIRED, approval=ApprovalAsk("alice@example.com", "Refund over 100")
    )
    bare = opa({"allow": False, "approval": {"approver": "alice"}, "reason": "refund limit"})
    assert bare == Verdict(False, Reason.APPROVAL_REQUIRED, note="refund limit", approval=ApprovalAsk("alice"))


@pytest.mark.parametrize(
    "approval",
    [
        None,
        "alice",
        [],
        {},
        {"approver": ""},
        {"approver": "  "},
        {"approver": " alice"},
        {"approver": 7},
        {"approver": "al\nice"},
        {"approver": "a" * 257},
        {"approver": "alice", "message": 5},
        {"approver": "alice", "message": "m" * 1025},
        {"approver": "alice", "quorum": 2},  # a condition the PEP would not carry out
        {"approvers": ["alice", "bob"]},
    ],
)
def test_a_malformed_opa_approval_is_pdp_malformed(approval: Any) -> None:
    found = opa({"allow": False, "approval": approval})
    assert isinstance(found, Failure)
    assert found.reason is Reason.PDP_MALFORMED


def test_an_opa_allow_with_an_approval_is_not_an_allow() -> None:
    found = opa({"allow": True, "approval": {"approver": "alice"}})
    assert isinstance(found, Failure)
    assert found.reason is Reason.PDP_MALFORMED
    undefined = opa({"approval": {"approver": "alice"}})  # no allow at all: undefined, as before
    assert isinstance(undefined, Verdict)
    assert undefined.reason is Reason.PDP_UNDEFINED


# --- AuthZEN (Access Request and Approval Profile: a requestable denial) ---------------------------------------


def requestable(**access: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "approver": "alice",
        "expires_at": "2026-04-30T20:25:00Z",
        "template": "manager_approval",  # ARAP members the PEP does not use are ignored
        "binding_token": "eyJ.x.y",
        "display": {"title": "Request access", "description": "Refunds over 100 need a manager"},
    }
    base.update(access)
    return {"decision": False, "context": {"reason": "approval_required", "access_request": base}}


def test_authzen_requestable_denial_is_approval_required() -> None:
    found = parse_decision(requestable())
    assert isinstance(found, Verdict)
    assert found.allow is False
    assert found.reason is Reason.APPROVAL_REQUIRED
    assert found.approval == ApprovalAsk("alice", "Refunds over 100 need a manager", 1777580700.0)
    titled = parse_decision(requestable(display={"title": "Manager approval"}))
    assert isinstance(titled, Verdict)
    assert titled.approval == ApprovalAsk("alice", "Manager approval", 1777580700.0)
    offset = parse_decision(requestable(expires_at="2026-04-30T22:25:00+02:00", display=None))
    assert isinstance(offset, Verdict)
    assert offset.approval == ApprovalAsk("alice", None, 1777580700.0)


@pytest.mark.parametrize(
    "access",
    [
        {"approver": None},
        {"approver": ""},
        {"expires_at": None},
        {"expires_at": "tomorrow"},
        {"expires_at": "2026-04-30"},
        {"expires_at": "2026-04-30T20:25:00"},  # no offset
        {"expires_at": 1777580700},
        {"display": "Manager approval"},
        {"display": {"description": 7}},
    ],
)
def test_a_malformed_requestable_denial_is_pdp_malformed(access: dict[str, Any]) -> None:
    body = requestable(**access)
    body["context"]["access_request"] = {k: v for k, v in body["context"]["access_request"].items() if v is not None}
    found = parse_decision(body)
    assert isinstance(found, Failure)
    assert found.reason is Reason.PDP_MALFORMED


def test_an_access_request_that_is_not_an_object_or_comes_with_an_allow_is_malformed() -> None:
    for body in (
        {"decision": False, "context": {"access_request": "yes"}},
        {"decision": True, "context": {"access_request": requestable()["context"]["access_request"]}},
    ):
        found = parse_decision(body)
        assert isinstance(found, Failure), body
        assert found.reason is Reason.PDP_MALFORMED


def test_a_denial_without_access_request_stays_a_policy_deny() -> None:
    found = parse_decision({"decision": False, "context": {"reason": "approval_required"}})
    assert isinstance(found, Verdict)
    assert found.reason is Reason.POLICY_DENIED
    assert found.approval is None


# --- Cedar -----------------------------------------------------------------------------------------------------

REFUND = 'resource == Route::"tools"'


async def cedar_verdict(tmp_path: Path, text: str, **doc: Any) -> Verdict | Failure:
    path = tmp_path / "p.cedar"
    path.write_text(text)
    return await CedarPdp(str(path)).ask(pep_document(**doc), "rid-1")


async def test_a_deny_by_annotated_forbids_asks_their_approver(tmp_path: Path) -> None:
    text = f"""
permit(principal, action, resource);
@approval("alice")
@approval_message("Posting to tools needs Alice")
forbid(principal, action == Action::"POST", {REFUND}) unless {{ context has approval }};
@approval("alice")
forbid(principal, action == Action::"POST", {REFUND}) when {{ context.query has q }} unless {{ context has approval }};
"""
    found = await cedar_verdict(tmp_path, text, method="POST")
    assert isinstance(found, Verdict)
    assert found.allow is False
    assert found.reason is Reason.APPROVAL_REQUIRED
    assert found.approval == ApprovalAsk("alice", "Posting to tools needs Alice")
    assert (await cedar_verdict(tmp_path, text, method="GET")) == Verdict(True, Reason.ALLOWED, note="policy0")
    approved = pep_document(method="POST")
    approved["approval"] = {"approver": "alice", "approved_at": "2026-01-01T00:00:00Z", "id": "a1"}
    path = tmp_path / "p.cedar"
    assert await CedarPdp(str(path)).ask(approved, "rid-1") == Verdict(True, Reason.ALLOWED, note="policy0")


@pytest.mark.parametrize(
    "text",
    [
        # one determining forbid is not annotated: no approval lifts it
        f'permit(principal, action, resource);\n@approval("alice")\nforbid(principal, action, {REFUND});\n'
        f"forbid(principal, action, {REFUND});",
        # two approvers: one CIBA request cannot ask both
        f'permit(principal, action, resource);\n@approval("alice")\nforbid(principal, action, {REFUND});\n'
        f'@approval("bob")\nforbid(principal, action, {REFUND});',
        # no permit and no forbid: a deny without determining policies
        '@approval("alice")\nforbid(principal, action, resource == Route::"elsewhere");',
    ],
)
async def test_other_denies_stay_policy_denies(tmp_path: Path, text: str) -> None:
    found = await cedar_verdict(tmp_path, text)
    assert isinstance(found, Verdict)
    assert found.reason is Reason.POLICY_DENIED
    assert found.approval is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('@approval("alice")\npermit(principal, action, resource);', "@approval is only for forbid policies"),
        ('@approval("")\nforbid(principal, action, resource);', "not a non-empty string"),
        ("@approval\nforbid(principal, action, resource);", "not a non-empty string"),
        ('@approval_message("x")\nforbid(principal, action, resource);', "@approval_message without @approval"),
    ],
)
def test_bad_approval_annotations_are_refused_at_load(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "p.cedar"
    path.write_text(text)
    with pytest.raises(CedarLoadError, match=problem) as caught:
        CedarPdp(str(path))
    assert str(caught.value).startswith("pdp.policies: ")


# --- the engine and the mapping ----------------------------------------------------------------------------------


class Answers(Pdp):
    remote = True

    def __init__(self, *answers: Verdict | Failure) -> None:
        self.answers = list(answers)

    async def ask(self, document: dict[str, Any], request_id: str) -> Verdict | Failure:
        return self.answers.pop(0)

    async def close(self) -> None:
        return None


ASK = Verdict(False, Reason.APPROVAL_REQUIRED, approval=ApprovalAsk("alice", "m"))


async def test_the_engine_denies_approval_required_and_carries_the_ask() -> None:
    engine = Engine(Answers(ASK), PdpConfig(kind="opa", url="http://pdp"), Metrics(("r",)))
    check = Check(pep_document(), "rid", "r", "POST", "http://up/x", frozenset())
    outcome = await engine.decide(check)
    assert isinstance(outcome.decision, Deny)
    assert outcome.decision.reason is Reason.APPROVAL_REQUIRED
    assert outcome.approval == ApprovalAsk("alice", "m")


def test_a_batch_asks_for_approval_only_when_nothing_else_refuses() -> None:
    allow = Verdict(True, Reason.ALLOWED)
    denied = Verdict(False, Reason.POLICY_DENIED)
    bob = Verdict(False, Reason.APPROVAL_REQUIRED, approval=ApprovalAsk("bob"))
    assert combine([allow, ASK, allow]) == ASK
    assert combine([ASK, denied]) == denied  # nobody is asked to approve what is denied anyway
    assert combine([ASK, ASK]) == ASK
    two = combine([ASK, bob])
    assert isinstance(two, Verdict)
    assert two.reason is Reason.POLICY_DENIED
    failure = Failure(Reason.PDP_TIMEOUT, "timeout", False, "x")
    assert combine([ASK, failure]) == failure


def test_the_approval_reaches_authzen_and_cedar_as_context_approval() -> None:
    doc = pep_document()
    assert "approval" not in default_parts(doc).context
    doc["approval"] = {"approver": "alice", "approved_at": "2026-01-01T00:00:00Z", "id": "a1"}
    assert default_parts(doc).context["approval"] == doc["approval"]


# --- what the agent gets -----------------------------------------------------------------------------------------

PENDING = ApprovalPending("pt1.TICKET", "a" * 32, "3F2A9C", 2000, 1_800_000_060.0, "https://approvals.example/a/x")


def body_of(response: Any) -> Any:
    return orjson.loads(response.body)


def test_http_and_openai_denials_carry_the_ticket_and_a_retry_hint() -> None:
    http = deny(Reason.APPROVAL_REQUIRED, "rid", approval=PENDING)
    assert http.status == 403
    assert http.headers["retry-after"] == "2"
    assert http.headers["x-pep-reason"] == "approval_required"
    assert body_of(http)["error"]["approval"] == {
        "ticket": "pt1.TICKET",
        "id": "a" * 32,
        "code": "3F2A9C",
        "retry_after_ms": 2000,
        "expires_at": "2027-01-15T08:01:00Z",
    }
    openai = deny_openai(Reason.APPROVAL_REQUIRED, "rid", approval=PENDING)
    assert body_of(openai)["error"]["code"] == "approval_required"
    assert body_of(openai)["error"]["approval"]["ticket"] == "pt1.TICKET"
    assert "approval" not in body_of(deny(Reason.APPROVAL_DENIED, "rid"))["error"]


def mcp_call(rpc_id: Any = 1) -> Inspected:
    facts: dict[str, Any] = {"method": "tools/call", "name": "refund", "arguments": {}, "protocol_version": None}
    return Inspected((Message("mcp", facts, rpc_id),), b"{}")


def test_mcp_approval_required_is_32001_with_the_ticket_or_32042_where_the_client_can_show_a_url() -> None:
    plain = body_of(deny_mcp(Reason.APPROVAL_REQUIRED, "rid", mcp_call(4), 200, approval=PENDING))
    assert plain["id"] == 4
    assert plain["error"]["code"] == MCP_DENIED
    assert plain["error"]["data"]["approval"]["ticket"] == "pt1.TICKET"
    assert "elicitations" not in plain["error"]["data"]
    url = body_of(deny_mcp(Reason.APPROVAL_REQUIRED, "rid", mcp_call(4), 200, approval=PENDING, url_elicitation=True))
    assert url["error"]["code"] == MCP_URL_ELICITATION_REQUIRED == -32042
    assert url["error"]["data"]["elicitations"] == [
        {
            "mode": "url",
            "message": "A person must approve this request (code 3F2A9C); retry it once approved.",
            "url": "https://approvals.example/a/x",
            "elicitationId": "a" * 32,
        }
    ]
    assert url["error"]["data"]["approval"]["ticket"] == "pt1.TICKET"
    no_url = ApprovalPending("pt1.T", "a" * 32, "3F2A9C", 2000, 1_800_000_060.0)
    fallback = body_of(
        deny_mcp(Reason.APPROVAL_REQUIRED, "rid", mcp_call(), 200, approval=no_url, url_elicitation=True)
    )
    assert fallback["error"]["code"] == MCP_DENIED


def test_the_url_elicitation_error_is_what_the_mcp_sdk_reads() -> None:
    from mcp.shared.exceptions import UrlElicitationRequiredError
    from mcp_types import ErrorData

    url = body_of(deny_mcp(Reason.APPROVAL_REQUIRED, "rid", mcp_call(), 200, approval=PENDING, url_elicitation=True))
    error = UrlElicitationRequiredError.from_error(ErrorData.model_validate(url["error"]))
    assert [(e.url, e.elicitation_id) for e in error.elicitations] == [("https://approvals.example/a/x", "a" * 32)]
