"""Tokens/s of fm-train against ``transformers.Trainer`` + DeepSpeed in the local recipe's layout: 2 ranks, ZeRO-2/3, fp32.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_engine_dist.py [--zero 2 3] [--rounds 2] [--steps 25] [--warmup 5]
        [--malloc-variants] [--json PATH]

Both contenders run as 2 gloo processes started by ``torchrun --nproc_per_node 2`` with
``OMP_NUM_THREADS=1`` (one thread per rank, as ``cluster_configs/local.yaml``'s workers), train the
Llama shape of ``bench/bench_engine.py`` (4 layers, hidden 256, vocab 4096) on its fixed batch: a
global batch of 8 x 128 tokens, 4 sequences per rank, fp32, AdamW, clip 1.0, cosine schedule.

* ``fm-train``: what ``fm-train worker`` runs per step, minus the data reader: ``ParallelGroups``,
  ``build_train_module``, ``build_engine`` (fm-train's DeepSpeed config), ``fm_train.engine.train``
  with the metrics sink on rank 0 (a record every 10 steps), the per-step stop-flag poll over the
  control group, and the worker's allocator policy (``fm_train.dist.host_memory``: glibc's own
  thresholds, ``malloc_trim`` after a step only when RSS outgrew the working set).
* with ``--malloc-variants``, the same under the other policies, to measure what each costs:
  ``fm-train/small-mmap`` (the 128 KiB threshold the worker used before) and ``fm-train/glibc``
  (glibc untouched).
* ``trainer``: ``transformers.Trainer`` with ``TrainingArguments(deepspeed=<dict>)``, the ZeRO config
  of the Hugging Face DeepSpeed guide (``auto`` values, ``overlap_comm``, its bucket sizes), the
  Trainer's own ``adamw_torch`` and cosine schedule (so the optimizer is ``torch.optim.AdamW`` on
  both sides), default collator, no logging, saving or evaluation. Without a GPU, accelerate's state
  must be configured first (``PartialState(backend="gloo")``, ``use_configured_state``): on its own
  the Trainer's DeepSpeed path finds no backend and sizes the batch for one process.

The machine is shared, so the launches alternate (the order rotates every round) for ``--rounds``
rounds per ZeRO stage. Each launch trains ``--steps`` steps; its first ``--warmup`` step times (rank
0, from one step's end to the next) are dropped. A contender's figure is the median over all its
measured steps of all rounds; tokens/s = 8 x 128 / median step time. Goal: fm-train / trainer >= 1.0.
Start-up (imports, ``deepspeed.initialize``) is not timed. Rank 0's CPU time per step
(``time.process_time``, all its threads) is reported too: other work on the machine stretches wall
time, much less the CPU time a step needs, so the CPU ratio is the steadier one on a busy machine.
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
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import LR, SEQ, SHAPE, WARMUP, fixed_batch, hf_model  # noqa: E402 - after the path setup

WORLD = 2
MICRO = 4  # per rank: 2 x 4 = bench_engine.py's global batch of 8 sequences
LOG_EVERY = 10
CONTENDERS = ("fm-train", "trainer")
MALLOC_VARIANTS = {"fm-train/small-mmap": "small", "fm-train/glibc": "glibc"}
ROLES = (*CONTENDERS, *MALLOC_VARIANTS)
Stamp = tuple[float, float]  # (wall clock, this process's CPU time) at a step's end


def rank_rows(rank: int):
    """This rank's 4 rows of the shared fixed batch (inputs, labels)."""
    ids, labels = fixed_batch()
    rows = slice(rank * MICRO, (rank + 1) * MICRO)
    return ids[rows].contiguous(), labels[rows].contiguous()


