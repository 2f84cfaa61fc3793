"""Continued pretraining: ``model.init_from`` starts every layout from a Hugging Face Llama's weights.

A tiny ``transformers.LlamaForCausalLM`` (random weights, untied head) is saved with
``save_pretrained``; the worker then trains one step from it on 2 gloo ranks as dp2 ZeRO-2, dp2
ZeRO-3, tp2 and pp2 (each rank reading only its slices of the checkpoint), and its first logged loss must equal the HF model's own loss on the same global
batch. Config loading takes the shape from config.json and names a conflicting field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest

from distributed import run_distributed

VOCAB, SEQ, MICRO = 512, 32, 2
HF_SHAPE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,  # vocab_size: per test
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
                # Wide init: the HF model's loss is then far from ln(VOCAB), where fm-train's own
                # seeded init (std 0.02) starts, so a run that ignored init_from could not pass.
                initializer_range=0.3)
LAYOUTS = {"dp2-zero2": {"zero_stage": 2}, "dp2-zero3": {"zero_stage": 3}, "tp2": {"tp": 2, "zero_stage": 1},
           "pp2": {"pp": 2, "zero_stage": 1},
           # A tokenizer's 1001 tokens: the checkpoint's embedding and head are read into 1024 padded rows.
           "tp2-vocab1001": {"tp": 2, "zero_stage": 1}, "dp2-zero3-vocab1001": {"zero_stage": 3}}
VOCABS = {"tp2-vocab1001": 1001, "dp2-zero3-vocab1001": 1001}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """``hf_dirs(vocab)``: a tiny HF Llama with that vocabulary, saved once per module."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict[int, Path] = {}

    def get(vocab: int = VOCAB) -> Path:
        if vocab not in made:
            torch.manual_seed(3)
            made[vocab] = tmp_path_factory.mktemp("hf") / f"tiny-llama-{vocab}"
            LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **HF_SHAPE)).save_pretrained(made[vocab])
        return made[vocab]

    return get


@pytest.fixture(scope="module")
def hf_dir(hf_dirs) -> Path:
    return hf_dirs(VOCAB)


def _tokens(dp_rank: int, vocab: int = VOCAB):
    import torch

    return torch.randint(0, vocab, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(50 + dp_rank))


def _batches(dp_rank: int, vocab: int) -> Iterator[dict[str, Any]]:
    tokens = _tokens(dp_rank, vocab)
    while True:
        yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "state": {}, "receipt": ""}


def raw_config(hf: Path, run_dir: Path, parallel: dict[str, Any]) -> dict[str, Any]:
    """A run that names no shape field: the shape comes from ``hf``'s config.json."""
    return {"run": {"dir": str(run_dir), "seed": 1}, "model": {"init_from": str(hf)}, "precision": "fp32",
            "parallel": parallel, "cluster": {"workers": 2}, "data": {"seq_len": SEQ},
            "train": {"steps": 1, "micro_batch": MICRO, "eval_every": 0, "log_every": 1},
            "optim": {"warmup_steps": 0}, "checkpoint": {"every": 0}, "logging": {"tensorboard": False}}


def _worker(raw: dict[str, Any]) -> int:
    from fm_train.config import build_config
    from fm_train.engine import data as engine_data
    from fm_train.worker import run_worker

    cfg = build_config(raw, require_paths=True)
    engine_data.prepare_sources = lambda cfg, family, is_rank0: []
    engine_data.check_sources = lambda cfg, sources: None
    engine_data.train_batches = lambda cfg, sources, dp_rank, dp_size, state, **_: _batches(dp_rank, cfg.model.vocab_size)
    engine_data.val_batches = lambda cfg, sources, dp_rank, dp_size, **_: (lambda: [])
    return run_worker(cfg)


def hf_loss(hf: Path, dp: int, vocab: int = VOCAB) -> float:
    """The HF model's mean next-token loss over the global batch (every dp rank's micro-batch)."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf, local_files_only=True, torch_dtype=torch.float32).eval()
    tokens = torch.cat([_tokens(r, vocab) for r in range(dp)])
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1)).item()


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_first_loss_equals_the_hf_models_loss(hf_dirs, tmp_path, layout):
    run_dir, vocab = tmp_path / layout, VOCABS.get(layout, VOCAB)
    hf_dir = hf_dirs(vocab)
    assert run_distributed(_worker, world_size=2, args=(raw_config(hf_dir, run_dir, LAYOUTS[layout]),)) == [0, 0]
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in line][0]
    dp = 2 // (LAYOUTS[layout].get("tp", 1) * LAYOUTS[layout].get("pp", 1))
    want = hf_loss(hf_dir, dp, vocab)
    assert first["loss"] == pytest.approx(want, rel=1e-5), f"{layout}: first loss {first['loss']} != HF {want}"
    assert abs(want - math.log(vocab)) > 0.5, "the HF weights must be told apart from a seeded start"


def test_shape_comes_from_config_json(hf_dir, tmp_path):
    from fm_train.config import build_config

    cfg = build_config(raw_config(hf_dir, tmp_path, {"zero_stage": 2}), require_paths=True)
    m = cfg.model
    assert (m.n_layers, m.hidden, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab_size, m.tie_embeddings) == \
        (2, 64, 4, 2, 172, VOCAB, False)


def test_a_conflicting_field_is_named(hf_dir, tmp_path):
    from fm_train.config import ConfigError, build_config

    raw = raw_config(hf_dir, tmp_path, {"zero_stage": 2})
    raw["model"]["hidden"] = 128
    with pytest.raises(ConfigError, match=r"model\.hidden=128 conflicts with model\.init_from .*hidden_size=64"):
        build_config(raw, require_paths=True)
    raw["model"] = {"init_from": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"model\.init_from=.*nowhere.* has no config\.json"):
        build_config(raw, require_paths=True)
