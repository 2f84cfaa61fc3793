"""Expert parallelism's all-to-all: its share of an ep2 step, and the ep2 step against dp2 without it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_moe_ep.py [--steps 12] [--warmup 3] [--rounds 2]

Two gloo ranks on this machine train the same Mixture-of-Experts model (``bench_engine.py``'s
``qwen3_moe`` shape: 4 routed blocks of 8 experts, top-2, hidden 256) on the same global batch, ZeRO-2,
fp32, 1 thread each, alternately in two layouts:

* ``ep2``: each rank holds 4 of the 8 experts and exchanges token rows all-to-all;
* ``dp2``: each rank holds all 8 experts (plain data parallelism), the baseline.

The all-to-all time of a step is measured on rank 0 around every exchange of
``fm_train.parallel.expert_parallel`` (the counts, the rows out and back) in forward, and in backward
between two autograd markers on either side of each row exchange (autograd runs them in order on a
CPU, so the interval is the exchange's backward). Figures are medians over the steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_engine import SHAPES  # noqa: E402

MICRO, SEQ = 8, 128


class _Clock:
    """Seconds spent in the all-to-all since the last :meth:`take`."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.backward_from: list[float] = []

    def take(self) -> float:
        spent, self.spent = self.spent, 0.0
        return spent


def _instrument(clock: _Clock) -> None:
    """Time every all-to-all of the expert-parallel dispatch, forward and backward."""
    import torch

    from fm_train.parallel import expert_parallel as ep

    class _Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, edge: str) -> torch.Tensor:
            ctx.edge = edge
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            if ctx.edge == "after":  # the exchange's backward starts now
                clock.backward_from.append(time.perf_counter())
            elif clock.backward_from:
                clock.spent += time.perf_counter() - clock.backward_from.pop()
            return grad, None

    rows, counts = ep.dist_fn.all_to_all_single, ep._all_to_all_counts

    def timed_rows(output: torch.Tensor, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = rows(output, _Mark.apply(tokens, "before"), **kwargs)
        clock.spent += time.perf_counter() - start
        return _Mark.apply(out, "after")

    def timed_counts(*args: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = counts(*args)
        clock.spent += time.perf_counter() - start
        return out

    class _Rows:
        all_to_all_single = staticmethod(timed_rows)

    ep.dist_fn = _Rows  # type: ignore[assignment]
    ep._all_to_all_counts = timed_counts


def _rank(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import fm_train  # noqa: F401  (registers the families)
    from fm_train.config import build_config
    from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine import TrainState, build_engine
    from fm_train.engine.step import train_step
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    clock = _Clock()
    _instrument(clock)
    shape = SHAPES["qwen3_moe"]
    steps = args.warmup + args.steps
    result: dict[str, dict[str, list[float]]] = {"ep2": {"step": [], "a2a": []}, "dp2": {"step": [], "a2a": []}}
    for _ in range(args.rounds):
        for name, ep in (("ep2", 2), ("dp2", 1)):
            cfg = build_config({
                "run": {"dir": "unused", "seed": 1}, "model": shape, "precision": "fp32",
                "parallel": {"zero_stage": 2, "ep": ep}, "cluster": {"workers": 2}, "data": {"seq_len": SEQ},
                "train": {"steps": steps, "micro_batch": MICRO, "grad_accum": 1, "log_every": 1, "eval_every": 0},
                "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0}, "convert": {"at_end": False}})
            groups = ParallelGroups(Topology(world=2, ep=ep))
            family = family_of(cfg.model)
            engine, scheduler = build_engine(cfg, build_train_module(cfg, family, groups),
                                             blocks=family.modules().block_types)
            state, norms = TrainState(lr_scheduler=scheduler), GradNormTracker.of(engine)
            tokens = torch.randint(0, shape["vocab_size"], (MICRO, SEQ + 1),
                                   generator=torch.Generator().manual_seed(rank))
            batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
            batches = iter(lambda: batch, None)
            for i in range(steps):
                clock.take()
                dist.barrier()
                start = time.perf_counter()
                train_step(engine, batches, state, cfg.tokens_per_step, norms)
                took = time.perf_counter() - start
                if i >= args.warmup:
                    result[name]["step"].append(took)
                    result[name]["a2a"].append(clock.take())
            del engine
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per layout and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two layouts")
    args = parser.parse_args()
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(port, args, queue), nprocs=2, start_method="spawn")
    result = queue.get()
    step = {name: statistics.median(r["step"]) for name, r in result.items()}
    a2a = statistics.median(result["ep2"]["a2a"])
    tokens = 2 * MICRO * SEQ
    for name in result:
        print(json.dumps({"layout": name, "median_step_s": round(step[name], 4),
                          "tokens_per_s": round(tokens / step[name], 1), "steps_measured": len(result[name]["step"]),
                          "median_all_to_all_s": round(statistics.median(result[name]["a2a"]), 4)}))
    print(f"ep2 all-to-all share of the step = {a2a / step['ep2']:.3f} (rank 0, forward + backward)")
    print(f"ep2 / dp2 tokens/s = {step['dp2'] / step['ep2']:.3f}")
    print(f"shape {SHAPES['qwen3_moe']}, 2 gloo ranks x 1 thread, micro_batch {MICRO}, seq {SEQ}, ZeRO-2, fp32, "
          f"torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
