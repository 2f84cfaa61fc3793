"""Rank assignment from placed Ray bundles: contiguous per node, tp groups kept inside one node.

Pure functions over :class:`Slot` descriptions (bundle index, node, GPUs), so the ordering rules are
unit-tested without Ray. The order is: nodes by the lowest bundle index they hold (bundle 0's node
hosts rank 0), then within a node by GPU id and bundle index. Because ranks are contiguous per node
and tp is the innermost axis (:mod:`fm_train.dist.topology`), a tp group stays on one node exactly
when every node holds a multiple of tp slots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from fm_train.dist.topology import Topology


class PlacementError(RuntimeError):
    """The cluster placed the workers in a layout the run must not use."""


@dataclass(frozen=True)
class Slot:
    """One placed bundle as its worker actor reported it."""

    bundle_index: int
    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...] = ()
    interface: str = ""
    """The network interface its workers use (:mod:`launcher.netif`), as shown in the table."""


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank runs and the rank environment it gets."""

    rank: int
    bundle_index: int
    node_id: str
    node_ip: str
    node_rank: int
    local_rank: int
    local_world_size: int
    gpu_ids: tuple[str, ...]
    node_gpu_ids: tuple[str, ...]
    dp: int
    pp: int
    tp: int
    interface: str = ""


@dataclass(frozen=True)
class Placement:
    """The rank table of one attempt."""

    ranks: tuple[RankPlacement, ...]
    topology: Topology
    warnings: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return len(self.ranks)

    def by_rank(self, rank: int) -> RankPlacement:
        """The placement of one rank."""
        return self.ranks[rank]

    def table(self) -> str:
        """A fixed-width table for the driver's output."""
        header = ("rank", "node ip", "interface", "node id", "node", "local", "dp", "pp", "tp", "gpus")
        rows = [header] + [
            (str(r.rank), r.node_ip, r.interface or "-", r.node_id[:8], str(r.node_rank),
             f"{r.local_rank}/{r.local_world_size}", str(r.dp), str(r.pp), str(r.tp), ",".join(r.gpu_ids) or "-")
            for r in self.ranks
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def to_json(self, *, master_addr: str, master_port: int, attempt: int) -> dict:
        """The record saved as RUN/placement.json."""
        t = self.topology
        return {"attempt": attempt, "master_addr": master_addr, "master_port": master_port,
                "world_size": t.world, "dp": t.dp, "pp": t.pp, "tp": t.tp, "warnings": list(self.warnings),
                "ranks": [{**asdict(r), "gpu_ids": list(r.gpu_ids), "node_gpu_ids": list(r.node_gpu_ids)} for r in self.ranks]}


def _gpu_key(gpu_ids: Sequence[str]) -> tuple[int, str]:
    if not gpu_ids:
        return (-1, "")
    first = gpu_ids[0]
    return (int(first), first) if str(first).isdigit() else (1 << 30, str(first))


def assign_ranks(slots: Sequence[Slot], topology: Topology) -> Placement:
    """Number the slots node by node and check that tp groups stay inside a node when they can.

    Raises :class:`PlacementError` when a tp group spans nodes although a node could hold one
    (the placement fragmented the layout); only warns when no node holds tp slots at all.
    """
    if len(slots) != topology.world:
        raise PlacementError(f"{len(slots)} placed slots for a world of {topology.world} ranks")
    node_order: dict[str, int] = {}
    for slot in sorted(slots, key=lambda s: s.bundle_index):
        node_order.setdefault(slot.node_id, len(node_order))
    ordered = sorted(slots, key=lambda s: (node_order[s.node_id], _gpu_key(s.gpu_ids), s.bundle_index))

    per_node: dict[str, list[Slot]] = {}
    for slot in ordered:
        per_node.setdefault(slot.node_id, []).append(slot)
    # Each rank sees all GPUs its node holds for this run, ordered by local rank, so that
    # cuda:LOCAL_RANK is its own GPU and NCCL can use peer-to-peer between local ranks.
    node_gpus = {nid: tuple(g for s in members for g in s.gpu_ids) for nid, members in per_node.items()}

    ranks: list[RankPlacement] = []
    for rank, slot in enumerate(ordered):
        members = per_node[slot.node_id]
        coord = topology.coord(rank)
        ranks.append(RankPlacement(
            rank=rank, bundle_index=slot.bundle_index, node_id=slot.node_id, node_ip=slot.node_ip,
            node_rank=node_order[slot.node_id], local_rank=members.index(slot), local_world_size=len(members),
            gpu_ids=tuple(slot.gpu_ids), node_gpu_ids=node_gpus[slot.node_id], dp=coord.dp, pp=coord.pp, tp=coord.tp,
            interface=slot.interface))

    warnings = _check_tp_groups(ranks, topology, {nid: len(m) for nid, m in per_node.items()})
    return Placement(ranks=tuple(ranks), topology=topology, warnings=tuple(warnings))


def _check_tp_groups(ranks: Sequence[RankPlacement], topology: Topology, slots_per_node: dict[str, int]) -> list[str]:
    spanning = [g for g in topology.tp_groups() if len({ranks[r].node_id for r in g}) > 1]
    if not spanning:
        return []
    group = spanning[0]
    group_nodes = list(dict.fromkeys(ranks[r].node_id for r in group))
    nodes = " and ".join(f"{n[:8]} ({slots_per_node[n]} slots)" for n in group_nodes)
    counts = ", ".join(f"{n[:8]}={c}" for n, c in slots_per_node.items())
    if topology.tp <= max(slots_per_node.values()):
        raise PlacementError(
            f"tensor-parallel group ranks {group} would span nodes {nodes}: the cluster placed slots per node as"
            f" {counts}, not multiples of parallel.tp={topology.tp}. Give every node a multiple of {topology.tp}"
            " free slots (set cluster.slots_per_node and size the nodes) or lower parallel.tp"
        )
    return [f"parallel.tp={topology.tp} is larger than any node's slots ({counts}): {len(spanning)} tensor-parallel"
            " groups span nodes and their collectives will cross the network"]
