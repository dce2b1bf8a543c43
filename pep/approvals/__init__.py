"""Human approval of one exact request: a PDP answers "approval required", a person approves through OpenID CIBA,
and the PDP is asked again with the approval in its input. Only that second allow forwards.

- `binding`: what an approval is for (the exact request and caller), the sealed ticket that carries it, and the
  single-use rules.
- `ciba`: the CIBA poll-mode client that asks the person and reads the answer.
- `message`: the short text the person's device shows (`binding_message`), from what the PEP itself knows.

Nothing here forwards or decides: the request path (the proxy) drives these pieces and the engine still mints
every Allow.
"""
