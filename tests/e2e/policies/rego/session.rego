# Test-only additions to config/policies/rego/pep.rego (served together with it): the MCP session plumbing on the
# route named `mcp`, and one allowed model. The tool rules stay the shipped ones.
package pep.authz

session_methods := {
	"initialize",
	"notifications/initialized",
	"tools/list",
	"server/discover",
	"mcp/stream",
	"mcp/session/delete",
}

permitted if {
	input.route.name == "mcp"
	input.mcp.method in session_methods
}

permitted if {
	input.model.action == "model.invoke"
	input.model.name == "gpt-test-allowed"
}
