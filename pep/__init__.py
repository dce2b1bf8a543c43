"""failclosed-pep: a fail-closed policy enforcement point for AI agents."""

from pep.native import choose

__version__ = "0.1.0"

# Before any other module of the package is imported: the compiled request path, or every module from its source.
COMPILED = choose()
