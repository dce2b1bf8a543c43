"""Enough file descriptors for `max_connections`: the soft RLIMIT_NOFILE is raised towards the hard one at start.

Each agent-facing connection is a descriptor, and so is every PDP, upstream and log one: with the soft limit below
`max_connections` the bound would never be reached, and accept() would fail (EMFILE) for everyone first, the PDP
and upstream connections too. nginx (`worker_rlimit_nofile`) and Envoy's deployments raise it the same way.
"""

from __future__ import annotations

import resource

# Descriptors kept for everything but the agent-facing connections: PDP and upstream pools, logs, key files.
HEADROOM = 1024


def raise_limit(max_connections: int) -> str | None:
    """Raise the soft limit to what `max_connections` needs (never above the hard limit, never lowered); a
    warning when the hard limit is still short of it."""
    needed = max_connections + HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"max_connections: {max_connections} connections need about {needed} file descriptors, and the limit "
            f"is {soft} (hard {hard}): accept() would fail for everyone before the bound is reached; lower "
            "max_connections or raise the limit (ulimit -n, the container runtime's nofile)"
        )
    return None
