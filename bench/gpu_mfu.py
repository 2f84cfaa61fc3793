"""fm-train against an external reference on the same GPU: tokens/s, MFU and memory, eager and compiled.

    .venv/bin/python bench/gpu_mfu.py --json bench/gpu_mfu.json          # one H100/H200, under 8 minutes
    .venv/bin/python bench/gpu_mfu.py --cpu-smoke                        # the whole harness on CPU, tiny shape

The shape and the split come from the recipe (``--recipe``, default ``cluster_configs/h100_1b_1node.yaml``:
the 1.1B preset, TinyLlama shape, seq 2048, bf16, its micro-batch x gradient accumulation, its ZeRO
stage), run on one GPU. Four contenders, each in a fresh process (``gpu_mfu_runs.py`` says exactly what
each trains and how it is timed):

1. ``reference eager``: ``transformers.LlamaForCausalLM`` (SDPA, bf16, from the config, no download) in a
   plain PyTorch loop: fp32 master weights and gradient accumulation, ``clip_grad_norm_``, fused AdamW;
2. ``fm-train eager``: fm-train's DeepSpeed engine and training loop;
3. ``reference compiled``: the same with ``torch.compile`` of each decoder layer;
4. ``fm-train compiled``: ``parallel.compile=true`` (``torch.compile`` of each block).

Reported per contender: tokens/s per GPU, model TFLOP/s, MFU against the data-sheet peak
(``fm_train/engine/flops.py``) and against the measured bf16 matmul peak (8192^3, CUDA events, in a probe
process first), peak GPU memory, build and warm-up (compile) seconds apart from the timed ones; then
fm-train / reference for eager/eager and compiled/compiled. One JSON line per contender, a one-paragraph
``summary:`` at the end, everything in ``--json``. Goals (issue 29): MFU >= 45 % and >= 1.0 of the reference.

Out of memory: a contender that runs out of memory lowers the shared micro-batch to the next divisor that
keeps the tokens per step (accumulation raised to match), and every contender already measured at the
larger one is measured again, so both sides are always compared at the same split.

How it stays inside 8 minutes on one H100 from a fresh machine: the venv is PyPI wheels only
(``scripts/bootstrap.sh``; torch's CUDA wheel brings Triton) and nothing is built at run time: fm-train's
AdamW is torch's fused one through DeepSpeed's ``torch_adam`` (no ``FusedAdam`` JIT build, no CUDA toolkit
needed), and the fm-train result lists any DeepSpeed op built during the run (``ops_built_during_run``,
expected empty). The bench's own clock (``--max-minutes``, default 7, from its start) holds: the probe gets
at most 90 s; a run starts only if its expected need is left (eager 45 s, compiled 100 s) and gets at most
its cap (eager 120 s, compiled 210 s, cold compile included) or what is left; inside, the run times its last
warm-up step alone and cuts the timed steps (``--steps``, default 3, each ``grad_accum`` micro-batches) to
what fits before its deadline. A run that cannot start, or whose warm-up left no room, is reported with a
``skipped:`` line, and the summary names it. Compile warm-up is reported as ``warmup_s``, never timed.
The needs and caps (``NEED_CAP_S``) are estimates until the first GPU run: set them from its ``build_s``,
``warmup_s`` and ``wall_s``. Without a GPU it prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # gpu_mfu_common / gpu_mfu_runs, also when imported by the tests

from gpu_mfu_common import (  # noqa: E402
    Budget,
    Contender,
    Split,
    contenders,
    measure_all,
    ratios,
    summary,
    throughput,
)

RECIPE = ROOT / "cluster_configs" / "h100_1b_1node.yaml"
#: (seconds that must be left to start a run, the most it may take), eager and compiled, per device.
NEED_CAP_S = {("cuda", False): (45.0, 120.0), ("cuda", True): (100.0, 210.0),
              ("cpu", False): (10.0, 120.0), ("cpu", True): (15.0, 180.0)}
#: --cpu-smoke: the tiny preset on CPU in fp32, blocks compiled with a tracing-only backend.
SMOKE_OVERRIDES = ("model.preset=tiny", "precision=fp32", "data.seq_len=64")


def recipe_split(recipe: Path, overrides: Sequence[str]) -> tuple[Split, Any]:
    """The recipe's micro-batch and gradient accumulation (at its own world size) and its config."""
    from fm_train.config import load_config

    cfg = load_config(recipe, list(overrides))
    return Split(cfg.train.micro_batch, cfg.train.grad_accum), cfg


