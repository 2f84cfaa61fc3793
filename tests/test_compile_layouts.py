"""``parallel.compile`` (``torch.compile`` of each block) with tensor and pipeline parallelism and activation
checkpointing: the same losses as eager, step for step, on real DeepSpeed engines over gloo.

The blocks are compiled with the ``aot_eager`` backend: it captures the same graphs (dynamo over the
block, AOT autograd's joint forward/backward, the custom autograd functions of the kernels, the tp
collectives, the checkpointed forward) but runs them with eager kernels, so the test costs seconds
instead of inductor's C++ builds on two cores (inductor with activation checkpointing is
tests/test_device_engine.py's slow test).
"""

from __future__ import annotations

import functools

import pytest

from tests.distributed import run_distributed
from tests.test_parallel_equivalence import run_config, train_steps

STEPS = 3

LAYOUTS = {
    "tp2-actckpt": dict(tp=2, pp=1, workers=2, zero=1, activation_checkpointing=True, tie=False),
    "pp2-actckpt-accum2": dict(tp=1, pp=2, workers=2, zero=1, accum=2, activation_checkpointing=True),
}


def _train(cfg) -> tuple[list[float], int]:
    import fm_train.engine.build as build
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine.compile import compile_blocks
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    build.compile_blocks = functools.partial(compile_blocks, backend="aot_eager")
    family = family_of(cfg.model)
    groups = ParallelGroups(Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp))
    module = build_train_module(cfg, family, groups)
    pipelined = cfg.parallel.pp > 1
    engine, _ = build.build_engine(cfg, module, blocks=family.modules().block_types,
                                   mpu=None if pipelined else groups)
    compiled = sum(1 for m in module.modules() if getattr(m, "_fm_train_compiled", False))
    return train_steps(engine, cfg, groups, STEPS), compiled


def _eager_and_compiled(cfgs: dict) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for name, cfg in cfgs.items():
        eager, _ = _train(cfg)
        compiled, count = _train(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"compile": True})}))
        out[name] = (eager, compiled, count)
    return out


@pytest.mark.multiproc
def test_compiled_blocks_train_like_eager_with_tp_pp_and_activation_checkpointing():
    cfgs = {name: run_config(**kw) for name, kw in LAYOUTS.items()}
    per_rank = run_distributed(_eager_and_compiled, world_size=2, args=(cfgs,))
    for rank, results in enumerate(per_rank):
        for name, (eager, compiled, count) in results.items():
            assert count > 0, f"{name} rank {rank}: no block was compiled"
            assert eager[-1] != eager[0], f"{name}: the losses must move for their match to mean something"
            assert compiled == pytest.approx(eager, rel=1e-5), f"{name} rank {rank}: compiled {compiled}, eager {eager}"
