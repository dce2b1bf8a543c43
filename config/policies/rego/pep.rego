# The support-agent tool policy for OPA (data path /v1/data/pep/authz), the Rego copy of "one policy, three engines".
# The same rules live in config/policies/cedar/pep.cedar and config/policies/cerbos/; tests/e2e/test_three_engines.py
# runs one table of requests through all three and expects the same decisions.
#
# - tools/call of `search` and `lookup_order`: allowed, and so are those tools when a model answer calls them
#   (input.model.action "model.tool_call", the tool in input.model.tool);
# - listed to the agent (a filtered tools/list decides each listed tool as input.mcp.method "tools/list" with
#   input.mcp.name the tool, no arguments): search, lookup_order and send_email (whose calls are allowed only for
#   some arguments: listing it shows the tool, its calls are still decided with their arguments);
# - the prompt `refund_reply`: prompts/get, its listing (prompts/list of it) and completion/complete of its
#   arguments (input.mcp.ref_type "ref/prompt", input.mcp.name the prompt): a completion is allowed exactly where
#   reading the prompt is;
# - tools/call of `send_email`: allowed only when the string argument `to` ends with "@" + the agent's company
#   domain (subject.attributes.company_domain, from identity.attributes), compared case-sensitively;
#   a missing or non-string `to`, or an agent without a company domain, is a deny; a model answer's call of
#   it is decided by name alone (no arguments), so it is denied;
# - tools/call of `issue_refund`: only once a person approved that exact call. Without an approval in the input the
#   answer is `approval: {approver, message}` (the PEP asks the approver through CIBA: README, "Human approval");
#   asked again with `input.approval` from that approver, it is allowed. A model answer's call of it is denied;
# - `shell`: never, whatever else says allow;
# - everything else (other tools, other MCP methods, plain HTTP, every model call): denied by default. A model
#   is allowed by name (input.model.action "model.invoke", input.model.name); a call whose model the PEP cannot
#   see (input.model.read false: batches, files, uploads, realtime, unknown endpoints) has no name and is
#   denied unless its input.model.endpoint is allowed by name;
# - all of it for identified callers only: a verified token's subject (input.subject.id) or the workload
#   (input.subject.workload); a caller with neither, whatever its agent header says, gets nothing.
package pep.authz

default allow := false

allow if {
	identified
	permitted
	not forbidden
}

identified if named(input.subject.id)

identified if named(input.subject.workload)

named(value) if {
	is_string(value)
	value != ""
}

always_allowed_tools := {"search", "lookup_order"}

mcp_tool_call if input.mcp.method == "tools/call"

answer_tool_call if input.model.action == "model.tool_call"

tool_call if mcp_tool_call

tool_call if answer_tool_call

tool := input.mcp.name if mcp_tool_call

tool := input.model.tool if answer_tool_call

permitted if {
	tool_call
	tool in always_allowed_tools
}

permitted if {
	mcp_tool_call
	input.mcp.name == "send_email"
	own_domain_recipient
}

listed_tools := always_allowed_tools | {"send_email"}

tool_listing if {
	input.mcp.method == "tools/list"
	is_string(input.mcp.name)
}

permitted if {
	tool_listing
	input.mcp.name in listed_tools
}

allowed_prompts := {"refund_reply"}

prompt_use if input.mcp.method in {"prompts/get", "prompts/list"}

prompt_use if {
	input.mcp.method == "completion/complete"
	input.mcp.ref_type == "ref/prompt"
}

permitted if {
	prompt_use
	input.mcp.name in allowed_prompts
}

tool_use if tool_call

tool_use if tool_listing

own_domain_recipient if {
	to := input.mcp.arguments.to
	is_string(to)
	domain := input.subject.attributes.company_domain
	is_string(domain)
	domain != ""
	endswith(to, concat("", ["@", domain]))
}

# The person who approves refunds (the OP's account for this login hint; the PEP checks the ID token names them).
refund_approver := "alice@example.com"

refund_call if {
	mcp_tool_call
	input.mcp.name == "issue_refund"
}

permitted if {
	refund_call
	input.approval.approver == refund_approver
}

approval := {"approver": refund_approver, "message": "Issue a refund"} if {
	identified
	refund_call
	not input.approval
}

forbidden if input.mcp.name == "shell"

forbidden if input.model.tool == "shell"

reason := "the caller is not identified" if not identified

else := "shell is never allowed" if forbidden

else := "send_email only to the agent's company domain" if {
	mcp_tool_call
	input.mcp.name == "send_email"
	not own_domain_recipient
}

else := "issue_refund needs a person's approval" if {
	refund_call
	not permitted
}

else := "tool not allowed" if {
	tool_use
	not permitted
}

else := "prompt not allowed" if {
	prompt_use
	not permitted
}

else := "not a tool or prompt this agent may use" if not permitted
