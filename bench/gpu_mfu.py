"""MFU of fm-train on NVIDIA GPUs, next to a bare PyTorch loop on the same GPU in the same run.

    .venv/bin/python bench/gpu_mfu.py --max-minutes 10 --json bench/gpu_mfu.json

Without a GPU it prints one line saying so and exits 0. With one it trains the 1.1B preset
(TinyLlama shape, seq 2048, bf16) and reports, per contender, tokens/s per GPU, achieved model
TFLOP/s and MFU against two peaks: the GPU's *measured* bf16 matmul rate (8192^3, CUDA events) and
its data-sheet figure (``fm_train/engine/flops.py``). FLOPs per token: ``fm_train.plan.flops``.

Runs, each in fresh processes (``gpu_mfu_runs.py``), while the time budget lasts:

1. probe: device name, peaks;
2. bare PyTorch loop on GPU 0; it also finds the micro-batch: the largest of ``--micro-batches``
   (1,2,4,8) before the first that runs out of memory;
3. fm-train on GPU 0 at that micro-batch (ZeRO ``--zero``, like ``h100_1b_1node.yaml``); if it runs
   out of memory, both contenders are measured again at the next smaller micro-batch;
4. with 2+ GPUs: fm-train data parallel over all of them, then tp2 and pp2 (4 micro-batches per step).

Goals: fm-train / bare >= 0.95 and MFU >= 45 % (of the data-sheet peak) on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_mfu_common import next_smaller  # noqa: E402  (bench/ is on the path: this script's folder)

GOAL_RATIO, GOAL_MFU = 0.95, 0.45


# --- pure rules (unit-tested on CPU: tests/test_device.py; the micro-batch search: gpu_mfu_common.py) ---

def throughput(*, tokens_per_step: int, steps: int, seconds: float, gpus: int, flops_per_token: float,
               measured_peak: float, table_peak: float | None) -> dict[str, float | None]:
    """tokens/s per GPU, achieved model TFLOP/s per GPU and MFU against both peaks."""
    per_gpu = tokens_per_step * steps / seconds / gpus
    achieved = per_gpu * flops_per_token
    return {"tokens_per_s_per_gpu": per_gpu, "tflops_per_gpu": achieved / 1e12,
            "mfu_measured": achieved / measured_peak if measured_peak else None,
            "mfu_table": achieved / table_peak if table_peak else None}


@dataclass(frozen=True)
class Run:
    """One measurement: which code, on how many GPUs, in which layout."""

    name: str
    kind: str  # "bare" | "fm_train"
    world: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 2
    grad_accum: int = 1


def multi_gpu_runs(gpus: int, zero: int) -> list[Run]:
    """The layouts measured on a node with ``gpus`` GPUs beyond the one-GPU pair."""
    if gpus < 2:
        return []
    return [Run(f"fm-train dp{gpus}", "fm_train", world=gpus, zero=zero),
            Run("fm-train tp2", "fm_train", world=2, tp=2, zero=min(zero, 2)),
            # ZeRO <= 1 with a pipeline (DeepSpeed); 4 micro-batches per step keep both stages busy.
            Run("fm-train pp2", "fm_train", world=2, pp=2, zero=1, grad_accum=4)]


class Budget:
    """Wall-clock budget of the whole bench."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.monotonic() + minutes * 60

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


# --- orchestration -----------------------------------------------------------------------------

def _job(args: argparse.Namespace, run: Run, micro_batch: int | None, search: Sequence[int] = ()) -> dict[str, Any]:
    return {"preset": args.preset, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
            "micro_batch": micro_batch, "search": list(search), "world": run.world, "tp": run.tp, "pp": run.pp,
            "zero": run.zero, "grad_accum": run.grad_accum, "compile": args.compile, "device": args.device}


