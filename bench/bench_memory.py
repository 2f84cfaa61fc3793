"""Peak resident memory of each ZeRO-3 training rank on CPU, against the planner's estimate.

    .venv/bin/python bench/bench_memory.py --preset 1.1b      # TinyLlama shape, 2 ranks, ZeRO-3, fp32
    .venv/bin/python bench/bench_memory.py --preset 125m

Each rank is a real process (gloo, 1 thread) that does what the worker does minus the data reader:
``build_train_module`` (ZeRO-3: built partitioned under ``deepspeed.zero.Init``), ``build_engine``
with the config the worker renders, then ``--steps`` optimizer steps on a random micro-batch
(activation checkpointing on), after the worker's allocator setting
(``fm_train.dist.host_memory``, its trim after every step; ``--malloc small|glibc`` picks another). A sampler thread reads the process's RSS every 20 ms; each phase's
peak is reported, and the overall peak is checked against ``ru_maxrss``. The planner's figure is
``fm_train.plan.memory.estimate_memory(cfg, family, device="cpu").device_total`` for the same config.
Goal: the planner within 25 % of the measured peak of the busiest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3


class RssSampler:
    """Peak RSS of this process per named phase, sampled on a daemon thread."""

    def __init__(self, period_s: float = 0.02) -> None:
        import psutil

        self._proc, self._period = psutil.Process(), period_s
        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        last_note = time.monotonic()
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            if time.monotonic() - last_note > 5:  # a run killed for memory still shows where it was
                print(f"[pid {os.getpid()}] {self.phase}: rss {rss / GIB:.2f} GiB, peak"
                      f" {self.peaks[self.phase] / GIB:.2f}", file=sys.stderr, flush=True)
                last_note = time.monotonic()
            time.sleep(self._period)

    def enter(self, phase: str) -> None:
        """Start attributing samples to ``phase`` (after one last sample for the previous one)."""
        rss = self._proc.memory_info().rss
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        self.phase = phase

    def stop(self) -> dict[str, float]:
        self.enter("end")
        self._stop.set()
        return {k: v / GIB for k, v in self.peaks.items()}


def available_gib() -> float:
    """MemAvailable of the machine (/proc/meminfo), in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def make_config(preset: str, seq: int, workers: int, steps: int, zero: int, layers: int | None = None):
    from fm_train.config import build_config

    model: dict[str, Any] = {"preset": preset, **({"n_layers": layers} if layers else {})}
    return build_config({
        "run": {"dir": "runs/bench_memory", "seed": 1}, "model": model, "precision": "fp32",
        "parallel": {"zero_stage": zero, "activation_checkpointing": True}, "cluster": {"workers": workers},
        "data": {"seq_len": seq}, "train": {"steps": steps, "micro_batch": 1, "eval_every": 0},
        "optim": {"warmup_steps": 0},
    })


