"""Pure topology math: ``(world, tp, pp) -> coordinates and groups`` of every rank.

The order is DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model; model
innermost): ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``. Tensor-parallel peers therefore
hold consecutive ranks, and the launcher, which numbers ranks node by node, keeps them on one node.
Expert parallelism subdivides the data axis: ``ep`` consecutive data-parallel indices of one
(pp, tp) coordinate share out the experts (an expert-parallel group, exchanging tokens all-to-all),
and the ranks with the same index in their expert-parallel group hold the same experts (an
expert-data-parallel group, averaging those experts' gradients); DeepSpeed's "E + D" order.
Sequence parallelism subdivides it the same way: ``sp`` consecutive data-parallel indices share their
samples, each holding ``seq / sp`` tokens (a sequence-parallel group); the data is split among the
``dp / sp`` groups only (:meth:`Topology.batch_rank`).
No torch import here: the launcher and the planner use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class RankCoord:
    """Where one global rank sits in the 3D grid."""

    rank: int
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class Topology:
    """A ``pp x dp x tp`` grid of ranks with tp innermost."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        if min(self.world, self.tp, self.pp, self.ep, self.sp) <= 0:
            raise ValueError(f"world={self.world}, tp={self.tp}, pp={self.pp}, ep={self.ep}, sp={self.sp}:"
                             " all must be positive")
        if self.world % (self.tp * self.pp) != 0:
            raise ValueError(
                f"world size {self.world} is not divisible by tp x pp = {self.tp} x {self.pp}; "
                "world must equal dp x pp x tp"
            )
        if self.dp % self.ep:
            raise ValueError(f"ep={self.ep} does not divide the data-parallel size {self.dp}: expert-parallel"
                             " groups are carved out of the data-parallel ranks")
        if self.dp % self.sp:
            raise ValueError(f"sp={self.sp} does not divide the data-parallel size {self.dp}: sequence-parallel"
                             " groups are carved out of the data-parallel ranks")

    @property
    def dp(self) -> int:
        """Data-parallel size."""
        return self.world // (self.tp * self.pp)

    @property
    def batch_dp(self) -> int:
        """How many different micro-batches a step reads side by side: ``dp / sp``."""
        return self.dp // self.sp

    def batch_rank(self, rank: int) -> int:
        """Which share of the data ``rank`` reads (the ranks of a sequence-parallel group read the same)."""
        return self.coord(rank).dp // self.sp

    def sp_rank(self, rank: int) -> int:
        """``rank``'s place in its sequence-parallel group: which chunk of each sample's tokens it holds."""
        return self.coord(rank).dp % self.sp

    def rank_of(self, *, pp: int, dp: int, tp: int) -> int:
        """Global rank at grid coordinates."""
        if not (0 <= pp < self.pp and 0 <= dp < self.dp and 0 <= tp < self.tp):
            raise ValueError(f"coordinates pp={pp} dp={dp} tp={tp} outside {self.pp}x{self.dp}x{self.tp}")
        return (pp * self.dp + dp) * self.tp + tp

    def coord(self, rank: int) -> RankCoord:
        """Grid coordinates of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world of {self.world}")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return RankCoord(rank=rank, pp=pp, dp=dp, tp=tp)

    @cached_property
    def coords(self) -> tuple[RankCoord, ...]:
        """Coordinates of every rank, by rank."""
        return tuple(self.coord(r) for r in range(self.world))

    def tp_groups(self) -> list[list[int]]:
        """Ranks that split one matmul (same pp and dp), consecutive by construction."""
        return [[self.rank_of(pp=p, dp=d, tp=t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same parameters and average gradients (same pp and tp)."""
        return [[self.rank_of(pp=p, dp=d, tp=t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        """Ranks that form one pipeline (same dp and tp), stage by stage."""
        return [[self.rank_of(pp=p, dp=d, tp=t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def ep_groups(self) -> list[list[int]]:
        """Ranks that share out the experts (``ep`` consecutive dp indices of one pp and tp)."""
        return [[self.rank_of(pp=p, dp=b * self.ep + i, tp=t) for i in range(self.ep)]
                for p in range(self.pp) for t in range(self.tp) for b in range(self.dp // self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """Ranks that hold the same experts (the same place in their expert-parallel groups)."""
        return [[self.rank_of(pp=p, dp=b * self.ep + i, tp=t) for b in range(self.dp // self.ep)]
                for p in range(self.pp) for t in range(self.tp) for i in range(self.ep)]

    def sp_groups(self) -> list[list[int]]:
        """Ranks that share their samples, each holding a chunk of the tokens (``sp`` consecutive dp indices)."""
        return [[self.rank_of(pp=p, dp=b * self.sp + i, tp=t) for i in range(self.sp)]
                for p in range(self.pp) for t in range(self.tp) for b in range(self.dp // self.sp)]

    def ep_rank(self, rank: int) -> int:
        """``rank``'s place in its expert-parallel group: which share of the experts it keeps."""
        return self.coord(rank).dp % self.ep

    def group_of(self, rank: int, axis: str) -> list[int]:
        """The members of ``rank``'s group along ``axis`` (``tp``, ``dp``, ``pp``, ``ep``, ``edp`` or ``sp``)."""
        groups = {"tp": self.tp_groups, "dp": self.dp_groups, "pp": self.pp_groups, "ep": self.ep_groups,
                  "edp": self.edp_groups, "sp": self.sp_groups}[axis]()
        return next(g for g in groups if rank in g)


def node_slot(rank: int, slots_per_node: int | None) -> tuple[int, int]:
    """``(node index, local slot)`` of a rank when ranks fill nodes in order (launcher's placement)."""
    if not slots_per_node:
        return 0, rank
    return divmod(rank, slots_per_node)
