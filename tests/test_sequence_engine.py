"""Sequence parallelism and document masking through the real worker on real shards: an sp2 run (2 ranks,
ZeRO-2, evaluation on) and a pp2 x sp2 run (4 ranks, ZeRO-1) equal the one-rank run step for step (all
read the same samples), convert to verified Hugging Face models (the probe's logits gathered along the
sequence), and sp2 resumes on one rank (sp2 -> sp1) at the same global sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc


def sp_raw(run_dir: Path, corpus: Path, *, sp: int, workers: int, pp: int = 1) -> dict[str, Any]:
    return {
        "run": {"name": "sp", "dir": str(run_dir), "seed": 3},
        "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128, "vocab_size": 512,
                  "max_seq_len": 32, "tie_embeddings": True},
        "parallel": {"sp": sp, "pp": pp, "zero_stage": 2 if pp == 1 else 1},
        "precision": "fp32",
        "data": {"sources": [{"path": str(corpus)}], "seq_len": 32, "document_masking": True, "num_workers": 0},
        "train": {"steps": 6, "micro_batch": 4, "grad_accum": 1, "eval_every": 3, "eval_batches": 2, "log_every": 1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 1.0},
        "checkpoint": {"every": 3, "keep": 3},
        "logging": {"tensorboard": False},
        "convert": {"at_end": False},
        "cluster": {"workers": workers},
    }


def _worker(raw: dict[str, Any]) -> int:
    from fm_train.config import build_config
    from fm_train.worker import run_worker

    return run_worker(build_config(raw))


def records(run: Path, key: str = "loss") -> list[dict[str, Any]]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp_runs")
    assert run_distributed(_worker, 2, args=(sp_raw(root / "sp2", corpus, sp=2, workers=2),),
                           init_process_group=False) == [0, 0]
    assert run_distributed(_worker, 1, args=(sp_raw(root / "sp1", corpus, sp=1, workers=1),),
                           init_process_group=False) == [0]
    return {"sp2": root / "sp2", "sp1": root / "sp1"}


def test_sp2_trains_like_one_rank_and_converts(runs: dict[str, Path]) -> None:
    sp2, sp1 = records(runs["sp2"]), records(runs["sp1"])
    assert [r["step"] for r in sp2] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(sp2, sp1):
        assert (a["data_receipt"], a["tokens_seen"]) == (b["data_receipt"], b["tokens_seen"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert sp2[-1]["tokens_seen"] == 6 * 4 * 32  # the two ranks read one micro-batch of 4 samples a step
    val2, val1 = records(runs["sp2"], "val_loss"), records(runs["sp1"], "val_loss")
    assert [v["step"] for v in val2] == [3, 6]
    assert [v["val_loss"] for v in val2] == pytest.approx([v["val_loss"] for v in val1], rel=1e-5)
    manifest = json.loads((runs["sp2"] / "checkpoints/step_00000006/manifest.json").read_text())
    assert manifest["topology"]["sp"] == 2 and manifest["topology"]["dp"] == 2


def test_an_sp2_step_converts_verified_and_loads(tmp_path: Path, runs: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fm_train.convert import convert_checkpoint

    # Verified against the logits the sp2 engine computed at save time (each rank its chunk, gathered).
    out = convert_checkpoint(runs["sp2"], tmp_path / "hf", dtype="fp32", no_tokenizer=True)
    assert "logits match the training engine's own logits" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_sp2_resumes_on_one_rank_at_the_same_sample(tmp_path: Path, runs: dict[str, Path], corpus: Path) -> None:
    raw = sp_raw(tmp_path / "moved", corpus, sp=1, workers=1)
    raw["checkpoint"] = {**raw["checkpoint"], "resume": str(runs["sp2"] / "checkpoints/step_00000003")}
    assert run_distributed(_worker, 1, args=(raw,), init_process_group=False) == [0]
    want, got = records(runs["sp2"])[3:], records(tmp_path / "moved")
    assert [r["step"] for r in got] == [4, 5, 6]
    for w, g in zip(want, got):
        assert (g["data_receipt"], g["tokens_seen"], g["lr"]) == (w["data_receipt"], w["tokens_seen"], w["lr"])
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)


def test_pp2_sp2_trains_like_one_rank_and_converts(tmp_path: Path, runs: dict[str, Path], corpus: Path) -> None:
    """4 ranks, two stages of an sp2 group each: the same samples as one rank, the same losses; the probe
    runs through the pipeline on the chunks and is gathered along the sequence, and the step converts."""
    from fm_train.convert import convert_checkpoint

    raw = sp_raw(tmp_path / "pp2sp2", corpus, sp=2, workers=4, pp=2)
    assert run_distributed(_worker, 4, args=(raw,), init_process_group=False) == [0, 0, 0, 0]
    got, want = records(tmp_path / "pp2sp2"), records(runs["sp1"])
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want):
        assert g["data_receipt"] == w["data_receipt"] and g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    assert [v["val_loss"] for v in records(tmp_path / "pp2sp2", "val_loss")] == pytest.approx(
        [v["val_loss"] for v in records(runs["sp1"], "val_loss")], rel=1e-5)
    out = convert_checkpoint(tmp_path / "pp2sp2", tmp_path / "hf", dtype="fp32", no_tokenizer=True)
    assert "logits match the training engine's own logits" in (out / "README.md").read_text()