def _measure(args: argparse.Namespace, budget: Budget, probe: dict, run: Contender, split: Split) -> dict[str, Any]:
    """One contender in a fresh process, within its share of the budget; its report line."""
    import gpu_mfu_runs as runs

    head = {"name": run.name, "kind": run.kind, "compiled": run.compiled}
    need, cap = NEED_CAP_S[(args.device, run.compiled)]
    grant = budget.grant(need, cap)
    if grant is None:
        line = {**head, "error": f"skipped: {max(0.0, budget.left_s()):.0f} s left of the --max-minutes budget,"
                                 f" this run needs about {need:.0f} s"}
        print(json.dumps(line), flush=True)
        return line
    job = {"recipe": str(args.recipe), "overrides": args.overrides, "device": args.device,
           "micro_batch": split.micro_batch, "grad_accum": split.grad_accum, "compiled": run.compiled,
           "compile_backend": args.compile_backend, "warmup": args.warmup, "steps": args.steps}
    started = time.monotonic()
    result = runs.spawn(runs.reference if run.kind == "reference" else runs.fm_train, job, timeout_s=grant)[0]
    line = {**head, "micro_batch": split.micro_batch, "grad_accum": split.grad_accum, **result,
            "wall_s": round(time.monotonic() - started, 1)}
    if "error" not in line:
        tokens_per_step = split.micro_batch * split.grad_accum * args.seq
        line.update(tokens_per_step=tokens_per_step, **throughput(
            tokens_per_step=tokens_per_step, steps=result["steps"], seconds=result["seconds"], gpus=1,
            flops_per_token=args.flops_per_token, measured_peak=probe["measured_peak"],
            table_peak=probe["table_peak"]))
    else:
        line["error"] = str(line["error"])[-1500:]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}), flush=True)
    return line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe whose shape and split are measured")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both contenders (repeatable)")
    parser.add_argument("--max-minutes", type=float, default=7.0, help="the bench's whole budget (default 7)")
    parser.add_argument("--micro-batch", type=int, help="start at this micro-batch instead of the recipe's")
    parser.add_argument("--grad-accum", type=int, help="with --micro-batch: accumulation instead of the recipe's")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the compile included (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, each grad_accum micro-batches (default 3)")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled or both (default both)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the whole harness on CPU: tiny preset, seq 64, fp32, micro-batch 2 x 2,"
                             " blocks compiled with the aot_eager backend (no figures worth keeping)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the last warm-up step sets the timed steps)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        parser.error(f"--modes {args.modes!r}: give eager, compiled or eager,compiled")
    args.compiled_modes = [m == "compiled" for m in ("eager", "compiled") if m in modes]
    args.device, args.compile_backend = ("cpu", "aot_eager") if args.cpu_smoke else ("cuda", "inductor")
    if args.cpu_smoke:
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
        args.micro_batch, args.grad_accum = args.micro_batch or 2, args.grad_accum or 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.max_minutes * 60)

    import torch

    if not args.cpu_smoke and (not torch.cuda.is_available() or torch.cuda.device_count() == 0):
        print(f"gpu_mfu: skipped: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return 0
    import gpu_mfu_runs as runs

    from fm_train.families import family_of

    split, cfg = recipe_split(args.recipe, args.overrides)
    if args.micro_batch:
        split = Split(args.micro_batch, args.grad_accum or split.grad_accum)
    args.seq = cfg.data.seq_len
    args.flops_per_token = family_of(cfg.model).sizes.flops_per_token(cfg.model, args.seq)
    probe = runs.spawn(runs.probe, {"device": args.device}, timeout_s=min(90.0, budget.left_s()))[0]
    if "error" in probe:
        print(f"gpu_mfu: probe failed: {probe['error']}")
        return 1
    print(json.dumps({"probe": probe, "recipe": str(args.recipe), "preset": cfg.model.preset, "seq": args.seq,
                      "precision": cfg.precision, "zero_stage": cfg.parallel.zero_stage, "split": split._asdict(),
                      "flops_per_token": args.flops_per_token}), flush=True)

    results, notes = measure_all(contenders(args.compiled_modes), split,
                                 lambda run, at: _measure(args, budget, probe, run, at))
    pair_ratios = ratios(results)
    text = summary(probe["device"], results, pair_ratios, notes)
    print(text, flush=True)
    if args.json:
        report = {"probe": probe, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "recipe_split": split._asdict(), "runs": results, "ratios": pair_ratios, "notes": notes,
                  "budget_used_s": round(args.max_minutes * 60 - budget.left_s(), 1), "summary": text}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