def fm_train_rank(zero: int, steps: int, out: Path, *, malloc: str | None = None) -> None:
    """One torchrun rank of fm-train's worker loop on the fixed batch; rank 0 writes its step times.

    ``malloc``: the allocator policy (:mod:`fm_train.dist.host_memory`; None: the worker's default).
    """
    from fm_train.config import build_config
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.process_group import shutdown_distributed
    from fm_train.engine.loop import throughput_spec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.dist.host_memory import HostMemory

    import torch

    env = RankEnv.from_environ()
    host_memory = HostMemory.configure(malloc, gpu=False)
    ensure_extension_cache()
    init_distributed(env)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = build_config({
            "run": {"dir": run_dir, "seed": 1}, "model": SHAPE, "precision": "fp32",
            "parallel": {"zero_stage": zero}, "cluster": {"workers": WORLD}, "data": {"seq_len": SEQ},
            "train": {"steps": steps, "micro_batch": MICRO, "grad_accum": 1, "eval_every": 0, "log_every": LOG_EVERY},
            "optim": {"lr": LR, "min_lr": LR / 10, "warmup_steps": WARMUP, "weight_decay": 0.1, "grad_clip": 1.0},
        })
        groups = ParallelGroups(Topology(world=WORLD, tp=1, pp=1))
        family = family_of(cfg.model)
        engine, scheduler = build_engine(cfg, build_train_module(cfg, family, groups), family=family,  # mpu None: pure dp
                                         blocks=family.modules().block_types)
        ids, labels = rank_rows(env.rank)
        batches = iter(lambda: {"input_ids": ids, "labels": labels, "state": {}, "receipt": ""}, None)
        state = TrainState(lr_scheduler=scheduler)
        sink = MetricsSink(run_dir, enabled=env.rank == 0, stream=open(os.devnull, "w"))
        stamps: list[Stamp] = []
        train(engine, batches, state, cfg, sink=sink, group=groups.get_data_parallel_group(), stop=lambda: False,
              control_group=groups.control, hooks=[lambda _e, _s: stamps.append(_stamp())],
              spec=throughput_spec(cfg, family, engine.device), after_step=host_memory.trim)
        sink.close()
        with torch.no_grad():
            loss = float(engine(ids, labels).item())  # a sanity check: trained, well below log(vocab) = 8.3
    if env.rank == 0:
        _write(out, stamps, loss)
    shutdown_distributed()


