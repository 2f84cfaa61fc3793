"""The MoE family through the real worker and DeepSpeed engine: training with router metrics in
``metrics.jsonl``, checkpoints and an exact resume, and the export as ``Qwen3MoeForCausalLM``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed
from test_engine_worker import SEQ, VOCAB, _worker_with_fake_data

pytestmark = pytest.mark.multiproc


def moe_raw(run_dir: Path, **parallel: Any) -> dict[str, Any]:
    return {
        "run": {"name": "moe", "dir": str(run_dir), "seed": 7},
        "model": {"preset": "moe-tiny", "n_layers": 3, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
                  "ffn_hidden": 96, "vocab_size": VOCAB, "max_seq_len": 64,
                  "moe": {"experts": 4, "top_k": 2, "expert_ffn_hidden": 32, "dense_layers": 1}},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 2, **parallel},
        "precision": "fp32",
        "data": {"sources": [{"path": "data/stdlib", "weight": 1.0, "default_corpus": True}], "seq_len": SEQ},
        "train": {"steps": 6, "micro_batch": 2, "grad_accum": 2, "eval_every": 0, "log_every": 1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 1.0},
        "checkpoint": {"every": 3, "keep": 3},
        "logging": {"tensorboard": False},
        "cluster": {"workers": 2},
    }


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_moe_trains_reports_its_router_and_resumes_exactly(tmp_path: Path) -> None:
    straight = moe_raw(tmp_path / "straight")
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(straight,), init_process_group=False) == [0, 0]
    full = records(tmp_path / "straight")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    for r in full:
        assert 1.0 <= r["moe_load_max_mean"] <= 4.0 and r["moe_dropped"] == 0.0
        assert 1.0 < r["moe_aux_loss"] < 4.0 and r["moe_z_loss"] > 0.0  # k = 2 under perfect balance
    # The same run preempted (SIGTERM on rank 1 while it reads step 4's first batch: it saves step 4 and
    # stops) and started again: the same losses to the bit.
    resumed = moe_raw(tmp_path / "resumed")
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(resumed, 6), init_process_group=False) == [0, 0]
    assert (tmp_path / "resumed/checkpoints/step_00000004").is_dir()
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(resumed,), init_process_group=False) == [0, 0]
    again = records(tmp_path / "resumed")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["moe_aux_loss"]) for r in again] == [(r["loss"], r["moe_aux_loss"]) for r in full]
