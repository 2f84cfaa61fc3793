"""A mixture schedule with an annealing phase, trained for real through ``run_worker`` (DeepSpeed on gloo):
dp1 and dp2 log the same losses and per-source tokens; a run resumed mid-phase on another layout (dp2 ->
dp1) and one resumed exactly at the phase boundary continue the uninterrupted run sample for sample;
the per-source losses add up to the loss.

Schedule (global batch 4 samples of 32 tokens): steps 1-4 constant {a: 0.75, b: 0.25}, step 5 a one-step
ramp to {b: 1}, then only b (the annealing phase). Checkpoints at steps 2 (mid-phase) and 4 (the boundary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

SEQ, MICRO, GLOBAL, STEPS = 32, 2, 4, 6
SCHEDULE = [{"until_step": 4, "weights": {"a": 0.75, "b": 0.25}}, {"until_step": 5, "ramp_to": {"b": 1.0}},
            {"weights": {"b": 1.0}}]


def raw_config(root: Path, run: str, dp: int, resume: str = "auto") -> dict[str, Any]:
    corpus = str(root / "corpus")
    return {
        "run": {"name": run, "dir": str(root / run), "seed": 5},
        "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172, "vocab_size": 512,
                  "max_seq_len": 64, "tie_embeddings": True},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 2},
        "precision": "fp32",
        # Two sources over one shard directory: each has its own order (the source index keys its shuffle).
        "data": {"sources": [{"name": "a", "path": corpus}, {"name": "b", "path": corpus}], "schedule": SCHEDULE,
                 "seq_len": SEQ, "num_workers": 0, "val_fraction": 0.0},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": GLOBAL // (MICRO * dp), "log_every": 1,
                  "eval_every": 0},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 3, "resume": resume},
        "convert": {"at_end": False},
        "logging": {"tensorboard": run == "dp2"},
        "cluster": {"workers": dp},
    }


def _worker(raw: dict[str, Any]) -> int:
    from fm_train.config import build_config
    from fm_train.worker import run_worker

    return run_worker(build_config(raw))


@pytest.fixture(scope="module")
def root(dir_with_corpus) -> Path:
    return dir_with_corpus("mixture_training")


def train(root: Path, run: str, dp: int, resume: str = "auto") -> list[dict[str, Any]]:
    raw = raw_config(root, run, dp, resume)
    assert run_distributed(_worker, world_size=dp, args=(raw,), init_process_group=False) == [0] * dp
    lines = (root / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _same_run(got: list[dict[str, Any]], want: list[dict[str, Any]], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["data_receipt"] == w["data_receipt"] != ""
        assert {k: v for k, v in g.items() if k.startswith("tokens_seen")} == \
               {k: v for k, v in w.items() if k.startswith("tokens_seen")}
        for key in ("loss", "loss/a", "loss/b"):
            if w[key] is None:
                assert g[key] is None, (key, g["step"])
            else:
                assert abs(g[key] - w[key]) <= rel * abs(w[key]), (key, g["step"], g[key], w[key])


def test_an_annealing_schedule_trains_alike_on_dp1_and_dp2_and_resumes_exactly(root: Path) -> None:
    dp2 = train(root, "dp2", 2)
    dp1 = train(root, "dp1", 1)
    _same_run(dp1, dp2, 1e-4)

    # Exact per-source token counts, from the schedule alone: 12 + 4 samples in steps 1-4, then only b.
    a, b = [[r[f"tokens_seen/{s}"] // SEQ for r in dp2] for s in "ab"]
    assert a == [3, 6, 9, 12, 12, 12] and b == [1, 2, 3, 4, 8, 12]
    for r, na, nb in zip(dp2, [3] + [y - x for x, y in zip(a, a[1:])], [1] + [y - x for x, y in zip(b, b[1:])]):
        if na == 0:  # annealing: every sample is b's, so b's loss is the loss
            assert r["loss/a"] is None and r["loss/b"] == pytest.approx(r["loss"], rel=1e-6)
        else:  # the per-source means weigh back to the step's loss (every sample has SEQ tokens)
            assert (na * r["loss/a"] + nb * r["loss/b"]) / (na + nb) == pytest.approx(r["loss"], rel=1e-6)
    assert dp2[-1]["loss"] < dp2[0]["loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "dp2" / "tensorboard"))
    events.Reload()
    for tag in ("train/tokens_seen/a", "train/tokens_seen/b", "train/loss/a", "train/loss/b"):
        assert tag in events.Tags()["scalars"], (tag, events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("train/loss/b")] == pytest.approx([r["loss/b"] for r in dp2], rel=1e-6)

    step2 = root / "dp2" / "checkpoints" / "step_00000002"
    mid = train(root, "dp2-to-dp1-mid", 1, resume=str(step2))  # mid-phase, then across the boundary, on dp1
    _same_run(mid, dp2[2:], 1e-4)
    step4 = root / "dp2" / "checkpoints" / "step_00000004"
    edge = train(root, "dp2-at-boundary", 2, resume=str(step4))  # exactly at the boundary, same layout
    _same_run(edge, dp2[4:], 1e-6)