def trainer_ds_config(zero: int) -> dict[str, Any]:
    """The ZeRO config of the Hugging Face DeepSpeed guide, ``auto`` values filled in by the Trainer."""
    zero_section: dict[str, Any] = {"stage": zero, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": "auto"}
    if zero == 2:
        zero_section.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        zero_section.update(sub_group_size=1e9, stage3_prefetch_bucket_size="auto",
                            stage3_param_persistence_threshold="auto", stage3_max_live_parameters=1e9,
                            stage3_max_reuse_distance=1e9, stage3_gather_16bit_weights_on_model_save=True)
    return {"zero_optimization": zero_section, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def trainer_rank(zero: int, steps: int, out: Path) -> None:
    """One torchrun rank of ``transformers.Trainer`` with DeepSpeed; rank 0 writes its step times."""
    import torch
    from accelerate import PartialState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fm_train.dist.env import ensure_extension_cache

    ensure_extension_cache()  # the same DeepSpeed op cache, so its shm comm op is not rebuilt
    rank = int(os.environ["RANK"])
    ids, _ = fixed_batch()
    stamps: list[Stamp] = []

    class Rows(torch.utils.data.Dataset):
        """The fixed batch's rows, repeated; the Trainer's sampler gives each rank 4 per step."""

        def __len__(self) -> int:
            return WORLD * MICRO * steps

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            row = ids[i % (WORLD * MICRO)]
            return {"input_ids": row, "labels": row}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's signature
            stamps.append(_stamp())

    # On a machine without a GPU, TrainingArguments(deepspeed=...) builds accelerate's state with no
    # backend (its ddp_backend is not passed on the DeepSpeed path), and accelerate then counts one
    # process: train_batch_size "auto" = 4 against DeepSpeed's world of 2, an assertion. A CPU user
    # configures the state first, with gloo, as `accelerate launch` would, and lets the Trainer use it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=MICRO, learning_rate=LR,
            adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine",
            warmup_steps=WARMUP, optim="adamw_torch", report_to=[], save_strategy="no", logging_strategy="no",
            eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=1,
            accelerator_config={"use_configured_state": True}, deepspeed=trainer_ds_config(zero))
        trainer = Trainer(model=hf_model(), args=args, train_dataset=Rows(), callbacks=[Stamp()])
        trainer.train()
        engine = trainer.model_wrapped  # the DeepSpeed engine
        with torch.no_grad():
            mine = ids[rank * MICRO:(rank + 1) * MICRO]
            loss = float(engine(input_ids=mine, labels=mine).loss.item())
    if rank == 0:
        _write(out, stamps, loss)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


def _write(out: Path, stamps: list[Stamp], loss: float) -> None:
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    out.write_text(json.dumps({"step_times": wall, "cpu_times": cpu, "final_loss": loss}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(role: str, zero: int, steps: int, work: Path, log: Path) -> dict[str, Any]:
    """One ``torchrun --nproc_per_node 2`` run of ``role``; returns rank 0's step times and final loss."""
    out = work / f"{role.replace('/', '-')}-z{zero}-{time.monotonic_ns()}.json"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
           "--role", role, "--zero", str(zero), "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with log.open("a") as sink:
        sink.write(f"\n=== {' '.join(cmd)}\n")
        sink.flush()
        code = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0 or not out.exists():
        raise SystemExit(f"{role} ZeRO-{zero} failed (exit {code}); see {log}")
    return json.loads(out.read_text())


def compare(zero: int, roles: tuple[str, ...], rounds: int, steps: int, warmup: int, work: Path,
            log: Path) -> dict[str, Any]:
    """Alternate ``roles`` for ``rounds`` rounds (rotating the order); pooled medians, per-round medians, ratios."""
    wall: dict[str, list[float]] = {name: [] for name in roles}
    cpu: dict[str, list[float]] = {name: [] for name in roles}
    per_round: dict[str, list[float]] = {name: [] for name in roles}
    losses: dict[str, list[float]] = {name: [] for name in roles}
    for r in range(rounds):
        for role in roles[r % len(roles):] + roles[:r % len(roles)]:
            result = launch(role, zero, steps, work, log)
            times = result["step_times"][warmup:]
            wall[role] += times
            cpu[role] += result["cpu_times"][warmup:]
            per_round[role].append(round(statistics.median(times), 4))
            losses[role].append(round(result["final_loss"], 3))
            print(f"  ZeRO-{zero} round {r} {role}: median step {statistics.median(times):.4f} s"
                  f" (rank 0 CPU {statistics.median(result['cpu_times'][warmup:]):.4f} s) over {len(times)} steps,"
                  f" final loss {result['final_loss']:.3f}", flush=True)
    tokens = WORLD * MICRO * SEQ
    med = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    out: dict[str, Any] = {"zero": zero, "tokens_per_step": tokens}
    for name in roles:
        out[name] = {"median_step_s": round(med[name], 4), "tokens_per_s": round(tokens / med[name], 1),
                     "rank0_cpu_s_per_step": round(med_cpu[name], 4), "steps_measured": len(wall[name]),
                     "per_round_median_s": per_round[name], "final_loss": losses[name]}
        if name != "trainer":
            out[name]["ratio_over_trainer"] = round(med["trainer"] / med[name], 3)
            out[name]["cpu_ratio_over_trainer"] = round(med_cpu["trainer"] / med_cpu[name], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds per ZeRO stage (order alternates)")
    parser.add_argument("--steps", type=int, default=25, help="steps per launch")
    parser.add_argument("--warmup", type=int, default=5, help="first step times of each launch left out")
    parser.add_argument("--malloc-variants", action="store_true",
                        help="also run fm-train under the other allocator policies (128 KiB mmap threshold; glibc's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)  # set for the torchrun ranks
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is not None:
        if args.role == "trainer":
            trainer_rank(args.zero[0], args.steps, args.out)
        else:
            fm_train_rank(args.zero[0], args.steps, args.out, malloc=MALLOC_VARIANTS.get(args.role))
        return 0
    from fm_train.dist.env import ensure_extension_cache

    ensure_extension_cache()  # exported to both contenders' ranks
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log = work / "ranks.log"
        try:
            for zero in args.zero:
                roles = ROLES if args.malloc_variants else CONTENDERS
                results.append(compare(zero, roles, args.rounds, args.steps, args.warmup, work, log))
        except SystemExit:
            print(log.read_text()[-6000:], file=sys.stderr)
            raise
    import torch
    import transformers
    import deepspeed

    for res in results:
        print(json.dumps(res))
        for name in (n for n in ROLES if n in res and n != "trainer"):
            print(f"ZeRO-{res['zero']}: {name} {res[name]['tokens_per_s']} tok/s, trainer {res['trainer']['tokens_per_s']}"
                  f" tok/s, {name} / trainer = {res[name]['ratio_over_trainer']:.3f} (goal >= 1.0; by rank 0's CPU"
                  f" time per step {res[name]['cpu_ratio_over_trainer']:.3f})")
    versions = f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}"
    print(f"{WORLD} ranks x 1 thread, micro_batch {MICRO} per rank, seq {SEQ}, fp32, {args.steps} steps per launch"
          f" ({args.warmup} warm-up), {args.rounds} rounds; {versions}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "versions": versions, "args": vars(args) | {"json": str(args.json)}},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
