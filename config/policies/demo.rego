# The policy of `make demo PDP=opa`: pep/demo.py serves it as an OPA server would at /v1/data/pep/authz,
# evaluated by regorus (a Rego interpreter), so what this file says is what decides. A real OPA serves it as is:
# opa run --server config/policies/demo.rego
package pep.authz

default allow := false

allow if {
	input.route.name == "tools"
	input.request.method == "GET"
	startswith(input.request.path, "/tools/search")
}

reason := "only search is allowed for this agent" if not allow
