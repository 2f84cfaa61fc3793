"""Reading the probe back and comparing with it: the verification side of
:mod:`fm_train.checkpoint.probe` (which the save writes).

A reader (the converter) recomputes :func:`fm_train.checkpoint.probe.summarize` from its own model's
logits on ``input_ids`` and compares with :func:`compare`, within :func:`tolerance` of the dtypes involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from data_shards.safe_paths import UnsafePathError, resolve_under
from fm_train.checkpoint.layout import MANIFEST, CheckpointError
from fm_train.checkpoint.probe import FIELDS, PROBE_MAX_LEN, PROBE_ROWS, probe_positions

# Largest allowed |difference| relative to max(1, max |reference logit|), by the least precise dtype in
# play (the engine's forward precision and the exported weights'). fp32 both sides differs only by
# arithmetic order (up to 1e-6 measured); bf16 rounds weights and activations (up to 6e-3 measured on
# the tests' models). A swapped or misplaced tensor moves logits by the order of the logits themselves.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}


def read_probe(step_dir: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The probe record the manifest names, checked field by field (:func:`check_probe`), or None for a
    checkpoint saved without one. A file that is not such a record is a :class:`CheckpointError` naming it."""
    entry = manifest.get("probe")
    if not entry:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        path = resolve_under(step_dir, entry.get("file") if isinstance(entry, Mapping) else None,
                             what=f"{Path(step_dir) / MANIFEST}: probe.file", strict=True)
        record = load_file(str(path))
    except (UnsafePathError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read the probe of {step_dir}: {exc}") from None
    check_probe(record, path)
    return record


def check_probe(record: Mapping[str, torch.Tensor], where: Path) -> None:
    """Refuse a probe record whose fields are missing or do not fit together (shapes, dtypes, positions),
    naming the field: the comparison that follows would otherwise fail with a misleading message."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where} is not a probe fm-train wrote: {why}; the step's probe is damaged, convert "
                               "with --no-verify only if you trust the checkpoint otherwise")

    missing = [k for k in ("input_ids", "positions", *FIELDS) if k not in record]
    if missing:
        raise bad(f"no tensor {', '.join(missing)}")
    ids = record["input_ids"]
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.shape[1] < 2 or ids.numel() > PROBE_ROWS * PROBE_MAX_LEN:
        raise bad(f"input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}, not up to "
                  f"{PROBE_ROWS} x {PROBE_MAX_LEN} int64 token ids")
    rows, length = ids.shape
    if not torch.equal(record["positions"], probe_positions(length)):
        raise bad(f"positions {record['positions'].tolist()} are not {probe_positions(length).tolist()}")
    want = {"logits": (rows, len(probe_positions(length))), "logsumexp": (rows, length),
            "token_logits": (rows, length - 1)}
    for field, shape in want.items():
        have = record[field]
        if not have.is_floating_point() or tuple(have.shape[:len(shape)]) != shape or \
                have.dim() != len(shape) + (field == "logits"):
            raise bad(f"{field} has shape {tuple(have.shape)} ({have.dtype}), expected {shape}"
                      + (" x vocabulary" if field == "logits" else "") + " floating point")


def tolerance(*dtypes: str) -> float:
    """The relative tolerance of a comparison whose sides involve ``dtypes`` (the least precise wins)."""
    return max(TOLERANCES[d] for d in dtypes)


@dataclass(frozen=True)
class ProbeDiff:
    """The worst difference between two probe records: in which field, where, how large, against what bound."""

    field: str
    index: tuple[int, ...]
    max_abs_diff: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound  # False for NaN too

    def describe(self) -> str:
        return f"{self.field}{list(self.index)}: max abs diff {self.max_abs_diff:.3g} (allowed {self.bound:.3g})"


def compare(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], rel_tol: float) -> ProbeDiff:
    """The worst field of ``got`` against the reference ``want``; the bound is ``rel_tol * max(1, max|logit|)``.

    One bound for every field: log-sum-exp and token logits live on the scale of the logits.
    """
    if not torch.equal(got["input_ids"], want["input_ids"]):
        raise ValueError("probe records of different input batches cannot be compared")
    bound = rel_tol * max(1.0, want["logits"].abs().max().item())
    diffs = []
    for name in FIELDS:
        if got[name].shape != want[name].shape:
            return ProbeDiff(name, tuple(got[name].shape), float("inf"), bound)
        diff = torch.nan_to_num((got[name].float() - want[name].float()).abs(), nan=float("inf"))
        flat = int(diff.argmax().item())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        diffs.append(ProbeDiff(name, index, diff.max().item(), bound))
    return max(diffs, key=lambda d: d.max_abs_diff)
