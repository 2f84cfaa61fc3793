"""The MoE family through the real worker and DeepSpeed engine at ep1 and ep2 (and ep2 with tp2 or pp2):
training with router metrics in ``metrics.jsonl``, checkpoints recording where each expert lives, an exact
resume on the same layout and a resume on another layout at the same global sample, and the export of
each as ``Qwen3MoeForCausalLM``."""

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


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted 6-step runs at ep1 and ep2 (2 ranks, ZeRO-2), saved at steps 3 and 6: ep -> run dir."""
    root = tmp_path_factory.mktemp("moe_runs")
    for ep in (1, 2):
        raw = moe_raw(root / f"ep{ep}", ep=ep)
        assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    return {ep: root / f"ep{ep}" for ep in (1, 2)}


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_trains_reports_its_router_and_resumes_exactly(tmp_path: Path, straight: dict[int, Path], ep: int) -> None:
    full = records(straight[ep])
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    for r in full:
        assert 1.0 <= r["moe_load_max_mean"] <= 4.0 and r["moe_dropped"] == 0.0
        per_layer = [r["moe_load_max_mean/layer_1"], r["moe_load_max_mean/layer_2"]]  # the two routed blocks
        assert all(1.0 <= x <= 4.0 for x in per_layer) and sum(per_layer) / 2 == pytest.approx(r["moe_load_max_mean"])
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
    manifest = json.loads((straight[ep] / "checkpoints/step_00000006/manifest.json").read_text())
    assert manifest["topology"]["ep"] == ep
    if ep == 2:  # which expert lives where: ep rank r keeps experts 2r and 2r + 1 of both routed blocks
        assert manifest["experts"] == {"ep": 2, "ranks": [[0, 1], [2, 3]], "params": [
            f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in ("gate_up_proj", "down_proj")]}
        assert sorted(p.name for p in (straight[ep] / "checkpoints/step_00000006").glob("layer_*_expert_*")) == [
            f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]
    else:
        assert "experts" not in manifest


def full_weights(step_dir: Path) -> dict[str, Any]:
    """Every full fp32 weight of a step directory (any ep), and Adam's step."""
    from fm_train.checkpoint import read_manifest
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights

    reader = DeepSpeedWeights(step_dir, read_manifest(step_dir), tied={})
    return {"adam_step": reader.optimizer_step(), **{n: reader.get(n) for n in reader.shapes()}}


@pytest.mark.parametrize(("source", "target"), [(2, 1), (1, 2)], ids=["ep2-to-ep1", "ep1-to-ep2"])
def test_moe_resumes_on_another_expert_parallel_size(tmp_path: Path, straight: dict[int, Path], source: int,
                                                     target: int) -> None:
    import torch

    step3 = straight[source] / "checkpoints/step_00000003"
    raw = moe_raw(tmp_path / "moved", ep=target)
    raw["checkpoint"] = {**raw["checkpoint"], "resume": str(step3)}
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    want, got = records(straight[source])[3:], records(tmp_path / "moved")
    assert [r["step"] for r in got] == [4, 5, 6]
    for w, g in zip(want, got):  # the same global samples, and the weights and Adam's moments came across
        assert (g["data_receipt"], g["tokens_seen"], g["lr"]) == (w["data_receipt"], w["tokens_seen"], w["lr"])
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5) and g["moe_aux_loss"] == pytest.approx(
            w["moe_aux_loss"], rel=1e-5)
    moved, kept = full_weights(tmp_path / "moved/checkpoints/step_00000006"), full_weights(
        straight[source] / "checkpoints/step_00000006")
    assert moved.keys() == kept.keys() and moved.pop("adam_step") == kept.pop("adam_step") == 6
    for name, tensor in kept.items():
        torch.testing.assert_close(moved[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_checkpoint_converts_to_qwen3_moe_that_generates_and_fine_tunes(tmp_path: Path, straight: dict[int, Path],
                                                                            ep: int) -> None:
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

    from fm_train.convert import convert_checkpoint

    # Verified against the logits the engine computed at save time (at ep2: with the all-to-all). The
    # tokenizer: a small BPE one (the run trained on synthetic ids below VOCAB, so any of <= VOCAB tokens fits).
    from test_checkpoint_support import write_tokenizer

    out = convert_checkpoint(straight[ep], tmp_path / "hf", dtype="fp32", tokenizer=write_tokenizer(tmp_path))
    readme = (out / "README.md").read_text()
    assert "logits match the training engine's own logits" in readme and "Qwen3MoeForCausalLM" in readme
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [0]
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert isinstance(model, Qwen3MoeForCausalLM)
    prompt = torch.tensor([[1, 4, 7, 10]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10)
    # Texts padded to a fixed length with the export's padding (its EOS token), labels -100 at the pads; the
    # router's load-balancing loss joins the fine-tuning loss.
    from fine_tune import fine_tune_padded

    assert AutoTokenizer.from_pretrained(str(out), local_files_only=True).pad_token == "</s>"
    logged = fine_tune_padded(out, tmp_path, output_router_logits=True)
    assert len(logged) >= 4 and all(math.isfinite(v) for v in logged) and logged[-1] < logged[0], logged


@pytest.mark.parametrize("layout", [{"tp": 2, "ep": 2, "zero_stage": 2}, {"pp": 2, "ep": 2, "zero_stage": 1}],
                         ids=["tp2-ep2", "pp2-ep2"])
def test_moe_with_tp_or_pp_trains_like_ep2_converts_and_reshards(tmp_path: Path, straight: dict[int, Path],
                                                                  layout: dict[str, int]) -> None:
    """4 ranks, dp2 x (tp2 or pp2) x ep2: the same global batches as the 2-rank ep2 run, so the same losses;
    the step converts (verified against its own probe) and resumes on the 2-rank ep2 layout."""
    import torch
    from transformers import AutoModelForCausalLM

    from fm_train.convert import convert_checkpoint

    raw = moe_raw(tmp_path / "run", **layout)
    raw["cluster"] = {"workers": 4}
    assert run_distributed(_worker_with_fake_data, world_size=4, args=(raw,), init_process_group=False) == [0] * 4
    want, got = records(straight[2]), records(tmp_path / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for w, g in zip(want, got):
        assert (g["data_receipt"], g["tokens_seen"]) == (w["data_receipt"], w["tokens_seen"])
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5) and g["moe_aux_loss"] == pytest.approx(
            w["moe_aux_loss"], rel=1e-5)
        for key in ("moe_load_max_mean/layer_1", "moe_load_max_mean/layer_2"):  # each from the stage holding it
            assert g[key] == pytest.approx(w[key], rel=1e-5)
    manifest = json.loads((tmp_path / "run/checkpoints/step_00000006/manifest.json").read_text())
    assert manifest["experts"]["params"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2)
                                             for p in ("gate_up_proj", "down_proj")]

    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32", no_tokenizer=True)
    assert "logits match the training engine's own logits" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.generate(torch.tensor([[1, 4, 7, 10]]), max_new_tokens=6, do_sample=False,
                          pad_token_id=0).shape == (1, 10)

    moved = moe_raw(tmp_path / "moved", ep=2)
    moved["checkpoint"] = {**moved["checkpoint"], "resume": str(tmp_path / "run/checkpoints/step_00000003")}
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(moved,), init_process_group=False) == [0, 0]
    for w, g in zip(want[3:], records(tmp_path / "moved")):
        assert (g["step"], g["data_receipt"]) == (w["step"], w["data_receipt"])
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
