# Test-only additions to config/policies/rego/pep.rego (served together with it): the MCP session plumbing on the
# route named `mcp`, in both directions, and one allowed model. The tool rules stay the shipped ones.
package pep.authz

session_methods := {
	"initialize",
	"notifications/initialized",
	"notifications/cancelled",
	"ping",
	"tools/list",
	"prompts/list",
	"resources/list",
	"server/discover",
	"mcp/stream",
	"mcp/session/delete",
}

# What the server may send the agent (input.mcp.direction "server_to_client").
server_methods := {
	"notifications/message",
	"notifications/progress",
	"notifications/tools/list_changed",
	"notifications/prompts/list_changed",
	"notifications/resources/list_changed",
	"notifications/resources/updated",
	"sampling/createMessage",
}

secret_fields := {"api_key", "password", "token", "secret"}

on_mcp_route if {
	input.route.name == "mcp"
	input.mcp.name == null # a message that names no tool, prompt or resource (a listed item is named)
}

names_a_secret if {
	some field in input.mcp.fields
	field in secret_fields
}

permitted if {
	on_mcp_route
	input.mcp.method in session_methods
}

permitted if {
	on_mcp_route
	input.mcp.direction == "server_to_client"
	input.mcp.method in server_methods
}

# A form the server shows the user, unless it asks for a secret; and the user's answer, unless it returns one.
permitted if {
	on_mcp_route
	input.mcp.direction == "server_to_client"
	input.mcp.method == "elicitation/create"
	is_array(input.mcp.fields)
	not names_a_secret
}

# The client's replies, by what they answer: ping and sampling; roots/list is never answered (denied).
permitted if {
	on_mcp_route
	input.mcp.method == "mcp/response"
	input.mcp.replies_to in {"ping", "sampling/createMessage"}
}

permitted if {
	on_mcp_route
	input.mcp.method == "mcp/response"
	input.mcp.replies_to == "elicitation/create"
	is_array(input.mcp.fields)
	not names_a_secret
}

permitted if {
	input.model.action == "model.invoke"
	input.model.name == "gpt-test-allowed"
}