def _measure(args: argparse.Namespace, budget: Budget, run: Run, micro_batch: int | None,
             search: Sequence[int] = ()) -> dict[str, Any]:
    import gpu_mfu_runs as runs

    if budget.left_s() < 45:
        return {"error": "skipped: time budget spent"}
    fn = runs.bare if run.kind == "bare" else runs.fm_train
    started = time.monotonic()
    results = runs.spawn(fn, _job(args, run, micro_batch, search), world=run.world, timeout_s=budget.left_s())
    errors = [r["error"] for r in results if "error" in r]
    result = {"error": errors[0]} if errors else results[0]
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def _report(name: str, result: dict[str, Any], run: Run, args: argparse.Namespace, peaks: dict[str, Any]) -> dict:
    from fm_train.config import build_config
    from fm_train.families import family_of

    if "error" in result:
        line = {"name": name, "error": result["error"][-600:], "wall_s": result.get("wall_s")}
        print(json.dumps(line), flush=True)
        return line
    model = build_config({"model": {"preset": args.preset}}).model
    family = family_of(model)
    shape = family.modules().args(model)
    dp = run.world // (run.tp * run.pp)
    tokens_per_step = result["micro_batch"] * run.grad_accum * dp * args.seq
    line = {"name": name, **result, **throughput(
        tokens_per_step=tokens_per_step, steps=result["steps"], seconds=result["seconds"], gpus=run.world,
        flops_per_token=family.sizes.flops_per_token(shape, args.seq), measured_peak=peaks["measured_peak"],
        table_peak=peaks["table_peak"])}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}), flush=True)
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-minutes", type=float, default=10.0, help="stop starting runs after this (default 10)")
    parser.add_argument("--preset", default="1.1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batches", default="1,2,4,8", help="candidates of the micro-batch search")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--compile", action="store_true", help="parallel.compile=true for fm-train")
    parser.add_argument("--single-gpu-only", action="store_true", help="skip the multi-GPU layouts")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke run of every code path on a machine without a GPU (tiny shapes; no figures)")
    args = parser.parse_args(argv)
    budget = Budget(args.max_minutes)

    import torch

    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() == 0):
        print(f"gpu_mfu: skipped: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return 0
    import gpu_mfu_runs as runs

    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    peaks = runs.spawn(runs.probe, {"device": args.device}, world=1, timeout_s=min(180.0, budget.left_s()))[0]
    if "error" in peaks:
        print(f"gpu_mfu: probe failed: {peaks['error']}")
        return 1
    print(json.dumps({"probe": peaks, "gpus": gpus}), flush=True)
    candidates = [int(c) for c in args.micro_batches.split(",")]
    lines: list[dict] = []

    bare_run, fm_run = Run("bare", "bare"), Run(f"fm-train zero{args.zero}", "fm_train", zero=args.zero)
    bare = _measure(args, budget, bare_run, None, search=candidates)
    micro_batch = bare.get("micro_batch")
    fm = _measure(args, budget, fm_run, micro_batch) if micro_batch else {"error": "no micro-batch"}
    while fm.get("error") == "oom" and micro_batch is not None:
        micro_batch = next_smaller(candidates, micro_batch)
        if micro_batch is None:
            break
        print(f"fm-train ran out of memory; both contenders again at micro-batch {micro_batch}", flush=True)
        bare = _measure(args, budget, bare_run, micro_batch)
        fm = _measure(args, budget, fm_run, micro_batch)
    lines.append(_report("bare", bare, bare_run, args, peaks))
    lines.append(_report(fm_run.name, fm, fm_run, args, peaks))
    if not args.single_gpu_only and micro_batch:
        for run in multi_gpu_runs(gpus, args.zero):
            lines.append(_report(run.name, _measure(args, budget, run, micro_batch), run, args, peaks))

    summary = _summary(lines[0], lines[1], peaks, args.seq)
    print(summary, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"probe": peaks, "gpus": gpus, "args": vars(args) | {"json": str(args.json)},
                                         "runs": lines, "summary": summary}, indent=2) + "\n")
    return 0


def _summary(bare: dict, fm: dict, peaks: dict, seq: int) -> str:
    if "error" in bare or "error" in fm:
        return "summary: incomplete (see the error lines above)"
    ratio = fm["tokens_per_s_per_gpu"] / bare["tokens_per_s_per_gpu"]
    mfu = fm["mfu_table"]
    mfu_text = "n/a (GPU not in the peak table)" if mfu is None else f"{mfu:.1%}"
    return (f"summary: {peaks['device']}: fm-train / bare = {ratio:.3f} (goal >= {GOAL_RATIO}),"
            f" fm-train MFU {mfu_text} of data sheet (goal >= {GOAL_MFU:.0%}),"
            f" {fm['mfu_measured']:.1%} of measured matmul peak {peaks['measured_peak'] / 1e12:.0f} TFLOP/s;"
            f" micro-batch {fm['micro_batch']} x seq {seq}")


if __name__ == "__main__":
    sys.exit(main())
