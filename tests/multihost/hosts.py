"""Hosts with their own IP and disk on one machine: Linux network and mount namespaces, and a real
two-host Ray cluster across them.

Each :class:`Host` is a network namespace with one veth link into a private switch (a bridge in a
namespace of its own), so traffic stays between the namespaces this harness made. Its processes also
share a mount namespace in which a fresh tmpfs covers :data:`LOCAL_DIR`: that directory is the host's
own disk, seen by no other host. Everything else of the machine's filesystem plays the part of a
shared filesystem (NFS). A holder process (``sleep``) keeps both namespaces alive; every other command
joins them with ``nsenter``. The pid namespace is shared, so the test can find, signal and kill the
hosts' processes by pid, and read a host's private disk through ``/proc/<holder>/root``.

Needs root (``ip netns``, ``unshare -m``, ``mount``). Every process a host runs is killed by pid when
the harness is torn down (``ip netns pids``), even after a failed test.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

BIN = Path(sys.executable).parent
LOCAL_DIR = Path("/tmp/fm-train-multihost-local")
"""Every host's private disk is a tmpfs mounted here inside its mount namespace."""
HEAD_PORT = 6379
DASHBOARD_PORT = 8265


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def capability_problem() -> str | None:
    """Why namespaced hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root for network and mount namespaces"
    name = f"fmprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", name)
        subprocess.run(["ip", "netns", "exec", name, "unshare", "-m", "--propagation", "private", "true"], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"cannot create namespaces: {exc} {detail.decode(errors='replace').strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


@dataclass
class Host:
    """One namespaced host: its name, namespace, address and the process that holds it."""

    name: str
    netns: str
    ip: str
    holder: subprocess.Popen | None = None

    def boot(self) -> None:
        """Start the holder: a new mount namespace with a fresh, empty tmpfs at :data:`LOCAL_DIR`."""
        LOCAL_DIR.mkdir(parents=True, exist_ok=True)
        script = f"mount -t tmpfs -o size=2g tmpfs {LOCAL_DIR} && exec sleep infinity"
        self.holder = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation",
                                        "private", "sh", "-c", script], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if f" {LOCAL_DIR} " in Path(f"/proc/{self.holder.pid}/mountinfo").read_text():
                    return
            except OSError:
                pass
            if self.holder.poll() is not None:
                raise RuntimeError(f"host {self.name}: the holder exited with {self.holder.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"host {self.name}: its private disk did not appear within 30s")

    def command(self, argv: Sequence[str], cwd: str | Path = "/") -> list[str]:
        """``argv`` run inside this host's namespaces."""
        assert self.holder is not None, f"host {self.name} is not booted"
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", f"--wd={cwd}", "--", *map(str, argv)]

    def run(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: str | Path = "/", timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run to completion on this host; output captured as text."""
        proc = subprocess.run(self.command(argv, cwd), env=dict(env), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"on host {self.name}: {' '.join(map(str, argv))} exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, argv: Sequence[str], env: Mapping[str, str], *, log: Path, cwd: str | Path = "/") -> subprocess.Popen:
        """Start on this host with stdout and stderr into ``log``."""
        fh = log.open("w")
        return subprocess.Popen(self.command(argv, cwd), env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (the holder included)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> int:
        """SIGKILL every process of the host at once (a machine losing power); returns how many."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.holder is not None:
            self.holder.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():  # children forked while the first round ran
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return len(pids)

    def private(self, path: str | Path) -> Path:
        """``path`` as this host sees it (for files on its private disk)."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).relative_to("/")


@dataclass
class Network:
    """A private switch and the hosts plugged into it (10.213.N.0/24, one network per harness)."""

    prefix: str = field(default_factory=lambda: f"fm{os.getpid() % 100000}")
    subnet: str = "10.213.7"
    hosts: list[Host] = field(default_factory=list)
    _switch: str | None = None

    def create(self) -> None:
        """The switch: a bridge in a namespace of its own."""
        self._switch = f"{self.prefix}sw"
        _ip("netns", "add", self._switch)
        _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._switch, "link", "set", "br0", "up")

    def add_host(self, name: str) -> Host:
        """A new host with the next address, linked to the switch, booted."""
        assert self._switch is not None, "create() the network first"
        index = len(self.hosts) + 1
        # Link names are global while being created (15 characters at most): prefix them too.
        netns, inside, outside = f"{self.prefix}{name}", f"{self.prefix}{name}0", f"{self.prefix}{name}1"
        _ip("netns", "add", netns)
        _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "netns", self._switch)
        _ip("-n", self._switch, "link", "set", outside, "master", "br0")
        _ip("-n", self._switch, "link", "set", outside, "up")
        ip = f"{self.subnet}.{index}"
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", inside)
        _ip("-n", netns, "link", "set", inside, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        host = Host(name=name, netns=netns, ip=ip)
        host.boot()
        self.hosts.append(host)
        return host

    def destroy(self) -> None:
        """Kill every process of every host by pid, then delete the namespaces (their links go with them)."""
        for host in self.hosts:
            host.kill_all()
        for netns in [h.netns for h in self.hosts] + ([self._switch] if self._switch else []):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self.hosts.clear()


def ray_env(token: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of Ray and of the driver on a host: token authentication on, nothing else chosen
    for the network (no GLOO_/NCCL_SOCKET_IFNAME: finding the interface is the launcher's job)."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("RAY_", "GLOO_", "NCCL_")) and k != "PYTEST_CURRENT_TEST"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    # As in an activated virtualenv: a Ray Job's entrypoint runs `python` from the PATH of `ray start`.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


@dataclass
class RayCluster:
    """``ray start --head`` on one host and ``ray start --address`` on the others, with a shared token."""

    head: Host
    cpus_per_host: int = 2
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    extra_env: dict[str, str] = field(default_factory=dict)
    """Set in ``ray start``'s environment on every host, so every worker inherits it (the object store's
    endpoint and credentials, as a cloud node's profile would provide them)."""

    @property
    def address(self) -> str:
        """The GCS address workers and drivers join."""
        return f"{self.head.ip}:{HEAD_PORT}"

    @property
    def dashboard(self) -> str:
        """The job server's address."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def env(self) -> dict[str, str]:
        """The environment for commands on any host of this cluster."""
        return {**ray_env(self.token), **self.extra_env}

    def start_head(self) -> None:
        """Start the head node (GCS, dashboard and job server on the head's own address)."""
        self.head.run([BIN / "ray", "start", "--head", "--node-ip-address", self.head.ip, "--port", str(HEAD_PORT),
                       "--num-cpus", str(self.cpus_per_host), "--temp-dir", str(LOCAL_DIR / "ray"),
                       "--include-dashboard", "true", "--dashboard-host", self.head.ip,
                       "--dashboard-port", str(DASHBOARD_PORT), "--disable-usage-stats"], self.env(), timeout=180)

    def join(self, host: Host) -> None:
        """Start a worker node on ``host``."""
        host.run([BIN / "ray", "start", "--address", self.address, "--node-ip-address", host.ip,
                  "--num-cpus", str(self.cpus_per_host), "--temp-dir", str(LOCAL_DIR / "ray"),
                  "--disable-usage-stats"], self.env(), timeout=180)

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Block until ``count`` nodes are alive (asked from the head host)."""
        code = ("import sys, time, ray\n"
                f"ray.init(address={self.address!r}, log_to_driver=False, configure_logging=False)\n"
                f"deadline = time.monotonic() + {timeout_s}\n"
                f"while sum(n['Alive'] for n in ray.nodes()) != {count} and time.monotonic() < deadline:\n"
                "    time.sleep(0.5)\n"
                f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) == {count} else 1)\n")
        self.head.run([sys.executable, "-c", code], self.env(), timeout=timeout_s + 60)


S3_PORT = 5055


def start_s3(on: Host, log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on ``on``'s own address (every host reaches it over the switch), and the AWS
    environment that points boto3 and s3fs at it (dummy credentials: moto accepts any)."""
    proc = on.popen([BIN / "python", "-m", "moto.server", "-H", on.ip, "-p", str(S3_PORT)], {**os.environ}, log=log)
    env = {"AWS_ENDPOINT_URL": f"http://{on.ip}:{S3_PORT}", "AWS_ACCESS_KEY_ID": "multihost",
           "AWS_SECRET_ACCESS_KEY": "multihost", "AWS_DEFAULT_REGION": "us-east-1"}
    probe = ("import sys, time, boto3\n"
             "for _ in range(200):\n"
             "    try:\n"
             "        boto3.client('s3').list_buckets(); sys.exit(0)\n"
             "    except Exception:\n"
             "        time.sleep(0.1)\n"
             "sys.exit(1)\n")
    on.run([sys.executable, "-c", probe], {**os.environ, **env}, timeout=60)
    return proc, env


def host(network: Network, name: str) -> Host:
    """The host called ``name``."""
    return next(h for h in network.hosts if h.name == name)


def revive(network: Network, cluster: RayCluster, name: str = "b") -> None:
    """Bring a killed host back as a new machine (empty disk) and rejoin it to the cluster."""
    h = host(network, name)
    h.kill_all()
    h.boot()
    cluster.join(h)
    cluster.wait_for_nodes(2)
