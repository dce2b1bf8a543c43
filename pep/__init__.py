"""failclosed-pep: a fail-closed policy enforcement point for AI agents."""

__version__ = "0.1.0"
