"""Tensor parallelism's overlapped region entry (``parallel.tp_overlap``) against the synchronous path: step time
and the communication the step waits for, tp2 on gloo.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_tp_overlap.py [--rounds 4] [--steps 8] [--warmup 2]
        [--sequence-parallel] [--json PATH]

One ``torchrun --nproc_per_node 2`` launch (tp 2, dp 1, ZeRO-1, fp32, one thread per rank) builds two engines of
the same model from the same seed, one per setting, and alternates them in rounds (the order rotating), so both
see the same machine. Model: a Llama block shape with hidden 512, 8 heads, ffn 1408, 4 layers, vocab 8192, seq 512,
micro-batch 4. Per step, rank 0 records the wall time of the step and of its backward, and the time its main
thread spent blocked in tp collectives during backward (a synchronous all-reduce / reduce-scatter / all-gather, or the
wait on an asynchronous one): the exposed communication that the overlap exists to shrink. Figures are medians
over the measured steps of all rounds (the first ``--warmup`` of each round left out). On a GPU the collective
runs on its own stream while the weight-gradient GEMMs run; here gloo's thread and the rank's compute thread
share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = {"n_layers": 4, "hidden": 512, "n_heads": 8, "n_kv_heads": 8, "ffn_hidden": 1408, "vocab_size": 8192,
         "vocab_multiple": 1, "max_seq_len": 512, "tie_embeddings": False}
SEQ, MICRO = 512, 4
SETTINGS = ("sync", "overlap")


class Blocked:
    """Time rank 0's main thread spends in tp collectives while ``on``: synchronous calls and waits on async ones."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.on, self.seconds = False, 0.0
        for name in ("all_reduce", "reduce_scatter_single", "all_gather_single"):
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, collective):
        def call(*args: Any, async_op: bool = False, **kwargs: Any):
            start = time.perf_counter()
            work = collective(*args, async_op=async_op, **kwargs)
            if not self.on:
                return work
            if not async_op:
                self.seconds += time.perf_counter() - start
                return work
            outer, wait = self, work.wait

            class Work:
                def wait(self) -> Any:
                    begin = time.perf_counter()
                    result = wait()
                    outer.seconds += time.perf_counter() - begin
                    return result
            return Work()
        return call


def rank_main(rounds: int, steps: int, warmup: int, sequence_parallel: bool, out: Path) -> None:
    import torch

    from fm_train.config import build_config
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.process_group import shutdown_distributed
    from fm_train.dist.topology import Topology
    from fm_train.engine import build_engine
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    env = RankEnv.from_environ()
    ensure_extension_cache()
    init_distributed(env)
    blocked = Blocked()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SHAPE["vocab_size"], (MICRO, SEQ + 1), generator=gen)
    engines = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for setting in SETTINGS:
            cfg = build_config({
                "run": {"dir": run_dir, "seed": 1}, "model": SHAPE, "precision": "fp32",
                "parallel": {"tp": 2, "zero_stage": 1, "tp_overlap": setting == "overlap",
                             "tp_sequence_parallel": sequence_parallel},
                "cluster": {"workers": 2}, "data": {"seq_len": SEQ},
                "train": {"steps": 1000, "micro_batch": MICRO, "grad_accum": 1, "eval_every": 0},
                "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0, "grad_clip": 1.0},
            })
            groups = ParallelGroups(Topology(world=2, tp=2, pp=1))
            family = family_of(cfg.model)
            engines[setting], _ = build_engine(cfg, build_train_module(cfg, family, groups), mpu=groups,
                                               blocks=family.modules().block_types, family=family)
    times: dict[str, dict[str, list[float]]] = {s: {"step": [], "backward": [], "blocked": []} for s in SETTINGS}
    losses: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for r in range(rounds):
        for setting in SETTINGS[r % 2:] + SETTINGS[:r % 2]:
            engine = engines[setting]
            for i in range(steps):
                start = time.perf_counter()
                loss = engine(ids[:, :-1], ids[:, 1:])
                blocked.seconds, blocked.on = 0.0, True
                begin = time.perf_counter()
                engine.backward(loss)
                backward = time.perf_counter() - begin
                blocked.on = False
                engine.step()
                if i >= warmup:
                    times[setting]["step"].append(time.perf_counter() - start)
                    times[setting]["backward"].append(backward)
                    times[setting]["blocked"].append(blocked.seconds)
                losses[setting].append(loss.item())
    if env.rank == 0:
        out.write_text(json.dumps({"times": times, "losses": losses}))
    shutdown_distributed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each runs both settings, order alternating")
    parser.add_argument("--steps", type=int, default=8, help="steps per setting per round")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each round left out")
    parser.add_argument("--sequence-parallel", action="store_true", help="tp_sequence_parallel: reduce-scatter entries")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # set for the torchrun ranks
    args = parser.parse_args()
    if args.out is not None:
        rank_main(args.rounds, args.steps, args.warmup, args.sequence_parallel, args.out)
        return 0
    from fm_train.dist.env import ensure_extension_cache

    ensure_extension_cache()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), __file__, "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--out", str(out)] + (["--sequence-parallel"] if args.sequence_parallel
                                                                     else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        code = subprocess.run(cmd, env=env).returncode
        if code != 0 or not out.exists():
            raise SystemExit(f"the tp2 ranks failed (exit {code})")
        raw = json.loads(out.read_text())
    med = {s: {k: statistics.median(v) for k, v in raw["times"][s].items()} for s in SETTINGS}
    result = {
        "sequence_parallel": args.sequence_parallel, "steps_measured": len(raw["times"]["sync"]["step"]),
        **{s: {k: round(v, 4) for k, v in med[s].items()} for s in SETTINGS},
        "step_ratio_sync_over_overlap": round(med["sync"]["step"] / med["overlap"]["step"], 3),
        "backward_ratio_sync_over_overlap": round(med["sync"]["backward"] / med["overlap"]["backward"], 3),
        "losses_equal": raw["losses"]["sync"] == raw["losses"]["overlap"],
    }
    print(json.dumps(result))
    print(f"tp2{' + sequence parallel' if args.sequence_parallel else ''}: step {med['sync']['step']:.3f} s sync,"
          f" {med['overlap']['step']:.3f} s overlapped ({result['step_ratio_sync_over_overlap']}x); backward"
          f" {result['backward_ratio_sync_over_overlap']}x; blocked in tp collectives during backward"
          f" {med['sync']['blocked'] * 1e3:.1f} ms sync vs {med['overlap']['blocked'] * 1e3:.1f} ms overlapped")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
