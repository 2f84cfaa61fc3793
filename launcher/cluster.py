"""Start a private local Ray or join a cluster, and check that it has room for the run.

A private instance binds every Ray port to 127.0.0.1 and starts no dashboard: a laptop run must not
open a code-execution service to the network. Joining keeps the cluster's own token authentication
(Ray reads ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); the launcher never disables it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import urlparse


class ClusterError(RuntimeError):
    """The cluster cannot be reached or cannot hold the run; the message says which and why."""


# Ray resolves the node IP to the machine's routable address unless clusters are "disabled" (the
# Windows/macOS switch); turning that off is the supported way to keep every port on loopback.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def resolve_address(cli_address: str | None, config_address: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray address to join: ``--address`` > ``cluster.address`` > RAY_ADDRESS; None means a private local Ray."""
    env = os.environ if environ is None else environ
    for candidate in (cli_address, config_address, env.get("RAY_ADDRESS")):
        if candidate and candidate.strip() and candidate.strip().lower() != "local":
            return candidate.strip()
    return None


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS or Ray-client address; None for ``auto`` (found from local files)."""
    if address == "auto":
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname or parsed.port is None:
        raise ClusterError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.1:6379, ray://head:10001 or auto)")
    return parsed.hostname, parsed.port


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing listens at ``address`` (ray.init itself may retry for minutes)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} within {timeout_s:.0f}s ({exc.strerror or exc}); check"
            " cluster.address / --address / RAY_ADDRESS, that `ray start --head` runs there and that the port is open"
        ) from None


@dataclass
class Connection:
    """A live driver connection; ``owned`` connections are shut down by :meth:`close`."""

    address: str | None
    private: bool
    owned: bool
    _restore_env: str | None = None

    def close(self) -> None:
        """Disconnect (and stop a private instance) if this launch opened it; undo the loopback switch."""
        if not self.owned:
            return
        import ray

        from launcher.ray_private import set_cluster_mode

        ray.shutdown()
        if self.private:
            if self._restore_env is None:
                os.environ.pop(_LOOPBACK_ENV, None)
            else:
                os.environ[_LOOPBACK_ENV] = self._restore_env
            set_cluster_mode(self._restore_env != "0")


def connect(address: str | None, *, timeout_s: float = 10.0) -> Connection:
    """Join ``address`` or start a private local Ray; reuse a connection the caller already opened."""
    if address is not None:
        check_reachable(address, timeout_s)
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return Connection(address=address, private=False, owned=False)
    from launcher.logsink import quiet_ray_driver

    quiet_ray_driver()  # Ray's known start-up notices off the console (docs/launcher.md, "Console output")
    if address is None:
        previous = os.environ.get(_LOOPBACK_ENV)
        os.environ[_LOOPBACK_ENV] = "0"  # read when Ray is imported
        import ray

        from launcher.ray_private import set_cluster_mode

        # If Ray was imported before, the variable was already read; without this the node would
        # advertise (and bind to) the machine's routable IP.
        set_cluster_mode(False)
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                 namespace="fm-train")
        return Connection(address=None, private=True, owned=True, _restore_env=previous)
    import ray

    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False, namespace="fm-train")
    except ConnectionError as exc:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    except Exception as exc:  # ray.exceptions.AuthenticationError: keep Ray's message, add the fix
        if type(exc).__name__ == "AuthenticationError":
            raise ClusterError(
                f"the Ray cluster at {address} rejected this driver's token: {exc}. Copy the cluster's token"
                " (`ray get-auth-token` on the head) to ~/.ray/auth_token or set RAY_AUTH_TOKEN"
            ) from None
        raise
    return Connection(address=address, private=False, owned=True)


@dataclass(frozen=True)
class Demand:
    """What the run asks of the cluster."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    def bundle(self) -> dict[str, float]:
        """One placement-group bundle (Ray rejects zero-valued resources, so zeros are left out)."""
        out = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker > 0:
            out["GPU"] = float(self.gpus_per_worker)
        return out


def _fmt(x: float) -> str:
    return f"{x:g}"


def shortfall(demand: Demand, free: Mapping[str, float], node_totals: list[Mapping[str, float]]) -> str | None:
    """Why the cluster cannot hold the run right now, or None when it can (pure; unit-tested)."""
    problems = []
    for res, per in (("CPU", demand.cpus_per_worker), ("GPU", demand.gpus_per_worker)):
        if per <= 0:
            continue
        need, have = demand.workers * per, free.get(res, 0.0)
        if have + 1e-9 < need:
            problems.append(f"needs {demand.workers} workers x {_fmt(per)} {res}, cluster has {_fmt(have)} {res}s free"
                            f" (short by {_fmt(need - have)})")
    if problems:
        return "; ".join(problems)
    # Aggregate room is not enough: each bundle must fit on one node.
    slots = 0
    for node in node_totals:
        fits = [node.get(res, 0.0) // per for res, per in demand.bundle().items()]
        slots += int(min(fits)) if fits else 0
    if slots < demand.workers:
        return (f"needs {demand.workers} workers x {demand.bundle()} each on one node, but the nodes' sizes allow only"
                f" {slots} such slots; use smaller slots (cluster.cpus_per_worker) or bigger nodes")
    return None


def slots_per_node(demand: Demand) -> list[int]:
    """How many of ``demand``'s bundles each live node can hold (by its total resources), largest first."""
    import ray

    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        totals = node.get("Resources", {})
        fits = [int(totals.get(res, 0.0) // per) for res, per in demand.bundle().items()]
        if fits and min(fits) > 0:
            out.append(min(fits))
    return sorted(out, reverse=True)


def silent_nodes(timeout_s: float = 2.0) -> list[str]:
    """``ip (node id)`` of nodes Ray still counts alive whose raylet refuses or ignores a TCP connection.

    Ray marks a node dead only after several missed health checks (15-30 s by default); a group
    placed in that window may land on the dead node and wait out the placement timeout.
    """
    import ray

    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        address = (node.get("NodeManagerAddress"), node.get("NodeManagerPort"))
        try:
            with socket.create_connection(address, timeout=timeout_s):
                pass
        except (OSError, TypeError):
            out.append(f"{address[0]} ({str(node.get('NodeID', '?'))[:8]})")
    return out


def wait_for_dead_nodes(say: Callable[[str], None], max_wait_s: float = 120.0, poll_s: float = 1.0) -> None:
    """Wait until Ray has declared every silent node dead (or it answers again), up to ``max_wait_s``."""
    silent = silent_nodes()
    if not silent:
        return
    say(f"node(s) {', '.join(silent)} do not answer; waiting up to {max_wait_s:.0f}s for Ray to declare them dead")
    deadline = time.monotonic() + max_wait_s
    while silent and time.monotonic() < deadline:
        time.sleep(poll_s)
        silent = silent_nodes()


def check_capacity(demand: Demand) -> None:
    """Raise :class:`ClusterError` naming the shortfall before anything is started."""
    import ray

    free = ray.available_resources()
    node_totals = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problem = shortfall(demand, free, node_totals)
    if problem:
        raise ClusterError(f"not enough resources: {problem}")
