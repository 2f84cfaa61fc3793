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
        "convert": {"at_end": parallel.get("ep", 1) == 1},
        "cluster": {"workers": 2},
    }


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_trains_reports_its_router_and_resumes_exactly(tmp_path: Path, ep: int) -> None:
    straight = moe_raw(tmp_path / "straight", ep=ep)
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(straight,), init_process_group=False) == [0, 0]
    full = records(tmp_path / "straight")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    for r in full:
        assert 1.0 <= r["moe_load_max_mean"] <= 4.0 and r["moe_dropped"] == 0.0
        assert 1.0 < r["moe_aux_loss"] < 4.0 and r["moe_z_loss"] > 0.0  # k = 2 under perfect balance
    # The same run preempted (SIGTERM on rank 1 while it reads step 4's first batch: it saves step 4 and
    # stops) and started again: the same losses to the bit.
    resumed = moe_raw(tmp_path / "resumed", ep=ep)
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(resumed, 6), init_process_group=False) == [0, 0]
    assert (tmp_path / "resumed/checkpoints/step_00000004").is_dir()
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(resumed,), init_process_group=False) == [0, 0]
    again = records(tmp_path / "resumed")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["moe_aux_loss"]) for r in again] == [(r["loss"], r["moe_aux_loss"]) for r in full]
    if ep == 1:
        return
    step = tmp_path / "resumed/checkpoints/step_00000006"
    assert json.loads((step / "manifest.json").read_text())["topology"]["ep"] == 2
    assert sorted(p.name for p in step.glob("layer_*_expert_*")) == [
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]
    # What is not built yet is refused by name: another ep on resume, and converting an ep > 1 step.
    from fm_train.checkpoint import CheckpointError, load_checkpoint
    from fm_train.config import build_config
    from fm_train.convert import ConvertError, convert_checkpoint

    with pytest.raises(CheckpointError, match="saved with parallel.ep=2, this run has parallel.ep=1"):
        load_checkpoint(None, step, config=build_config(moe_raw(tmp_path / "resumed")))
    with pytest.raises(ConvertError, match="saved with parallel.ep=2: converting an expert-parallel checkpoint"):
        convert_checkpoint(step, tmp_path / "hf", no_tokenizer=True)


def test_moe_checkpoint_converts_to_qwen3_moe_that_generates_and_fine_tunes(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM, Trainer, TrainingArguments

    from fm_train.convert import convert_checkpoint

    raw = moe_raw(tmp_path / "run")
    raw["train"] = {**raw["train"], "steps": 3}
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32", no_tokenizer=True)
    readme = (out / "README.md").read_text()
    assert "logits match the training engine's own logits" in readme and "Qwen3MoeForCausalLM" in readme
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [0]
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert isinstance(model, Qwen3MoeForCausalLM)
    prompt = torch.tensor([[1, 4, 7, 10]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10)
    rows = [(torch.arange(SEQ + 1) * 3 + s) % VOCAB for s in range(16)]
    examples = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "ft"), per_device_train_batch_size=4, num_train_epochs=3,
                             learning_rate=3e-3, logging_steps=2, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, dataloader_num_workers=0)
    model.config.output_router_logits = True  # the router's load-balancing loss joins the fine-tuning loss
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(logged) >= 4 and logged[-1] < logged[0], logged
