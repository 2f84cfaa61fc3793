"""Check an export against the training engine itself: the logits the live engine computed on the
probe batch at save time (``probe.safetensors``, :mod:`fm_train.checkpoint.probe`).

Unlike the self-comparison of :mod:`fm_train.convert.verify` (Hugging Face's model against fm_train's
model built from the *same* merged tensors), this reference never went through the converter's
merge: tp shards concatenated in the wrong order, pipeline layers renamed wrongly or ZeRO partitions
merged wrongly give Hugging Face logits unlike the engine's, although every name and shape matches.

The tolerance is relative to the largest reference logit and set by the least precise dtype in play
(the training forward's precision and the exported weights'): see
:data:`fm_train.convert.probe.TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from fm_train.checkpoint.probe import FIELDS, PROBE_FILE, summarize
from fm_train.convert.errors import ConvertError
from fm_train.convert.probe import ProbeDiff, compare, tolerance
from fm_train.convert.verify import open_export
from fm_train.families.spec import FamilySpec


@dataclass(frozen=True)
class ProbeReport:
    """What the probe comparison found: the worst field and its difference, and the tensor count."""

    worst: ProbeDiff
    rel_tol: float
    probe_shape: tuple[int, int]
    tensors: int


@torch.no_grad()
def verify_against_probe(family: FamilySpec, out_dir: Path, model_fields: Mapping[str, Any],
                         record: Mapping[str, torch.Tensor], *, precision: str, export_dtype: str) -> ProbeReport:
    """Load ``out_dir`` with the family's auto class (offline, fp32), run the probe's ``input_ids`` and
    compare the summary with ``record``; a :class:`ConvertError` naming the field and difference if not."""
    ids = record["input_ids"]
    with open_export(family, out_dir, model_fields) as (tensors, hf):
        got = summarize(hf(input_ids=ids).logits, ids)
    shapes = {f: (tuple(got[f].shape), tuple(record[f].shape)) for f in FIELDS if got[f].shape != record[f].shape}
    if shapes:
        field, (have, want) = next(iter(shapes.items()))
        raise ConvertError(f"the probe saved with the checkpoint ({PROBE_FILE}) does not belong to its model: {field} "
                           f"has shape {want} there, the model gives {have}; the probe file is damaged or from another "
                           "run (convert with --no-verify only if you trust the checkpoint otherwise)")
    rel_tol = tolerance(precision, export_dtype)
    worst = compare(got, record, rel_tol)
    if not worst.ok:
        raise ConvertError(
            f"verification failed: the exported model's logits do not match the training engine's on the probe "
            f"batch saved with the checkpoint ({PROBE_FILE}): {worst.describe()}; every tensor name and shape "
            f"matched, so some tensor holds another one's values (e.g. tensor-parallel shards or pipeline "
            f"layers out of order, a wrong ZeRO merge or key map)")
    return ProbeReport(worst=worst, rel_tol=rel_tol, probe_shape=tuple(ids.shape), tensors=tensors)
