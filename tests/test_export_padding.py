"""What an export pads with, written by the converter's real writer (tiny random weights, the session
corpus's real tokenizer): an encoder's [PAD] (a row of its own, BERT's padding_idx), and an encoder
trained before fm-train gave it one (model.vocab_size = the tokenizer's + 3): exported without a
padding token, saying so and how to add one, which then works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
VOCAB = 512  # the session corpus's tokenizer


def _bert_export(out: Path, corpus: Path, vocab_size: int, said: list[str]) -> Path:
    from fm_train.config import ModelConfig
    from fm_train.convert import write_hf_dir
    from fm_train.families import family_of

    cfg = ModelConfig(family="bert", n_layers=1, hidden=32, n_heads=2, n_kv_heads=2, ffn_hidden=64,
                      vocab_size=vocab_size, max_seq_len=32, vocab_multiple=1)
    family = family_of(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02
             for k, v in family.modules().args(cfg).build().state_dict().items()}
    manifest = {"config": {"model": cfg.model_dump(), "run": {"name": "t"}}, "step": 1, "tokens_seen": 1,
                "topology": {}, "versions": {}}

    def readme(tmp: Path, verified: str) -> None:
        from fm_train.convert.hf_files import write_readme

        write_readme(tmp, manifest, architecture="BertForMaskedLM", dtype="fp32", source="test", note="",
                     verified=verified)

    return write_hf_dir(out, family, cfg.model_dump(), state.__getitem__, dtype="fp32", verify=False,
                        tokenizer=corpus / "tokenizer", readme=readme, progress=said.append)


def test_an_encoder_exports_pad_as_bert_does(tmp_path: Path, corpus: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = _bert_export(tmp_path / "hf", corpus, VOCAB + 4, [])
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == ("[PAD]", VOCAB + 3, "right")
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert (written["pad_token"], written["padding_side"]) == ("[PAD]", "right")
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == VOCAB + 3
    batch = tok(["import os", "def f(x): return x"], padding="max_length", max_length=16, return_tensors="pt")
    assert (batch["input_ids"][batch["attention_mask"] == 0] == VOCAB + 3).all()
    model = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():  # padding is masked: a text's logits do not depend on how far it was padded
        short = model(**tok(["import os"], padding="max_length", max_length=8, return_tensors="pt")).logits
        long = model(**tok(["import os"], padding="max_length", max_length=16, return_tensors="pt")).logits
    n = int(tok(["import os"], return_tensors="pt")["input_ids"].shape[1])
    torch.testing.assert_close(short[:, :n], long[:, :n], rtol=1e-4, atol=1e-5)


def test_an_encoder_trained_without_pad_exports_without_one_and_says_how_to_add_it(tmp_path: Path,
                                                                                  corpus: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    said: list[str] = []
    out = _bert_export(tmp_path / "hf", corpus, VOCAB + 3, said)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.pad_token is None and [tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [512, 513, 514]
    assert json.loads((out / "config.json").read_text()).get("pad_token_id") is None  # not a real token's row
    note = next(line for line in said if line.startswith("Padding: none"))
    assert "add_special_tokens({'pad_token': '[PAD]'})" in note and note in (out / "README.md").read_text()
    # What the note says, done: padded batches then work.
    tok.add_special_tokens({"pad_token": "[PAD]"})
    model = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True)
    model.resize_token_embeddings(len(tok))
    batch = tok(["import os", "def f(x): return x"], padding="max_length", max_length=16, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert torch.isfinite(model(**batch, labels=labels).loss)
