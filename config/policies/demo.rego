# The policy the demo PDP (pep/demo.py) applies, written in Rego for an OPA server at /v1/data/pep/authz.
package pep.authz

default allow := false

allow if {
	input.route.name == "tools"
	input.request.method == "GET"
	startswith(input.request.path, "/tools/search")
}

reason := "only search is allowed for this agent" if not allow
