"""Real tiny training runs through the launcher, and what they leave behind: metrics, failures, weights.

Every chaos scenario trains the same tiny model (hidden 64, 2 layers, vocab 512, seq 32, fp32,
ZeRO-2, 2 workers) with :func:`launcher.job.launch`, the code path of ``fm-train launch``. Two runs
with the same seed and layout are bitwise deterministic, so "nothing was lost" is checked as
equality with an uninterrupted run: per-step losses, the final data receipt and every fp32 weight.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.job import launch
from launcher.options import LaunchOptions

STEPS = 24
"""Long enough to kill between checkpoints, short enough to keep a run under a minute."""
EVERY = 6
"""checkpoint.every of the default scenario config."""


def tiny_config(run_dir: Path, data_dir: Path, *, seed: int = 11, steps: int = STEPS, every: int = EVERY,
                keep: int = 3, max_restarts: int = 2, step_timeout_s: float = 120, on_bad_shard: str = "fail",
                eval_every: int = 0, verify_sha256: bool = True) -> dict:
    """The scenario config: the tiny model on 2 workers, every step logged, no conversion at the end
    (``eval_every``: 0, no evaluation; ``verify_sha256``: each shard's sha256 on its first read)."""
    return {
        "run": {"name": "chaos", "dir": str(run_dir), "seed": seed},
        "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172,
                  "vocab_size": 512, "max_seq_len": 64, "tie_embeddings": True},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 2},
        "precision": "fp32",
        "data": {"sources": [{"path": str(data_dir)}], "seq_len": 32, "num_workers": 0,
                 "on_bad_shard": on_bad_shard, "verify_sha256": verify_sha256},
        "train": {"steps": steps, "micro_batch": 2, "grad_accum": 1, "log_every": 1, "eval_every": eval_every},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "checkpoint": {"every": every, "keep": keep, "resume": "auto"},
        "convert": {"at_end": False},
        "logging": {"tensorboard": False, "jsonl": True},
        "cluster": {"workers": 2, "max_restarts": max_restarts, "step_timeout_s": step_timeout_s},
    }


def write_config(path: Path, cfg: dict) -> Path:
    """Write ``cfg`` as YAML to ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def options(**overrides: Any) -> LaunchOptions:
    """Launch options for tests: no corpus build or conversion, short graces, quick polling."""
    base: dict[str, Any] = {"post_training": False, "stop_grace_s": 60, "failure_grace_s": 3,
                            "poll_interval_s": 0.2, "progress_interval_s": 5, "placement_timeout_s": 120}
    base.update(overrides)
    return LaunchOptions(**base)


@dataclass
class RunResult:
    """A finished launch: its exit code, how long it took and where its files are."""

    code: int
    seconds: float
    run_dir: Path


def run_launch(config: Path, run_dir: Path, **option_overrides: Any) -> RunResult:
    """``fm-train launch CONFIG`` in this process (the driver never imports torch; workers are processes)."""
    start = time.monotonic()
    code = launch(config, [], options(**option_overrides))
    return RunResult(code=code, seconds=time.monotonic() - start, run_dir=run_dir)


def metrics(run_dir: Path) -> list[dict]:
    """Every record of RUN/metrics.jsonl, in file order (restarted attempts append)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return out


def train_records(run_dir: Path) -> dict[int, dict]:
    """step -> the last train record of that step (a resumed attempt re-logs the steps it redid)."""
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


def last_step(run_dir: Path) -> int:
    """The highest step in RUN/metrics.jsonl (0 before the first)."""
    return max((r["step"] for r in metrics(run_dir) if isinstance(r.get("step"), int)), default=0)


def failures(run_dir: Path) -> list[dict]:
    """Records of RUN/failures.jsonl (one per attempt that did not succeed)."""
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def rank_log(run_dir: Path, rank: int) -> str:
    """RUN/logs/rank_NNN.log as the driver wrote it (all attempts)."""
    return (run_dir / "logs" / f"rank_{rank:03d}.log").read_text()


def latest_step(run_dir: Path) -> int | None:
    """The step that RUN/checkpoints/latest names, or None."""
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else None


def step_dir(run_dir: Path, step: int) -> Path:
    """RUN/checkpoints/step_XXXXXXXX."""
    return run_dir / "checkpoints" / f"step_{step:08d}"


def final_weights(run_dir: Path, step: int) -> dict[str, Any]:
    """The fp32 master weights of a checkpoint, read by the converter's own reader (fm_train names)."""
    from fm_train.checkpoint.manifest import read_manifest
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
    from fm_train.families import family_of

    d = step_dir(run_dir, step)
    manifest = read_manifest(d)
    fields = manifest["config"]["model"]
    source = DeepSpeedWeights(d, manifest, tied=family_of(fields).tied_params(fields))
    return {name: source.get(name).clone() for name in source.shapes()}


def weight_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of tensors that are not bitwise equal (or present in only one of the two)."""
    import torch

    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n], b[n])]


def assert_same_training(run: Path, reference: Path, steps: int = STEPS) -> None:
    """The run trained exactly like the reference: every step's loss, the final receipt, every weight."""
    got, want = train_records(run), train_records(reference)
    assert sorted(got) == list(range(1, steps + 1)), f"steps logged: {sorted(got)}"
    diff = [(s, got[s]["loss"], want[s]["loss"]) for s in want if got[s]["loss"] != want[s]["loss"]]
    assert not diff, f"losses differ from the uninterrupted run at (step, got, want): {diff[:5]}"
    assert got[steps]["data_receipt"] == want[steps]["data_receipt"], "the final data receipt differs"
    assert got[steps]["tokens_seen"] == want[steps]["tokens_seen"]
    bad = weight_differences(final_weights(run, steps), final_weights(reference, steps))
    assert not bad, f"final weights differ from the uninterrupted run: {bad}"


def figure(text: str) -> None:
    """Print one measured figure (collected into docs/robustness.md from a ``pytest -s`` run)."""
    print(f"CHAOS-FIGURE {text}", flush=True)
