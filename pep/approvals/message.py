"""The CIBA `binding_message`: the short text the approver's device shows, so they know which action they approve.

CIBA asks for a short plain-text message, and the person will act on what it says, so it holds nothing the caller
chose freely: the policy's message (the PDP's text; a policy that pastes tool arguments into it is filtered like
anything else), else the route name and the method, then ` #` and the request's binding code, which the agent's
denial shows too. Characters outside printable ASCII letters, digits, space and `.,:;#/+_!?()@-` are dropped, so no
control character, right-to-left override or look-alike letter reaches the screen; runs of spaces become one.
The text is cut to `limit` characters with the code always kept (oidc-provider's default check allows 20).
"""

from __future__ import annotations

import re

DEFAULT_LIMIT = 64
MIN_LIMIT = 12
_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:;#/+_!?()@-")
_SPACES = re.compile(r" {2,}")
_METHOD = re.compile(r"[A-Z]{1,16}\Z")


def clean(text: str) -> str:
    kept = "".join(c if c in _ALLOWED else " " if c.isspace() else "" for c in text)
    return _SPACES.sub(" ", kept).strip()


def binding_message(code: str, route: str, method: str, policy_message: str | None, limit: int = DEFAULT_LIMIT) -> str:
    """`{what} #{code}`, at most `limit` characters (at least MIN_LIMIT)."""
    limit = max(limit, MIN_LIMIT)
    suffix = f" #{clean(code)[:8]}"
    what = clean(policy_message or "")
    if not what:
        verb = method if _METHOD.match(method) else "request"
        what = clean(f"{verb} {route}")
    room = limit - len(suffix)
    if len(what) > room:
        what = what[: max(room - 1, 0)].rstrip() + "~" if room > 1 else ""
    return (what + suffix).strip()
