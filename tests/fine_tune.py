"""Fine-tuning a converted decoder as a user would: texts tokenized with ``padding="max_length"`` by the
export's own tokenizer, labels -100 at the pads, ``transformers.Trainer`` on CPU."""

from __future__ import annotations

from pathlib import Path

TEXTS = ["def f(x): return x + 1", "import os, sys", "hello world", "def f(x):", "import os",
         "hello world def f(x): return x + 1", "return x", "import sys, os"]


def fine_tune_padded(model_dir: Path, work_dir: Path, *, max_length: int = 16, epochs: int = 4,
                     **model_config: object) -> list[float]:
    """The losses ``Trainer`` logged while fine-tuning ``model_dir`` (an ``AutoModelForCausalLM`` export) on
    :data:`TEXTS` padded to ``max_length``; ``model_config``: attributes set on the model's config first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    batch = tokenizer(TEXTS * 2, padding="max_length", max_length=max_length, truncation=True)
    masks = torch.tensor(batch["attention_mask"])
    assert (masks == 0).any(), "every text filled max_length: nothing was padded"
    assert (torch.tensor(batch["input_ids"])[masks == 0] == tokenizer.pad_token_id).all()
    examples = [{"input_ids": ids, "attention_mask": mask,
                 "labels": [token if keep else -100 for token, keep in zip(ids, mask)]}
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    for key, value in model_config.items():
        setattr(model.config, key, value)
    args = TrainingArguments(output_dir=str(work_dir / "ft"), per_device_train_batch_size=4, num_train_epochs=epochs,
                             learning_rate=3e-3, logging_steps=2, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]
