"""Soak test: a long tiny run through the launcher, watching each rank's resident memory and throughput.

    .venv/bin/python bench/soak.py --steps 2000 --every 100 --out /tmp/soak

Trains the ``tiny`` preset (4 layers, hidden 128, vocab 4096 as in cluster_configs/local.yaml; seq
128, micro-batch 4, fp32, ZeRO-2; ``--model chaos`` for the chaos suite's smaller model) on 2 workers
with a checkpoint every ``--every`` steps, exactly as ``fm-train launch`` does, while a sampler thread reads
the RSS of every worker process once per second. Reports, per rank, RSS at the start (first sample
after ``--warmup`` steps, when allocators and caches have settled) and at the end, and the growth
(goal < 5%); and the throughput drift: median tokens/s of the last 10% of logged steps against the
first 10% after warm-up. Writes ``OUT/soak.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class MemoryTrace:
    """(logged step, RSS bytes) samples of one rank's worker process."""

    samples: list[tuple[int, int]] = field(default_factory=list)


MODELS = {
    # The tiny preset at the default job's vocabulary: (model section, seq_len, micro_batch).
    "tiny": ({"preset": "tiny", "vocab_size": 4096}, 128, 4),
    # The chaos suite's model (tests/chaos/chaos_runs.py): about 10x faster per step.
    "chaos": ({"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172, "vocab_size": 512,
               "max_seq_len": 64, "tie_embeddings": True}, 32, 2),
}


def soak_config(run: Path, data: Path, steps: int, every: int, model: str = "tiny") -> dict:
    """The soak run: logging every 10 steps, checkpoints every ``every``, no restarts."""
    shape, seq_len, micro_batch = MODELS[model]
    return {
        "run": {"name": "soak", "dir": str(run), "seed": 5},
        "model": shape,
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 2},
        "precision": "fp32",
        "data": {"sources": [{"path": str(data)}], "seq_len": seq_len, "num_workers": 0},
        "train": {"steps": steps, "micro_batch": micro_batch, "log_every": 10, "eval_every": 0},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
        "checkpoint": {"every": every, "keep": 3},
        "convert": {"at_end": False},
        "logging": {"tensorboard": False},
        "cluster": {"workers": 2, "max_restarts": 0, "step_timeout_s": 300},
    }


def _worker_processes(config: Path) -> dict[int, "psutil.Process"]:  # noqa: F821 - psutil imported lazily
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "worker" in cmd and str(config) in cmd:
            try:
                found[int(proc.environ()["RANK"])] = proc
            except (psutil.Error, KeyError, ValueError):
                continue
    return found


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 4096))
        lines = fh.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def sample_memory(run: Path, traces: dict[int, MemoryTrace], stop: threading.Event, interval_s: float) -> None:
    """Append each rank's RSS once per ``interval_s`` until ``stop`` is set."""
    import psutil

    config = (run / "config.resolved.yaml").resolve()
    while not stop.wait(interval_s):
        step = _last_step(run)
        for rank, proc in _worker_processes(config).items():
            try:
                traces.setdefault(rank, MemoryTrace()).samples.append((step, proc.memory_info().rss))
            except psutil.Error:
                continue


def summarize(run: Path, traces: dict[int, MemoryTrace], warmup: int, seconds: float, code: int) -> dict:
    """Memory growth per rank and throughput drift from the samples and RUN/metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r and r["step"] > warmup]
    tenth = max(1, len(rates) // 10)
    first, last = statistics.median(v for _, v in rates[:tenth]), statistics.median(v for _, v in rates[-tenth:])
    memory = {}
    for rank, trace in sorted(traces.items()):
        settled = [s for s in trace.samples if s[0] >= warmup] or trace.samples
        start, end = settled[0], settled[-1]
        memory[rank] = {"start_step": start[0], "start_rss_mib": start[1] / 2**20, "end_step": end[0],
                        "end_rss_mib": end[1] / 2**20, "growth_pct": 100.0 * (end[1] - start[1]) / start[1],
                        "peak_rss_mib": max(b for _, b in trace.samples) / 2**20, "samples": len(trace.samples)}
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    return {"exit_code": code, "seconds": seconds, "steps": max((r["step"] for r in records), default=0),
            "memory": memory, "tokens_per_s_first": first, "tokens_per_s_last": last,
            "throughput_drift_pct": 100.0 * (last - first) / first, "checkpoints_kept": checkpoints}


def markdown(summary: dict, args: argparse.Namespace) -> str:
    """The figures as Markdown, for bench/RESULTS_soak.md."""
    lines = [f"model {args.model}, steps {summary['steps']} (asked {args.steps}), checkpoint every {args.every}, exit code"
             f" {summary['exit_code']}, wall {summary['seconds']:.0f} s", "",
             "| rank | RSS at start (step) | RSS at end (step) | growth | peak |", "|---|---|---|---|---|"]
    for rank, m in summary["memory"].items():
        lines.append(f"| {rank} | {m['start_rss_mib']:.1f} MiB ({m['start_step']}) | {m['end_rss_mib']:.1f} MiB"
                     f" ({m['end_step']}) | {m['growth_pct']:+.2f}% | {m['peak_rss_mib']:.1f} MiB |")
    lines += ["", f"throughput: median {summary['tokens_per_s_first']:.0f} tok/s over the first 10% of logged steps"
              f" after warm-up, {summary['tokens_per_s_last']:.0f} tok/s over the last 10%"
              f" (drift {summary['throughput_drift_pct']:+.1f}%)",
              f"checkpoints kept at the end: {', '.join(summary['checkpoints_kept'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print the summary; exit status is the launch's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--every", type=int, default=100, help="checkpoint.every (default 100)")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the 'start' memory sample (100)")
    parser.add_argument("--interval-s", type=float, default=1.0, help="seconds between RSS samples (1)")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="tiny: the tiny preset (default); chaos: the chaos suite's smaller model")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fm-train-soak"), help="work directory (replaced)")
    args = parser.parse_args(argv)

    import shutil

    import yaml

    from data_shards import build_default_corpus
    from launcher.job import launch
    from launcher.options import LaunchOptions

    shutil.rmtree(args.out / "run", ignore_errors=True)
    shape, seq_len, _ = MODELS[args.model]
    data = build_default_corpus(args.out / f"data-{args.model}", vocab_size=shape["vocab_size"], seq_len=seq_len,
                                max_bytes=2_000_000)
    run = args.out / "run"
    config = args.out / "soak.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(soak_config(run, data, args.steps, args.every, args.model)))
    traces: dict[int, MemoryTrace] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(run, traces, stop, args.interval_s), daemon=True)
    sampler.start()
    start = time.monotonic()
    code = launch(config, [], LaunchOptions(post_training=False, progress_interval_s=30))
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    if not (run / "metrics.jsonl").is_file():
        print(f"the soak run logged no step (launch exit code {code}); see {run / 'logs'}", file=sys.stderr)
        return code or 1
    summary = summarize(run, traces, args.warmup, seconds, code)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2))
    print(markdown(summary, args))
    return code


if __name__ == "__main__":
    sys.exit(main())
