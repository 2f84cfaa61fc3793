"""The rank layout table that ``fm-train plan`` prints: global rank -> node slot and dp/pp/tp coordinates."""

from __future__ import annotations

from dataclasses import dataclass

from fm_train.config import FmConfig
from fm_train.dist.topology import Topology, node_slot


@dataclass(frozen=True)
class RankRow:
    """One line of the layout table."""

    rank: int
    node: int
    slot: int
    dp: int
    pp: int
    tp: int


def rank_table(cfg: FmConfig) -> list[RankRow]:
    """Every rank's node slot (ranks fill nodes in order, as the launcher places them) and grid coordinates."""
    topo = Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep, sp=cfg.parallel.sp)
    rows = []
    for c in topo.coords:
        node, slot = node_slot(c.rank, cfg.cluster.slots_per_node)
        rows.append(RankRow(rank=c.rank, node=node, slot=slot, dp=c.dp, pp=c.pp, tp=c.tp))
    return rows


def format_rank_table(rows: list[RankRow]) -> str:
    """Fixed-width text table with a header."""
    header = f"{'rank':>5} {'node':>5} {'slot':>5} {'dp':>4} {'pp':>4} {'tp':>4}"
    lines = [header, "-" * len(header)]
    lines += [f"{r.rank:>5} {r.node:>5} {r.slot:>5} {r.dp:>4} {r.pp:>4} {r.tp:>4}" for r in rows]
    return "\n".join(lines)
