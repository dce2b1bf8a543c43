"""OPA's REST Data API: `POST {url}` with `{"input": DOC}`; allow only on `result: true` or `result.allow: true`.

`result: {allow: false, approval: {approver, message?}}` asks for a person's approval (`approval_required`);
`result: {allow: true, credential: {audience?, scopes?}}` narrows the route's just-in-time credential."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Final

from pep.decision import CredentialNarrowing, Reason
from pep.pdp import ALLOWED, DENIED, UNDEFINED, Failure, Pdp, Verdict, encode, settled
from pep.pdp.answer import answer_problem, malformed, read_object
from pep.pdp.approval import opa_approval
from pep.pdp.credential import credential_narrowing
from pep.pdp.transport import HttpTransport, RawAnswer
from pep.secret_file import FileSecret

_NOTE_MAX: Final = 256


# The usual allow, byte for byte as OPA writes it: known without a parse (the same Verdict the parse gives).
_ALLOWED_BODY: Final = b'{"result":true}'


def parse_answer(answer: RawAnswer) -> Verdict | Failure:
    """Classify one OPA answer. Pure: the whole strictness of the OPA contract lives here."""
    if answer.body == _ALLOWED_BODY and answer_problem(answer) is None:
        return ALLOWED
    obj = read_object(answer)
    if isinstance(obj, Failure):
        return obj
    if "result" not in obj:
        return UNDEFINED
    result = obj["result"]
    if result is True:
        return ALLOWED
    if result is False:
        return DENIED
    if not isinstance(result, dict):
        return malformed(f"result is a {type(result).__name__}, not a boolean or an object")
    if "allow" not in result:
        return UNDEFINED
    allow = result["allow"]
    if not isinstance(allow, bool):
        return malformed(f"result.allow is a {type(allow).__name__}, not a boolean")
    note = result.get("reason")
    note = note[:_NOTE_MAX] if isinstance(note, str) else None
    if "approval" in result:
        if allow:
            return malformed("result.approval with allow: true (an approval is asked for on a deny)")
        ask = opa_approval(result["approval"])
        if isinstance(ask, Failure):
            return ask
        return Verdict(False, Reason.APPROVAL_REQUIRED, note=note, approval=ask)
    if not allow:
        return Verdict(False, Reason.POLICY_DENIED, note=note) if note else DENIED
    credential: CredentialNarrowing | None = None
    if "credential" in result:
        narrowed = credential_narrowing(result["credential"], "result.credential")
        if isinstance(narrowed, Failure):
            return narrowed
        credential = narrowed
    headers = result.get("headers")
    if headers is None:
        if credential is None:
            return Verdict(True, Reason.ALLOWED, note=note) if note else ALLOWED
        return Verdict(True, Reason.ALLOWED, note=note, credential=credential)
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return malformed("result.headers is not an object of strings")
    return Verdict(True, Reason.ALLOWED, tuple(headers.items()), note, credential=credential)


class OpaPdp(Pdp):
    """One attempt against an OPA data path over the shared keep-alive pool."""

    remote = True

    def __init__(
        self, url: str, transport: HttpTransport, auth: FileSecret | None = None, auth_header: str = "authorization"
    ) -> None:
        self.url = url
        self._transport = transport
        self._auth = auth
        self._auth_header = auth_header

    def ask(self, document: dict[str, Any], request_id: str) -> Coroutine[Any, Any, Verdict | Failure]:
        """The transport's coroutine itself (no coroutine of its own around it: the engine awaits the PDP
        exchange one level less deep), or a request that cannot be built, refused at once."""
        body = encode({"input": document})
        if isinstance(body, Failure):
            return settled(body)
        return self._transport.ask(self.url, body, request_id, self._auth, self._auth_header, parse_answer)

    async def close(self) -> None:
        await self._transport.close()
