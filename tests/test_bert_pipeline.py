"""The encoder recipe end to end on real shards: the worker pretrains bert-tiny with masked tokens
from the default corpus (dp2, ZeRO-1), the loss falls; the checkpoint converts, with the shards'
tokenizer plus [CLS]/[SEP]/[MASK]/[PAD] (``model.vocab_size: auto``), into a directory ``pipeline("fill-mask")``
runs on; ``fm-train eval`` reports masked-token loss and accuracy on it (and perplexity on a decoder); and
``transformers.Trainer`` fine-tunes it for sequence classification on texts padded to a fixed length,
with a falling loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from test_engine_worker import _worker_real_data

VOCAB = 512  # the session corpus's tokenizer (conftest ``corpus``)
SEQ = 32


def _pretrain(corpus: Path, run_dir: Path, model: dict, steps: int) -> list[dict]:
    raw = {"run": {"name": "pipeline", "dir": str(run_dir), "seed": 3}, "model": model,
           "parallel": {"zero_stage": 1}, "precision": "fp32",
           "data": {"sources": [{"path": str(corpus)}], "seq_len": SEQ, "num_workers": 0, "val_fraction": 0.05},
           "train": {"steps": steps, "micro_batch": 8, "log_every": 10, "eval_every": steps // 2, "eval_batches": 2},
           "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5, "weight_decay": 0.01},
           "checkpoint": {"every": 0, "keep": 1}, "cluster": {"workers": 2}, "logging": {"tensorboard": False}}
    assert run_distributed(_worker_real_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoder(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list[str]]:
    """``(converted dir, the pretraining's metrics records, the conversion's progress lines)``."""
    from fm_train.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("encoder")
    records = _pretrain(corpus, root / "run", {"preset": "bert-tiny", "vocab_size": "auto", "max_seq_len": SEQ}, 60)
    lines: list[str] = []
    out = convert_checkpoint(root / "run", root / "hf", dtype="fp32", progress=lines.append)
    return out, records, lines


@pytest.mark.multiproc
def test_an_encoder_pretrains_on_shards_and_fills_masks(encoder) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    out, records, lines = encoder
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    # Logged from step 10; by step 60 at least half a nat under chance (ln 512 = 6.24): the token statistics.
    assert losses[-1] < math.log(VOCAB) - 0.5 and losses[-1] < losses[0], losses
    assert len(vals) == 2 and vals[-1] < vals[0], vals
    assert any("verified against the engine's probe" in line for line in lines), lines
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id, tokenizer.pad_token_id] == [
        VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3]
    # model.vocab_size: auto = the shards' 512 tokens + the 4 specials, resolved once and recorded as a number.
    run = out.parent / "run"
    assert "vocab_size: 516" in (run / "config.resolved.yaml").read_text()
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert json.loads((step / "manifest.json").read_text())["config"]["model"]["vocab_size"] == VOCAB + 4
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["pad_token_id"]) == (VOCAB + 4, VOCAB + 3)  # [PAD] is BERT's padding_idx
    assert tokenizer.padding_side == "right" and "## Padding" in (out / "README.md").read_text()
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True),
                    tokenizer=tokenizer)
    guesses = fill(f"import os{tokenizer.mask_token}path", top_k=3)
    assert len(guesses) == 3 and all(0 <= g["score"] <= 1 and g["token"] < VOCAB for g in guesses), guesses


@pytest.mark.multiproc
def test_eval_reports_masked_token_loss_and_accuracy(encoder, corpus: Path, capsys) -> None:
    from fm_train.cli import main

    out, records, _ = encoder
    assert main(["eval", str(out), "--data", str(corpus), "--val-fraction", "0.05", "--batches", "4",
                 "--micro-batch", "8", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["family"] == "bert" and result["batches"] == 4
    assert result["tokens"] == 4 * 8 * round(0.15 * (SEQ - 2))  # BERT's fixed share of each window
    # The same held-out batches training evaluated on at its end (val_fraction, seed), by another code path.
    assert result["loss"] == pytest.approx(records[-1]["val_loss"], rel=0.05)
    assert 0 < result["masked_accuracy"] < 1 and "fm-train eval" in captured.err  # the progress bar


@pytest.mark.multiproc
def test_eval_reports_a_decoder_s_perplexity(corpus: Path, tmp_path: Path, capsys) -> None:
    from fm_train.cli import main
    from fm_train.convert import convert_checkpoint

    records = _pretrain(corpus, tmp_path / "run", {"preset": "tiny", "vocab_size": "auto", "n_layers": 2,
                                                    "max_seq_len": SEQ}, 20)
    assert "vocab_size: 512," in (tmp_path / "run" / "config.resolved.yaml").read_text()  # auto: the shards' 512
    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32", progress=lambda line: None)
    assert main(["eval", str(out), "--data", str(corpus), "--val-fraction", "0.05", "--batches", "2", "--seed", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["family"] == "llama" and result["tokens"] == 2 * 8 * SEQ
    assert result["loss"] == pytest.approx(records[-1]["val_loss"], rel=0.05)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    from launcher.steps import main as step  # what `fm-train launch` prints after converting

    assert step(["sample", str(out), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip().startswith("def")


@pytest.mark.multiproc
def test_the_encoder_fine_tunes_for_classification_with_the_trainer(encoder, corpus: Path, tmp_path: Path) -> None:
    """Texts of the corpus (label 0) against texts of tokens drawn uniformly from its vocabulary (label 1),
    of different lengths, tokenized as a user does: ``padding="max_length"`` with the export's [PAD] and
    attention mask. Learnt from the token statistics within a few epochs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    import data_shards

    out, _, _ = encoder
    stream = data_shards.make_val_loader([(str(corpus), 1.0)], seq_len=SEQ, micro_batch=64, dp_rank=0, dp_size=1,
                                         seed=0, val_fraction=0.05, max_batches=1)
    windows = next(iter(stream))["input_ids"]
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(len(windows)) % 2
    lengths = torch.randint(6, SEQ // 2, (len(windows),), generator=gen)
    rows = [torch.randint(1, VOCAB, (SEQ,), generator=gen) if y else w for w, y in zip(windows, labels)]
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = [tokenizer.decode(r[:n]) for r, n in zip(rows, lengths)]
    batch = tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True)
    masks = torch.tensor(batch["attention_mask"])
    assert (masks == 0).any() and (torch.tensor(batch["input_ids"])[masks == 0] == VOCAB + 3).all()  # [PAD], masked
    examples = [{"input_ids": ids, "attention_mask": mask, "labels": int(y)}
                for ids, mask, y in zip(batch["input_ids"], batch["attention_mask"], labels)]
    model = AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=2, local_files_only=True)
    args = TrainingArguments(output_dir=str(tmp_path / "ft"), per_device_train_batch_size=16, num_train_epochs=8,
                             learning_rate=5e-4, logging_steps=4, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(logged) >= 4 and logged[-1] < logged[0] - 0.2, logged


@pytest.mark.multiproc
def test_the_launcher_s_sample_step_fills_a_mask_for_an_encoder(encoder, capsys) -> None:
    from launcher.steps import main

    out, _, _ = encoder
    assert main(["sample", str(out), "--prompt", "import os"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fill-mask 'import os[MASK]': ") and line.count(",") >= 4, line
