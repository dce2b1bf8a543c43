"""The benchmark harness of issue 7: failclosed-pep, Envoy ext_authz and the upstream directly (`make bench`)."""
