"""Per-rank memory of a long sequence on CPU, sp1 against sp2 (Ulysses) and tp2 without against with
tensor-parallel sequence parallelism, next to the planner's estimate; and the all-to-all's share of the
sp2 step.

    .venv/bin/python bench/bench_long_context.py --seq 16384            # tiny preset, fp32, micro 1
    .venv/bin/python bench/bench_long_context.py --seq 16384 --documents
    .venv/bin/python bench/bench_long_context.py --seq 16384 --layouts tp2 tp2-seq

Each layout runs in its own real processes (gloo, 1 thread each) that build what the worker builds
(``build_train_module``, ``build_engine`` with ZeRO-2) and train ``--steps`` steps on one sample of
``--seq`` tokens, after the worker's allocator setting. A sampler thread reads each rank's RSS every
20 ms. The activation memory of a rank is its peak during the last step minus its RSS just before it
(the model and optimizer states are then resident), which the planner's activation terms
(``activations + logits`` of :func:`fm_train.plan.memory.estimate_memory`) predict. The all-to-all time
is what ``deepspeed.comm.all_to_all_single`` took inside the sp2 step (forward and backward), timed
around each call.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_memory import GIB, RssSampler, rank_environment  # noqa: E402  (bench/ is this script's directory)


#: Layout name -> (tp, sp, tensor-parallel sequence parallelism).
LAYOUTS = {"sp1": (1, 1, False), "sp2": (1, 2, False), "tp2": (2, 1, False), "tp2-seq": (2, 1, True)}


def make_config(seq: int, layout: str, steps: int, documents: bool, preset: str):
    from fm_train.config import build_config

    tp, sp, tpsp = LAYOUTS[layout]
    return build_config({
        "run": {"dir": "runs/bench_long_context", "seed": 1}, "model": {"preset": preset, "max_seq_len": seq},
        "precision": "fp32", "parallel": {"zero_stage": 2, "sp": sp, "tp": tp, "tp_sequence_parallel": tpsp},
        "cluster": {"workers": tp * sp},
        "data": {"seq_len": seq, "document_masking": documents},
        "train": {"steps": steps, "micro_batch": 1, "eval_every": 0}, "optim": {"warmup_steps": 0},
    })


def rank_main(rank: int, world: int, port: int, opts: dict[str, Any], queue: Any) -> None:
    rank_environment(rank, world, port)
    try:
        sampler = RssSampler()
        import torch

        import deepspeed.comm as ds_comm
        from fm_train.deepspeed_adapter.comm import init_distributed
        from fm_train.dist.env import RankEnv, ensure_extension_cache
        from fm_train.dist.groups import ParallelGroups
        from fm_train.dist.process_group import shutdown_distributed
        from fm_train.dist.topology import Topology
        from fm_train.engine import build_engine
        from fm_train.engine.train_module import build_train_module
        from fm_train.families import family_of
        from fm_train.dist.host_memory import HostMemory

        torch.set_num_threads(1)
        HostMemory.configure("small", gpu=False)  # freed activations leave RSS at once: a step's peak is its own
        ensure_extension_cache()
        init_distributed(RankEnv.from_environ())
        cfg = make_config(opts["seq"], opts["layout"], opts["steps"], opts["documents"], opts["preset"])
        family = family_of(cfg.model)
        groups = ParallelGroups(Topology(world=world, tp=cfg.parallel.tp, sp=cfg.parallel.sp))
        engine, _ = build_engine(cfg, build_train_module(cfg, family, groups), blocks=family.modules().block_types,
                                 mpu=groups if cfg.parallel.tp > 1 else None)
        exchange = {"s": 0.0, "calls": 0}
        real = ds_comm.all_to_all_single

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                exchange["s"] += time.perf_counter() - t0
                exchange["calls"] += 1

        ds_comm.all_to_all_single = timed
        gen = torch.Generator().manual_seed(7)  # the same sample on every rank of the group
        tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=gen)
        ends = torch.rand(1, cfg.data.seq_len, generator=gen) < 1 / 2000  # documents of ~2,000 tokens
        documents = (ends.cumsum(-1) - ends.int()).to(torch.int32)
        steps = []
        for step in range(opts["steps"]):
            # A new batch each step, as the loader gives: the previous one (and its mask) is freed.
            extra = {"document_ids": documents.clone()} if opts["documents"] else {}
            sampler.enter(f"before{step}")
            before = sampler._proc.memory_info().rss
            exchange.update(s=0.0, calls=0)
            sampler.enter(f"step{step}")
            t0 = time.perf_counter()
            loss = engine(tokens[:, :-1], tokens[:, 1:], **extra)
            engine.backward(loss)
            engine.step()
            wall = time.perf_counter() - t0
            peaks = dict(sampler.peaks)
            steps.append({"before_gib": before / GIB, "peak_gib": peaks.get(f"step{step}", 0) / GIB, "step_s": wall,
                          "all_to_all_s": exchange["s"], "all_to_all_calls": exchange["calls"], "loss": loss.item()})
        sampler.stop()
        shutdown_distributed()
        queue.put((rank, {"steps": steps}))
    except BaseException:  # noqa: BLE001 - the parent reports every rank's failure
        queue.put((rank, {"error": traceback.format_exc()}))


def run_layout(layout: str, opts: dict[str, Any]) -> dict[int, Any]:
    import torch.multiprocessing as mp

    tp, sp, _ = LAYOUTS[layout]
    world = tp * sp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(rank_main, args=(world, port, {**opts, "layout": layout}, queue), nprocs=world,
                               join=False, start_method="spawn")
    while not procs.join(timeout=1):
        pass
    results = dict(queue.get() for _ in range(world))
    for r, res in results.items():
        if "error" in res:
            raise SystemExit(f"{layout} rank {r} failed:\n{res['error']}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2, help="the last step is the one measured (default 2)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--documents", action="store_true", help="document masking on (documents of ~2,000 tokens)")
    parser.add_argument("--layouts", nargs=2, default=["sp1", "sp2"], choices=sorted(LAYOUTS),
                        help="the baseline and the layout compared with it (default: sp1 sp2)")
    args = parser.parse_args()

    from fm_train.families import family_of
    from fm_train.plan.memory import estimate_memory

    opts = vars(args)
    rows = {}
    for layout in args.layouts:
        cfg = make_config(args.seq, layout, args.steps, args.documents, args.preset)
        est = estimate_memory(cfg, family_of(cfg.model), device="cpu")
        results = run_layout(layout, opts)
        last = [results[r]["steps"][-1] for r in sorted(results)]
        measured = max(s["peak_gib"] - s["before_gib"] for s in last)
        predicted = (est.activations + est.logits) / GIB
        rows[layout] = {"activation_gib": measured, "planner_gib": predicted, "planner_over_measured": predicted / measured,
                    "step_s": max(s["step_s"] for s in last), "all_to_all_s": max(s["all_to_all_s"] for s in last),
                    "all_to_all_calls": last[0]["all_to_all_calls"],
                    "loss": sum(s["loss"] for s in last) / len(last)}  # each rank's mean over its chunk
        print(json.dumps({"layout": layout, **{k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in rows[layout].items()}}), flush=True)
    base, other = (rows[name] for name in args.layouts)
    ratio = other["activation_gib"] / base["activation_gib"]
    share = other["all_to_all_s"] / other["step_s"]
    print(f"{args.preset}, seq {args.seq}, micro 1, fp32, ZeRO-2{', document masking' if args.documents else ''}:"
          f" activation memory per rank {args.layouts[1]} / {args.layouts[0]} = {ratio:.3f}; planner / measured"
          f" {base['planner_over_measured']:.3f} and {other['planner_over_measured']:.3f} (goal 0.75-1.25);"
          f" all-to-all {share:.1%} of the {args.layouts[1]} step ({other['all_to_all_s']:.2f} of"
          f" {other['step_s']:.2f} s); loss {base['loss']:.6f} and {other['loss']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
