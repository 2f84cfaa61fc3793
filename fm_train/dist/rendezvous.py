"""Joining the job's process group, with failures explained in terms of addresses, ports and fixes.

A rendezvous failure is a network or configuration problem, not a training one: a peer that
advertises 127.0.0.1 because its hostname resolves to loopback, a firewall between nodes, a node
that cannot route to MASTER_ADDR. torch reports these as a gloo or store error deep in a traceback;
:func:`explain` turns them into one message that names this rank's node and interface, the master
address and port, the remote address in the error, and what to change. :func:`wait_for_master`
makes an unreachable MASTER_ADDR fail within a bounded time instead of the process group's
30-minute default.

:func:`join_process_group` listens only where the launcher pointed the ranks: torch's TCPStore
server binds every interface (``[::]:PORT``) whatever ``host_name`` says, so a laptop run exposed
its unauthenticated store to the network while Ray itself stayed on 127.0.0.1. Rank 0 now opens the
listening socket on MASTER_ADDR's own address and hands it to the store (``master_listen_fd``), and
a loopback MASTER_ADDR keeps gloo's and NCCL's own sockets on the loopback interface too.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Iterator, MutableMapping

from fm_train.dist.env import RankEnv
from fm_train.dist.errors import DistError

if TYPE_CHECKING:
    from torch.distributed import Store

RENDEZVOUS_TIMEOUT_ENV = "FM_TRAIN_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
_REMOTE_RE = re.compile(r"remote=\[?([0-9a-fA-F:.]+?)\]?:(\d+)")
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class RendezvousError(DistError, RuntimeError):
    """This rank could not join its peers; the message names addresses, ports and the fix."""


def local_endpoint() -> str:
    """``interface eth1 (10.0.0.2)`` from GLOO_SOCKET_IFNAME, or what the hostname resolves to."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname:
        try:
            import psutil

            addrs = [a.address for a in psutil.net_if_addrs().get(ifname.split(",")[0], [])
                     if a.family in (socket.AF_INET, socket.AF_INET6) and "%" not in a.address]  # no link-local
        except ImportError:
            addrs = []
        return f"interface {ifname} ({', '.join(addrs) or 'no address'})"
    try:
        resolved = socket.gethostbyname(socket.gethostname())
    except OSError:
        resolved = "unresolvable"
    return f"the hostname's address {resolved} (GLOO_SOCKET_IFNAME unset)"


