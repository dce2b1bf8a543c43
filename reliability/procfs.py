"""What /proc says about a process: resident memory, open file descriptors, and its TCP sockets by peer and state.

A socket's peer comes from the kernel's table (/proc/net/tcp, tcp6) through the inode of each `socket:[N]`
descriptor: only sockets the process holds are counted (TIME_WAIT entries belong to no process).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


@dataclass(frozen=True, slots=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str


def tcp_table() -> dict[int, TcpSocket]:
    """Every TCP socket of this network namespace with an inode, by inode."""
    table: dict[int, TcpSocket] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) < 10:
                    continue
                inode = int(fields[9])
                if inode == 0:
                    continue
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                table[inode] = TcpSocket(local_port, remote_port, TCP_STATES.get(fields[3], fields[3]))
    return table


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_links(pid: int) -> list[str]:
    """The targets of /proc/PID/fd/* (an fd closed while listing is skipped)."""
    links = []
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"{base}/{fd}"))
    return links


@dataclass(frozen=True, slots=True)
class FdSnapshot:
    total: int
    non_socket: int
    sockets: tuple[TcpSocket, ...]  # TCP sockets (unix and other sockets are in `other_sockets`)
    other_sockets: int


def fd_snapshot(pid: int, table: dict[int, TcpSocket]) -> FdSnapshot:
    links = fd_links(pid)
    tcp: list[TcpSocket] = []
    other = 0
    non_socket = 0
    for link in links:
        if link.startswith("socket:["):
            found = table.get(int(link[8:-1]))
            if found is None:
                other += 1
            else:
                tcp.append(found)
        else:
            non_socket += 1
    return FdSnapshot(len(links), non_socket, tuple(tcp), other)


def classify(sockets: tuple[TcpSocket, ...], roles: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Counts per `role:STATE`. `roles` maps a role to ("local", port) or ("remote", port); the first that
    matches wins; anything else is `other`."""
    counts: Counter[str] = Counter()
    for s in sockets:
        role = "other"
        for name, (side, port) in roles.items():
            if (side == "local" and s.local_port == port) or (side == "remote" and s.remote_port == port):
                role = name
                break
        counts[f"{role}:{s.state}"] += 1
    return dict(counts)
