"""``fm-train plan --fit GIB``: the cheapest memory settings of a run that fit a stated budget.

The search keeps what the recipe fixes (the world, pp, sp, ep, micro-batch and global batch) and
tries, in order of what each costs a step:

1. the fewest recomputed blocks (``parallel.recompute_blocks``): each costs one more forward of it,
   a third of its step (all of them: about a quarter of the step), a cost nothing hides;
2. the smallest tensor-parallel size (within a node), since each tp doubling adds collectives to every
   block; ``train.grad_accum`` follows so that the global batch stays;
3. the lowest ZeRO stage from 1 up: ZeRO-1 reduces gradients once per step, ZeRO-2 on every
   micro-batch, ZeRO-3 also gathers the parameters on every forward and backward, mostly overlapped.

Every candidate passes the config rules and is planned by :func:`fm_train.plan.memory.estimate_memory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fm_train.config import FmConfig
from fm_train.config.rules import check_rules
from fm_train.families.spec import FamilySpec
from fm_train.plan.memory import GIB, estimate_memory


@dataclass(frozen=True)
class Fit:
    """One candidate setting and its planned peak."""

    cfg: FmConfig
    peak_gib: float
    recomputed: int  # blocks per stage recomputed (0: none)
    blocks: int  # blocks per stage

    @property
    def recompute_flops(self) -> float:
        """Extra model FLOPs of the recomputation, as a share of the step's: a block's forward is a third of
        its forward and backward, the head and embedding left out (an estimate)."""
        return self.recomputed / self.blocks / 3

    def overrides(self) -> list[str]:
        """The ``--set`` arguments that turn the recipe into this setting."""
        p, t = self.cfg.parallel, self.cfg.train
        out = [f"parallel.tp={p.tp}", f"parallel.zero_stage={p.zero_stage}", f"train.grad_accum={t.grad_accum}",
               f"parallel.activation_checkpointing={'true' if p.activation_checkpointing else 'false'}"]
        if p.activation_checkpointing:
            out.append(f"parallel.recompute_blocks={'null' if p.recompute_blocks is None else p.recompute_blocks}")
        if p.tp > 1:
            out.append(f"parallel.tp_sequence_parallel={'true' if p.tp_sequence_parallel else 'false'}")
        return out

    def describe(self) -> str:
        p = self.cfg.parallel
        recompute = ("no recomputation" if not self.recomputed else
                     f"recompute {self.recomputed} of {self.blocks} blocks per stage (+~{self.recompute_flops:.0%} FLOPs)")
        return (f"tp {p.tp}, zero stage {p.zero_stage}, grad_accum {self.cfg.train.grad_accum}, {recompute}:"
                f" peak {self.peak_gib:.2f} GiB")


def _tp_sizes(cfg: FmConfig) -> list[int]:
    """Tensor-parallel sizes to try: powers of two that fit a node and divide the world over pp."""
    per_node = cfg.cluster.slots_per_node or cfg.cluster.workers
    sizes, tp = [], 1
    while tp <= per_node and cfg.world_size % (tp * cfg.parallel.pp) == 0:
        sizes.append(tp)
        tp *= 2
    return sizes


def _with(cfg: FmConfig, *, tp: int, zero: int, recompute: int | None, blocks: int) -> FmConfig | None:
    """``cfg`` with these settings and the global batch kept; None when no integer grad_accum keeps it or a
    config rule fails."""
    p = cfg.parallel
    dp = cfg.world_size // (tp * p.pp)
    replicas = dp // p.sp if dp % p.sp == 0 else 0
    if not replicas or cfg.global_batch % (cfg.train.micro_batch * replicas):
        return None
    accum = cfg.global_batch // (cfg.train.micro_batch * replicas)
    parallel: dict[str, Any] = {"tp": tp, "zero_stage": zero, "activation_checkpointing": recompute is not None,
                                "recompute_blocks": None if recompute in (None, blocks) else recompute,
                                "tp_sequence_parallel": p.tp_sequence_parallel and tp > 1}
    trial = cfg.model_copy(update={"parallel": p.model_copy(update=parallel),
                                   "train": cfg.train.model_copy(update={"grad_accum": accum, "global_batch": None})})
    return None if check_rules(trial, require_paths=False) else trial


def candidates(cfg: FmConfig, family: FamilySpec, *, device: str = "gpu") -> list[Fit]:
    """Every setting of the search, in the order of preference (see the module docstring)."""
    blocks = math.ceil(cfg.model.n_layers / cfg.parallel.pp)
    zeros = (1,) if cfg.parallel.pp > 1 else (1, 2, 3)  # DeepSpeed's pipeline allows ZeRO 0-1 only
    out = []
    for recompute in [None, *range(1, blocks + 1)]:
        for tp in _tp_sizes(cfg):
            for zero in zeros:
                trial = _with(cfg, tp=tp, zero=zero, recompute=recompute, blocks=blocks)
                if trial is None:
                    continue
                peak = estimate_memory(trial, family, device=device).device_total / GIB
                out.append(Fit(trial, peak, 0 if recompute is None else recompute, blocks))
    return out


def fit(cfg: FmConfig, family: FamilySpec, budget_gib: float, *, device: str = "gpu") -> tuple[Fit | None, list[Fit]]:
    """``(the first setting that fits budget_gib or None, the first fitting one of each tp size)``."""
    fitting = [c for c in candidates(cfg, family, device=device) if c.peak_gib <= budget_gib]
    per_tp: dict[int, Fit] = {}
    for c in fitting:
        per_tp.setdefault(c.cfg.parallel.tp, c)
    return (fitting[0] if fitting else None), list(per_tp.values())
