"""Where a local run's ranks listen: rank 0's store and gloo's sockets on 127.0.0.1, never on every interface.

The listening sockets are read from /proc/net/tcp{,6}, matched to the process's own descriptors
(/proc/self/fd), inside the real ranks right after the worker's real process-group start.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fm_train.dist.env import RankEnv
from fm_train.dist.rendezvous import keep_sockets_on_loopback, listen_on, loopback_interface
from tests.distributed import run_distributed

pytestmark = [pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")]


def _hex_ip(field: str) -> str:
    """The address of a /proc/net/tcp{,6} ``ADDR:PORT`` field in its usual notation."""
    raw = bytes.fromhex(field.split(":")[0])
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc writes IPv6 as four host-order (little-endian) 32-bit words.
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def own_listeners() -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket this process has in the LISTEN state."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.append((_hex_ip(cols[1]), int(cols[1].split(":")[1], 16)))
    return found


def _join_and_list() -> tuple[int, list[tuple[str, int]]]:
    """In a rank: join as the worker does (fm_train.deepspeed_adapter.comm), list the listeners, leave."""
    os.environ.pop("GLOO_SOCKET_IFNAME", None)  # what a run outside the launcher (torchrun, srun) has
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.process_group import shutdown_distributed

    env = RankEnv.from_environ()
    init_distributed(env)
    try:
        return env.master_port, own_listeners()
    finally:
        shutdown_distributed()


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_store_and_gloo_listen_only_on_loopback_for_a_local_run():
    results = run_distributed(_join_and_list, world_size=2, init_process_group=False)
    port, rank0 = results[0]
    assert [addr for addr, p in rank0 if p == port] == ["127.0.0.1"], f"rank 0's store on port {port}: {rank0}"
    for rank, (_, sockets) in enumerate(results):
        wide = [(addr, p) for addr, p in sockets if not addr.startswith("127.") and addr != "::1"]
        assert not wide, f"rank {rank} listens beyond loopback: {wide} (all: {sockets})"


@pytest.mark.unit
def test_a_loopback_master_names_the_loopback_interface_unless_one_is_named():
    lo = loopback_interface()
    assert lo is not None
    local = RankEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=1)
    environ: dict[str, str] = {}
    assert keep_sockets_on_loopback(local, environ) == {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}
    chosen = {"GLOO_SOCKET_IFNAME": "eth9"}
    keep_sockets_on_loopback(local, chosen)
    assert chosen == {"GLOO_SOCKET_IFNAME": "eth9", "NCCL_SOCKET_IFNAME": lo}  # the user's choice stays
    remote: dict[str, str] = {}
    keep_sockets_on_loopback(RankEnv(rank=1, world_size=2, local_rank=1, master_addr="10.1.2.3", master_port=1),
                             remote)
    assert remote == {}


@pytest.mark.unit
def test_listen_on_binds_the_named_address_and_declines_a_foreign_one():
    sock = listen_on("127.0.0.1", 0)
    assert sock is not None
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1"
    assert listen_on("203.0.113.7", 0) is None  # TEST-NET-3: no interface here holds it


_UNDER_TORCHRUN = """
import torch
import torch.distributed as dist
from fm_train.dist.env import RankEnv
from fm_train.deepspeed_adapter.comm import init_distributed
from fm_train.dist.process_group import shutdown_distributed

env = RankEnv.from_environ()
init_distributed(env)
t = torch.ones(1) * (env.rank + 1)
dist.all_reduce(t)
print(f"rank {env.rank}: sum {int(t.item())}", flush=True)
shutdown_distributed()
"""


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_ranks_started_by_torchrun_join_through_the_agents_store(tmp_path: Path) -> None:
    """Under torchrun the agent already serves MASTER_PORT: rank 0 must join it as a client rather than
    bind the port again (which failed with EADDRINUSE before; the README says torchrun works)."""
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(_UNDER_TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0: sum 3" in done.stdout and "rank 1: sum 3" in done.stdout, done.stdout
