"""OAuth 2.0 client pieces shared by approvals (OpenID CIBA) and just-in-time credentials (RFC 8693, client
credentials): client authentication from files, and one strict form POST to an authorization server endpoint.

Off the hot path (a token fetch, a backchannel request, a poll), so the shape favours strictness over speed: every
answer is classified (a JSON object, an OAuth error, or unavailable with why), none raises, and no answer body,
token or secret is ever part of a description.
"""
