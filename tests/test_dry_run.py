"""``fm-train launch --dry-run`` against a real private local Ray: everything up to the first step (config,
plan, resources, placement table, every node's preflight) and nothing after; refusals named and non-zero:
more workers than the cluster has, a planned peak over the card, an unreachable cluster, a bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "fm_train.cli", "launch", str(ROOT / "cluster_configs/local.yaml"),
                           "--dry-run", "--set", f"run.dir={tmp_path / 'run'}", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=240)


def test_a_dry_run_goes_up_to_the_first_step_and_starts_nothing(tmp_path: Path, corpus: Path) -> None:
    out = dry_run(tmp_path, f"data.sources=[{{path: {corpus}}}]", "model.vocab_size=512")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "plan: world 2 = pp 1 x dp 2 x tp 1; 8 sequences, 1,024 tokens per step" in text
    assert "plan: peak" in text and "ray: private local instance" in text
    assert "resources: 2 slots of 1 CPU and 0 GPU available" in text
    assert "attempt 1: 2 ranks" in text and "preflight: 1 node(s) and the driver see" in text
    assert text.rstrip().endswith("dry run: ok, a launch would start (nothing was trained or written)")
    assert not (tmp_path / "run").exists()  # no run directory, no lease, no metrics


def test_a_missing_default_corpus_is_left_to_the_launch(tmp_path: Path) -> None:
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "data: data/stdlib does not exist yet; the launch builds it first (default_corpus)" in out.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("sets", "message"), [
    (["cluster.workers=64"], "not enough resources"),
    (["cluster.address=10.255.255.1:6379", "cluster.workers=2"], "10.255.255.1"),
    (["parallel.tp=3"], "parallel.tp=3"),
])
def test_a_dry_run_refuses_what_would_stop_the_launch(tmp_path: Path, sets: list[str], message: str) -> None:
    out = dry_run(tmp_path, *sets)
    assert out.returncode != 0 and message in out.stderr + out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_the_dry_run_holds_the_plan_against_the_card() -> None:
    """The GPU recipes' plan against cluster.gpu_memory_gib (no GPU here: the plan step alone)."""
    from fm_train.config import load_config
    from launcher.job import _plan_summary

    lines: list[str] = []
    recipe = ROOT / "cluster_configs/h100_7b_2node.yaml"
    assert _plan_summary(load_config(recipe, []), lines.append) is None
    assert any(line.startswith("plan: peak") and "of 80 GiB (cluster.gpu_memory_gib)" in line for line in lines)
    problem = _plan_summary(load_config(recipe, ["train.micro_batch=64"]), lines.append)
    assert problem is not None and "exceeds the 80 GiB card (cluster.gpu_memory_gib)" in problem
