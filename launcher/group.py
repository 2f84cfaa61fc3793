"""One attempt's worker group: placement group, one actor per bundle, rank table, start and teardown.

Every attempt builds a fresh group: after a failure a node may be gone, and after preemption the
cluster may look different, so bundles are placed and ranks numbered anew each time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fm_train.dist.topology import Topology
from launcher.actor import WorkerProcess
from launcher.cluster import ClusterError, Demand
from launcher.netif import choose_interface, socket_env
from launcher.placement import Placement, Slot, assign_ranks
from launcher.preflight import NodeProbe

_RemoteWorker = ray.remote(WorkerProcess)


@dataclass
class WorkerGroup:
    """Actors ordered by rank, with the placement they were numbered by."""

    actors: list[Any]
    placement: Placement
    master_addr: str
    master_port: int
    _pg: Any
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per node id: the socket-interface variables its workers get (:mod:`launcher.netif`)."""

    @classmethod
    def create(cls, demand: Demand, topology: Topology, *, placement_timeout_s: float,
               socket_ifname: str | None = None) -> "WorkerGroup":
        """Reserve one bundle per slot (PACK), start an actor in each and number the ranks node by node.

        ``socket_ifname`` (``cluster.socket_ifname``) overrides the interface found on each node.
        """
        pg = placement_group([demand.bundle() for _ in range(demand.workers)], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ClusterError(
                f"the cluster could not place {demand.workers} slots of {demand.bundle()} within"
                f" {placement_timeout_s:.0f}s (free now: {_free_summary()}); free resources or raise --placement-timeout-s"
            ) from None
        try:
            table = placement_group_table(pg)["bundles_to_node_id"]
            actors = [
                _RemoteWorker.options(
                    num_cpus=demand.cpus_per_worker, num_gpus=demand.gpus_per_worker, max_concurrency=4,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                ).remote()
                for i in range(demand.workers)
            ]
            infos = _describe_all(actors, table, placement_timeout_s)
            choices = {info["node_id"]: choose_interface(socket_ifname, info["socket_env"], info["interface"])
                       for info in infos}
            node_env = {info["node_id"]: socket_env(choices[info["node_id"]], info["socket_env"]) for info in infos}
            slots = [Slot(bundle_index=i, node_id=info["node_id"], node_ip=info["node_ip"], gpu_ids=tuple(info["gpu_ids"]),
                          interface=choices[info["node_id"]].label())
                     for i, info in enumerate(infos)]
            for slot in slots:
                # The actor's own view and the placement table must agree, or the ordering is wrong.
                if table.get(slot.bundle_index) not in (None, slot.node_id):
                    raise ClusterError(f"bundle {slot.bundle_index} is on node {table[slot.bundle_index][:8]} by the"
                                       f" placement table but its actor runs on {slot.node_id[:8]}")
            placement = assign_ranks(slots, topology)
            by_rank = [actors[r.bundle_index] for r in placement.ranks]
            port = int(ray.get(by_rank[0].free_port.remote(), timeout=60))
        except BaseException:
            remove_placement_group(pg)
            raise
        return cls(actors=by_rank, placement=placement, master_addr=placement.ranks[0].node_ip, master_port=port, _pg=pg,
                   node_env=node_env)

    def node_probes(self) -> list[NodeProbe]:
        """One actor per node (the lowest rank there), for the preflight."""
        seen: dict[str, NodeProbe] = {}
        for r in self.placement.ranks:
            seen.setdefault(r.node_id, NodeProbe(node_id=r.node_id, node_ip=r.node_ip, actor=self.actors[r.rank]))
        return list(seen.values())

    def rank_env(self, rank: int, *, attempt: int, extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
        """The environment of one rank's worker process (torchrun names, plus the GPUs of its node)."""
        r = self.placement.by_rank(rank)
        env = {
            "RANK": str(rank), "WORLD_SIZE": str(self.placement.world_size), "LOCAL_RANK": str(r.local_rank),
            "LOCAL_WORLD_SIZE": str(r.local_world_size), "NODE_RANK": str(r.node_rank), "GROUP_RANK": str(r.node_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            # No GPUs reserved means none visible: a CPU rank must not grab a device another job holds.
            "CUDA_VISIBLE_DEVICES": ",".join(r.node_gpu_ids),
            "FM_TRAIN_NODE_ID": r.node_id, "FM_TRAIN_NODE_IP": r.node_ip, "FM_TRAIN_ATTEMPT": str(attempt),
        }
        env.update(self.node_env.get(r.node_id, {}))
        env.update(dict(extra))
        return env

    def start(self, command: Sequence[str], *, workdir: str, run_dir: str, config_text: str, attempt: int,
              extra_env: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
        """Start every rank's worker command; returns each rank's pid, argv and working directory."""
        refs = [actor.start.remote(list(command), self.rank_env(rank, attempt=attempt, extra=extra_env), workdir,
                                   run_dir, config_text, rank == 0)
                for rank, actor in enumerate(self.actors)]
        return ray.get(refs, timeout=120)

    def save_placement(self, run_dir: Path, attempt: int) -> Path:
        """Write RUN/placement.json for this attempt."""
        path = run_dir / "placement.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = self.placement.to_json(master_addr=self.master_addr, master_port=self.master_port, attempt=attempt)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def exited(self, timeout_s: float = 10.0) -> dict[int, int]:
        """Exit codes of the ranks whose worker has ended, read without stopping any (an actor that does
        not answer within ``timeout_s`` is left out)."""
        refs = {a.returncode.remote(): r for r, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        codes: dict[int, int] = {}
        for ref in ready:
            try:
                code = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            if code is not None:
                codes[refs[ref]] = code
        return codes

    def stop_all(self, grace_s: float) -> list[int | None]:
        """SIGTERM every rank, SIGKILL after ``grace_s``; exit codes by rank (None where the actor is gone)."""
        refs = [a.stop.remote(grace_s) for a in self.actors]
        codes: list[int | None] = []
        for ref in refs:
            try:
                codes.append(ray.get(ref, timeout=grace_s + 60))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                codes.append(None)
        return codes

    def teardown(self) -> None:
        """Kill any worker process still alive, then the actors, and release the bundles."""
        # Normally the processes are gone already; after an interrupted stop they may not be, and an
        # actor killed by Ray would leave its worker's session running.
        refs = [a.stop.remote(0.0) for a in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=15)
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead with its node: nothing left to release
                pass
        try:
            remove_placement_group(self._pg)
        except Exception:
            return
        # Removal is asynchronous; wait briefly so the next attempt (or launch) sees the slots free.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if placement_group_table(self._pg).get("state") == "REMOVED":
                break
            time.sleep(0.1)


def _describe_all(actors: Sequence[Any], table: dict[int, str], timeout_s: float) -> list[dict[str, Any]]:
    """Each actor's :meth:`~launcher.actor.WorkerProcess.describe`; an actor that cannot even start is
    usually a node without fm-train (or with another checkout), so the error names the node."""
    refs = [a.describe.remote() for a in actors]
    infos = []
    for i, ref in enumerate(refs):
        try:
            infos.append(ray.get(ref, timeout=timeout_s))
        except ray.exceptions.RayActorError as exc:
            node_id = table.get(i) or "?"
            ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
            detail = str(exc).strip().splitlines()
            cause = next((line.strip() for line in reversed(detail) if "Error" in line), detail[-1] if detail else "")
            raise ClusterError(
                f"the worker actor for slot {i} could not start on node {ips.get(node_id, '?')} ({node_id[:8]}): {cause}."
                " Install the same fm-train checkout on every node (pip install -e . in the same path), or submit"
                " with `fm-train submit`, which ships the project directory to the cluster"
            ) from None
    return infos


def _free_summary() -> str:
    free = ray.available_resources()
    return ", ".join(f"{k}={v:g}" for k, v in sorted(free.items()) if k in ("CPU", "GPU")) or "nothing"