def rank_environment(rank: int, world: int, port: int) -> None:
    """The torchrun-style environment of one local rank (1 thread), as the launcher sets it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def rank_main(rank: int, world: int, port: int, opts: dict[str, Any], queue: Any) -> None:
    rank_environment(rank, world, port)
    try:
        sampler = RssSampler()
        import torch

        from fm_train.dist.env import RankEnv, ensure_extension_cache
        from fm_train.engine import build_engine
        from fm_train.deepspeed_adapter.comm import init_distributed
        from fm_train.dist.process_group import shutdown_distributed
        from fm_train.engine.train_module import build_train_module
        from fm_train.families import family_of
        from fm_train.dist.host_memory import HostMemory

        torch.set_num_threads(1)
        host_memory = HostMemory.configure(opts["malloc"], gpu=False)  # as the worker does
        ensure_extension_cache()
        init_distributed(RankEnv.from_environ())
        cfg = make_config(opts["preset"], opts["seq"], world, opts["steps"], opts["zero"], opts["layers"])
        family = family_of(cfg.model)
        times = {}
        sampler.enter("build")
        t0 = time.perf_counter()
        module = build_train_module(cfg, family)
        times["build_s"] = time.perf_counter() - t0
        sampler.enter("engine")
        t0 = time.perf_counter()
        engine, _ = build_engine(cfg, module, blocks=family.modules().block_types, family=family)  # as the worker
        times["engine_s"] = time.perf_counter() - t0
        tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(rank))
        losses = []
        for step in range(opts["steps"]):
            t0 = time.perf_counter()
            sampler.enter(f"step{step + 1}.forward")
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            sampler.enter(f"step{step + 1}.backward")
            engine.backward(loss)
            sampler.enter(f"step{step + 1}.optimizer")
            engine.step()
            host_memory.trim()  # as the training loop does after each step
            losses.append(loss.item())
            times[f"step{step + 1}_s"] = time.perf_counter() - t0
        peaks = sampler.stop()
        shutdown_distributed()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
        queue.put((rank, {"peaks_gib": peaks, "ru_maxrss_gib": maxrss, "losses": losses, **times}))
    except BaseException:  # noqa: BLE001 - the parent reports every rank's failure
        queue.put((rank, {"error": traceback.format_exc()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1.1b")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--layers", type=int, default=None, help="override the preset's n_layers")
    parser.add_argument("--malloc", choices=["reuse", "small", "glibc"], default=None,
                        help="the allocator policy (fm_train.dist.host_memory; default: the worker's)")
    parser.add_argument("--min-free-gib", type=float, default=0.5,
                        help="stop the ranks when the machine's available memory falls below this (default 0.5)")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from fm_train.engine.build import memory_budget_gib, planned_peak_gib
    from fm_train.families import family_of
    from fm_train.dist.host_memory import policy_for, requested_policy
    from fm_train.plan.memory import estimate_memory, format_memory, zero3_gathered

    cfg = make_config(args.preset, args.seq, args.workers, args.steps, args.zero, args.layers)
    family = family_of(cfg.model)
    os.environ["LOCAL_WORLD_SIZE"] = str(args.workers)  # the ranks' budget: ZeRO-3's gathered blocks as the engine's
    gathered = zero3_gathered(cfg, family, device="cpu", budget_gib=memory_budget_gib(cfg))
    est = estimate_memory(cfg, family, device="cpu", zero3=gathered)
    if args.malloc is None:  # as the worker chooses
        args.malloc = requested_policy() or policy_for(planned_peak_gib(cfg, family), memory_budget_gib(cfg))
    print(f"allocator policy: {args.malloc}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    start = time.perf_counter()
    procs = mp.start_processes(rank_main, args=(args.workers, port, vars(args), queue), nprocs=args.workers,
                               join=False, start_method="spawn")
    while not procs.join(timeout=1):
        if available_gib() < args.min_free_gib:  # other users of the machine need it more than this bench
            for p in procs.processes:
                p.kill()
            print(f"stopped: {available_gib():.2f} GiB available, below --min-free-gib {args.min_free_gib}",
                  file=sys.stderr)
            return 3
    results = dict(queue.get() for _ in range(args.workers))
    failed = {r: res["error"] for r, res in results.items() if "error" in res}
    if failed:
        for r, err in failed.items():
            print(f"rank {r} failed:\n{err}", file=sys.stderr)
        return 1
    for r in sorted(results):
        print(json.dumps({"rank": r, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[r].items()
                                        if k != "peaks_gib"},
                          "peaks_gib": {k: round(v, 3) for k, v in results[r]["peaks_gib"].items()}}))
    measured = max(max(res["peaks_gib"].values()) for res in results.values())
    predicted = est.device_total / GIB
    print(format_memory(est, "cpu"))
    print(f"{args.preset}{f' with {args.layers} layers' if args.layers else ''}: {family.sizes.parameter_count(cfg.model):,} params, ZeRO-{args.zero}, dp {cfg.dp}, seq {args.seq},"
          f" micro 1, fp32, activation checkpointing; wall {time.perf_counter() - start:.0f} s")
    print(f"measured peak RSS (busiest rank) {measured:.2f} GiB; planner {predicted:.2f} GiB;"
          f" planner / measured = {predicted / measured:.3f} (goal 0.75-1.25); ZeRO-3 keeps up to"
          f" {gathered.max_live:,} parameters gathered")
    if args.steps >= 20:  # flat over the run: each step's peak, the first tenth after warm-up against the last
        for r in sorted(results):
            per_step = [max(v for k, v in results[r]["peaks_gib"].items() if k.startswith(f"step{n}."))
                        for n in range(1, args.steps + 1)]
            tenth = max(2, args.steps // 10)
            early, late = max(per_step[5:5 + tenth]), max(per_step[-tenth:])
            print(f"rank {r}: peak RSS per step {early:.3f} GiB (steps 6-{5 + tenth}) -> {late:.3f} GiB (last"
                  f" {tenth}): {100 * (late / early - 1):+.1f} % (goal flat, < 5 %); highest {max(per_step):.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
