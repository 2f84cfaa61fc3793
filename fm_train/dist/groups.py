"""Process groups of one rank's place in the ``pp x dp x tp`` grid, and DeepSpeed's ``mpu`` interface.

:class:`ParallelGroups` is a plain object passed to whoever needs a group (the tensor-parallel
layers, the engine); nothing here is module-level state. DeepSpeed reads tensor and data
parallelism from the ``mpu`` argument of ``deepspeed.initialize`` by duck typing, so the object
also answers the Megatron-style ``get_*`` methods DeepSpeed 0.19 calls (``bwc_*`` helpers, ZeRO's
gradient-norm code, checkpoint metadata). With a pipeline (pp > 1) DeepSpeed uses the
``PipelineModule``'s own grid instead and ``mpu`` must not be passed.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import ProcessGroup

from fm_train.dist.topology import RankCoord, Topology


class ParallelGroups:
    """The tp, dp, pp and model-parallel (tp x pp) groups of the calling rank.

    Every rank must construct this object at the same point of the program: ``new_group`` is a
    collective over the whole world, so each rank creates every group of every axis, in the same
    order, and keeps the ones it belongs to.
    """

    def __init__(self, topology: Topology, rank: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups needs an initialised torch.distributed default group")
        world = dist.get_world_size()
        if world != topology.world:
            raise ValueError(
                f"topology is for {topology.world} ranks but torch.distributed has {world};"
                " cluster.workers must equal the launched world size"
            )
        self.topology = topology
        self.rank = dist.get_rank() if rank is None else rank
        self.coord: RankCoord = topology.coord(self.rank)
        self._ranks: dict[str, list[int]] = {}
        self._groups: dict[str, ProcessGroup] = {}
        # Fixed order on every rank: tp, dp, pp, then model-parallel (tp x pp of one dp index, Megatron's
        # definition, which is also what DeepSpeed's pipeline grid calls its model-parallel group), then
        # with expert parallelism the expert-parallel and expert-data-parallel groups, with sequence
        # parallelism the sequence-parallel ones. DeepSpeed is not told about sp (no
        # get_sequence_parallel_* here): to it the sp ranks are data-parallel ranks, which is what they are
        # for ZeRO's partitions and the gradient average (see fm_train.parallel.sequence_parallel).
        for axis, groups in (("tp", topology.tp_groups()), ("dp", topology.dp_groups()),
                             ("pp", topology.pp_groups()), ("mp", self._model_parallel_groups()),
                             *((("ep", topology.ep_groups()), ("edp", topology.edp_groups())) if topology.ep > 1 else ()),
                             *((("sp", topology.sp_groups()),) if topology.sp > 1 else ())):
            for ranks in groups:
                group = dist.new_group(ranks=ranks)
                if self.rank in ranks:
                    self._ranks[axis], self._groups[axis] = ranks, group
        # Host-side agreements (the stop flag after every step) go over gloo: on an NCCL world a
        # one-integer all-reduce would otherwise be a device round trip and a host sync per step.
        self.control: ProcessGroup | None = (
            None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))

    def _model_parallel_groups(self) -> list[list[int]]:
        t = self.topology
        return [sorted(t.rank_of(pp=p, dp=d, tp=k) for p in range(t.pp) for k in range(t.tp)) for d in range(t.dp)]

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along ``axis`` (``tp``, ``dp``, ``pp``, ``mp``; ``ep`` and ``edp``
        when ep > 1; ``sp`` when sp > 1)."""
        return list(self._ranks[axis])

    def group(self, axis: str) -> ProcessGroup:
        """This rank's process group along ``axis`` (as :meth:`ranks`)."""
        return self._groups[axis]

    # ---- tensor parallel -------------------------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        """Index of this rank among the ranks that split one matmul."""
        return self.coord.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        """Tensor-parallel size."""
        return self.topology.tp

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        """Group of the ranks that split one matmul."""
        return self._groups["tp"]

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp rank 0 in this rank's tp group (source of tp broadcasts)."""
        return self._ranks["tp"][0]

    # ---- data parallel ---------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        """Index of this rank's model replica (selects its slice of each global batch)."""
        return self.coord.dp

    def get_data_parallel_world_size(self) -> int:
        """Number of model replicas."""
        return self.topology.dp

    def get_data_parallel_group(self) -> ProcessGroup:
        """Group of the ranks that hold the same parameters and average gradients."""
        return self._groups["dp"]

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group."""
        return self.ranks("dp")

    # ---- pipeline parallel -----------------------------------------------------------------------
    def get_pipeline_model_parallel_rank(self) -> int:
        """Pipeline stage of this rank."""
        return self.coord.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        """Number of pipeline stages."""
        return self.topology.pp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        """Ranks of one pipeline (same dp and tp), stage by stage."""
        return self._groups["pp"]

    # ---- model parallel (tp x pp): what DeepSpeed all-reduces gradient norms and overflow over ----
    def get_model_parallel_rank(self) -> int:
        """Index of this rank within its model-parallel (tp x pp) group."""
        return self._ranks["mp"].index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        """Ranks that together hold one copy of the model (tp x pp)."""
        return self.topology.tp * self.topology.pp

    def get_model_parallel_group(self) -> ProcessGroup:
        """Group of the ranks that together hold one copy of the model."""
        return self._groups["mp"]

    def __repr__(self) -> str:
        c = self.coord
        return f"ParallelGroups(rank={c.rank}, pp={c.pp}/{self.topology.pp}, dp={c.dp}/{self.topology.dp}, tp={c.tp}/{self.topology.tp})"
