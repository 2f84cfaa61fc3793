"""Which network interface each node's workers talk over, and the variables that tell gloo and NCCL.

Gloo and NCCL pick their interface from the hostname when nothing says otherwise. In many container
images and cloud VMs the hostname resolves to 127.0.0.1, so ranks on two machines advertise loopback
to each other and the rendezvous fails (``Gloo connectFullMesh failed ... remote=[127.0.0.1]``). Ray
already knows the address each node joined the cluster with; the interface that carries that address
is the one its peers can reach, so the launcher names it in ``GLOO_SOCKET_IFNAME`` and
``NCCL_SOCKET_IFNAME`` for every worker of that node.

Precedence: ``cluster.socket_ifname`` in the config, then a variable already set in the node's
environment (exported before ``ray start``), then the detected interface.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Mapping

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_for_ip(ip: str) -> str | None:
    """The name of the local interface that holds address ``ip`` (None when no interface has it)."""
    import psutil  # a dependency of Ray itself; imported here so the module stays cheap to import

    try:
        want = ipaddress.ip_address(ip)
    except ValueError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if ipaddress.ip_address(addr.address.split("%", 1)[0]) == want:
                    return name
            except ValueError:
                continue
    return None


def node_socket_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The socket-interface variables a node's environment already sets (the user's choice)."""
    return {k: environ[k] for k in SOCKET_IFNAME_VARS if environ.get(k)}


@dataclass(frozen=True)
class InterfaceChoice:
    """The interface one node's workers use, and where the choice came from."""

    ifname: str | None
    source: str
    """``config`` (cluster.socket_ifname), ``node env`` (set before ``ray start``), ``detected``, or ``none``."""

    def label(self) -> str:
        """For the placement table: ``eth1`` or ``eth1 (node env)``; ``-`` when nothing is known."""
        if self.ifname is None:
            return "-"
        return self.ifname if self.source == "detected" else f"{self.ifname} ({self.source})"


def choose_interface(configured: str | None, node_env: Mapping[str, str], detected: str | None) -> InterfaceChoice:
    """Apply the precedence of the module docstring (pure; unit-tested)."""
    if configured:
        return InterfaceChoice(configured, "config")
    if node_env.get("GLOO_SOCKET_IFNAME"):
        return InterfaceChoice(node_env["GLOO_SOCKET_IFNAME"], "node env")
    if detected:
        return InterfaceChoice(detected, "detected")
    return InterfaceChoice(None, "none")


def socket_env(choice: InterfaceChoice, node_env: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to a worker's environment for ``choice``: a value the user set on the node stays."""
    if choice.ifname is None:
        return {}
    if choice.source == "config":
        return {k: choice.ifname for k in SOCKET_IFNAME_VARS}
    return {k: choice.ifname for k in SOCKET_IFNAME_VARS if not node_env.get(k)}
