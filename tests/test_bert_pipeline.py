"""An encoder end to end on real shards: the worker pretrains bert-tiny with masked tokens from the
default corpus (dp2, ZeRO-1), the loss falls, and the checkpoint converts, with the shards'
tokenizer plus [CLS]/[SEP]/[MASK], into a directory ``pipeline("fill-mask")`` runs on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distributed import run_distributed
from test_engine_worker import _worker_real_data

VOCAB = 512  # the session corpus's tokenizer (conftest ``corpus``)


@pytest.mark.multiproc
def test_an_encoder_pretrains_on_shards_and_fills_masks(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from fm_train.convert import convert_checkpoint

    raw = {"run": {"name": "bert", "dir": str(tmp_path / "run"), "seed": 3},
           "model": {"preset": "bert-tiny", "vocab_size": VOCAB + 3, "max_seq_len": 32},
           "parallel": {"zero_stage": 1}, "precision": "fp32",
           "data": {"sources": [{"path": str(corpus)}], "seq_len": 32, "num_workers": 0, "val_fraction": 0.05},
           "train": {"steps": 60, "micro_batch": 8, "log_every": 10, "eval_every": 30, "eval_batches": 2},
           "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5, "weight_decay": 0.01},
           "checkpoint": {"every": 0, "keep": 1}, "cluster": {"workers": 2}, "logging": {"tensorboard": False}}
    assert run_distributed(_worker_real_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    # Logged from step 10; by step 60 at least half a nat under chance (ln 512 = 6.24): the token statistics.
    assert losses[-1] < math.log(VOCAB) - 0.5 and losses[-1] < losses[0], losses
    assert len(vals) == 2 and vals[-1] < vals[0], vals

    lines: list[str] = []
    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32", progress=lines.append)
    assert any("verified against the engine's probe" in line for line in lines), lines
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id] == [VOCAB, VOCAB + 1, VOCAB + 2]
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True),
                    tokenizer=tokenizer)
    guesses = fill(f"import os{tokenizer.mask_token}path", top_k=3)
    assert len(guesses) == 3 and all(0 <= g["score"] <= 1 and g["token"] < VOCAB for g in guesses), guesses
