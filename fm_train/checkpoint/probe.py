"""The probe: reference logits the training engine computed at save time, kept in the step directory.

A fixed batch of token ids (:func:`probe_tokens`: 2 rows of up to 32 tokens from a seeded generator,
the same for every layout) goes through the live engine at every save
(:mod:`fm_train.checkpoint.probe_engine`). What is kept is a summary exact enough to catch any weight
in the wrong place, small enough for every save (:func:`summarize`):

- ``logits``: the full vocabulary logits of a few positions (first, middle, last), ``(B, K, V)``;
- ``logsumexp``: per row and position, the log-sum-exp over the vocabulary, ``(B, T)``;
- ``token_logits``: per row and position, the logit of the next probe token, ``(B, T - 1)``;

plus ``input_ids`` and ``positions`` themselves, so a reader never regenerates them. Stored as
``probe.safetensors`` (plain tensors, no pickle), named by the manifest's ``probe`` field and covered
by its checksums like every other file of the step.

A reader (the converter) reads it back and compares it with its own model's logits:
:mod:`fm_train.convert.probe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

PROBE_FILE = "probe.safetensors"
PROBE_SEED = 20261128
PROBE_ROWS = 2
PROBE_MAX_LEN = 32
FIELDS = ("logits", "logsumexp", "token_logits")


def probe_tokens(vocab_size: int, max_seq_len: int, multiple: int = 1) -> torch.Tensor:
    """Fixed token ids, ``PROBE_ROWS x min(PROBE_MAX_LEN, max_seq_len)``, from a private seeded generator.

    ``multiple``: the length is a multiple of it (rounded down, and at least ``multiple`` within
    ``max_seq_len``), for layouts that split the sequence (sp, and tp with its sequence split). A private
    ``torch.Generator``: drawing them never moves the global RNG the training uses.
    """
    length = min(PROBE_MAX_LEN, max_seq_len) // multiple * multiple
    if length == 0:
        length = multiple if multiple <= max_seq_len else min(PROBE_MAX_LEN, max_seq_len)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (PROBE_ROWS, length), generator=gen)


def probe_positions(seq_len: int) -> torch.Tensor:
    """The positions whose full logits are kept: first, middle and last (fewer when the batch is short)."""
    return torch.tensor(sorted({0, seq_len // 2, seq_len - 1}), dtype=torch.int64)


def summarize(logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The probe record of full-vocabulary ``logits`` ``(B, T, V)`` on ``input_ids`` ``(B, T)``, in fp32."""
    logits = logits.detach().float().cpu()
    input_ids = input_ids.cpu()
    positions = probe_positions(input_ids.shape[1])
    nxt = input_ids[:, 1:].unsqueeze(-1)
    return {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "positions": positions,
        "logits": logits[:, positions, :].contiguous(),
        "logsumexp": torch.logsumexp(logits, dim=-1).contiguous(),
        "token_logits": logits[:, :-1, :].gather(-1, nxt).squeeze(-1).contiguous(),
    }


def write_probe(step_dir: Path, record: Mapping[str, torch.Tensor], *, precision: str) -> Path:
    """Write ``record`` (from :func:`summarize`) as ``step_dir/probe.safetensors``; returns the file."""
    from safetensors.torch import save_file

    path = Path(step_dir) / PROBE_FILE
    save_file(dict(record), str(path), metadata={"format": "fm-train-probe", "version": "1", "precision": precision})
    return path


def manifest_entry(record: Mapping[str, torch.Tensor], *, precision: str) -> dict[str, Any]:
    """The manifest's ``probe`` field for ``record``: the file, its batch shape and the forward's precision."""
    return {"file": PROBE_FILE, "input_shape": list(record["input_ids"].shape),
            "positions": record["positions"].tolist(), "precision": precision}