def explain(exc: BaseException, env: RankEnv, what: str) -> str:
    """One message for a failed ``what`` (e.g. "joining the process group") on this rank."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    node = os.environ.get("FM_TRAIN_NODE_IP", "?")
    parts = [f"rank {env.rank} of {env.world_size} on node {node} ({local_endpoint()}) failed {what} with"
             f" MASTER_ADDR={env.master_addr} MASTER_PORT={env.master_port}: {type(exc).__name__}: {first}"]
    remote = _REMOTE_RE.search(str(exc))
    if remote and remote.group(1).startswith("127."):
        parts.append(f"a peer advertised the loopback address {remote.group(1)}:{remote.group(2)}, so its gloo/NCCL"
                     " interface is lo: set cluster.socket_ifname to the interface of the network the nodes share"
                     " (or export GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME before `ray start` on every node)")
    elif remote:
        parts.append(f"the peer at {remote.group(1)}:{remote.group(2)} could not be reached: check that the nodes"
                     " can open TCP connections to each other on all ports (firewall, security group), and that"
                     " cluster.socket_ifname names an interface of the network they share")
    else:
        parts.append("check that every node can reach MASTER_ADDR and every other node on all TCP ports, and that"
                     " cluster.socket_ifname (or GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME) names the shared network")
    return "; ".join(parts)


def wait_for_master(env: RankEnv, timeout_s: float | None = None, *, poll_s: float = 0.5) -> None:
    """On ranks > 0, wait until MASTER_ADDR:MASTER_PORT accepts TCP connections (rank 0's store).

    Rank 0 may start later than its peers, so refused connections are retried until ``timeout_s``
    (``FM_TRAIN_RENDEZVOUS_TIMEOUT_S``, default 300 s); then a :class:`RendezvousError` says that
    the master cannot be reached from here. A connection that is accepted and closed at once does
    not disturb torch's TCPStore.
    """
    if env.rank == 0 or env.world_size == 1:
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S))
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            last = exc
            time.sleep(poll_s)
    reason = last.strerror if last is not None and last.strerror else str(last)
    raise RendezvousError(explain(OSError(f"cannot reach {env.master_addr}:{env.master_port} for {timeout_s:.0f}s"
                                          f" ({reason})"), env, "reaching rank 0"))


@contextmanager
def rendezvous_errors(env: RankEnv, what: str) -> Iterator[None]:
    """Re-raise any failure inside the block (process-group or sub-group creation) as a RendezvousError."""
    try:
        yield
    except RendezvousError:
        raise
    except (RuntimeError, OSError, TimeoutError) as exc:
        raise RendezvousError(explain(exc, env, what)) from exc


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: every rank then runs on this one machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil  # a dependency of Ray; imported here so that importing this module stays cheap

    return next((name for name, st in psutil.net_if_stats().items() if "loopback" in getattr(st, "flags", "")),
                None)


def keep_sockets_on_loopback(env: RankEnv, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """With a loopback MASTER_ADDR, name the loopback interface for gloo and NCCL where nothing names one.

    Without a name gloo binds its pair sockets to what the hostname resolves to, which on many
    machines is the LAN address: a local run would listen on the network. Every rank is on this
    machine when MASTER_ADDR is loopback, so loopback is always right. Returns what was set.
    """
    target = os.environ if environ is None else environ
    if not is_loopback(env.master_addr):
        return {}
    ifname = loopback_interface()
    added = {k: ifname for k in SOCKET_IFNAME_VARS if ifname and not target.get(k)}
    target.update(added)
    return added


def listen_on(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port`` (that address only); None when no local interface holds it."""
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT from the last attempt
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL:
                raise  # EADDRINUSE and the like: a rendezvous failure the launcher retries on a new port
    return None


def agent_hosts_store() -> bool:
    """Whether a torchrun (torchelastic) agent already serves the store at MASTER_ADDR:MASTER_PORT, so that
    every rank, rank 0 included, is a client (the variable torch's own ``env://`` rendezvous reads)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def bound_store(env: RankEnv, timeout: timedelta) -> "Store":
    """The job's TCPStore: on rank 0 a server listening on MASTER_ADDR's address only, elsewhere a client.
    Under torchrun the agent's store serves instead (:func:`agent_hosts_store`), bound as torchrun binds it.

    When MASTER_ADDR is not an address of rank 0's machine (a NAT'd or forwarded address) the
    server listens on every interface, as torch's own does, and says so.
    """
    from torch.distributed import TCPStore

    common = dict(host_name=env.master_addr, port=env.master_port, world_size=env.world_size, timeout=timeout)
    if env.rank != 0 or agent_hosts_store():
        return TCPStore(is_master=False, **common)
    sock = listen_on(env.master_addr, env.master_port)
    if sock is None:
        print(f"rank 0: MASTER_ADDR={env.master_addr} is not an address of this machine, so the rendezvous store"
              f" listens on every interface (port {env.master_port})", flush=True)
        return TCPStore(is_master=True, use_libuv=True, **common)
    # The store owns the descriptor from here on; libuv's server is the one that accepts a given one.
    return TCPStore(is_master=True, master_listen_fd=sock.detach(), use_libuv=True, **common)


def join_process_group(env: RankEnv, backend: str, timeout: timedelta) -> None:
    """Join the default process group through :func:`bound_store`, with the sockets kept where
    :func:`keep_sockets_on_loopback` says; failures become a :class:`RendezvousError`."""
    import torch.distributed as dist

    keep_sockets_on_loopback(env)
    wait_for_master(env)
    with rendezvous_errors(env, "joining the process group"):
        store = bound_store(env, timeout)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
