"""Import a Hugging Face dir of one of fm-train's families for continued pretraining.

Only what fm_train's model computes identically is accepted (the family's ``hf.import_problems``:
for Llama SiLU SwiGLU, default RoPE, no MLP bias, head_dim = hidden / heads). Anything else is refused
by name rather than loaded into a model that would silently compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fm_train.convert.errors import ConvertError
from fm_train.convert.hf_weights import HFWeights
from fm_train.convert.keymap import hf_param_shapes
from fm_train.families.spec import FamilySpec


def _model_fields(family: FamilySpec, cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    if cfg.get("model_type") != family.hf.model_type:
        raise ConvertError(f"{where}: model_type {cfg.get('model_type')!r} is not the {family.name} family's"
                           f" ({family.hf.model_type!r})")
    problems = family.hf.import_problems(cfg)
    if problems:
        raise ConvertError(f"{where}: not importable into fm_train's {family.name} model: " + "; ".join(problems))
    try:
        return family.hf.fields_from_config(cfg)
    except KeyError as exc:
        raise ConvertError(f"{where}/config.json lacks {exc.args[0]!r}") from None


def open_hf(hf_dir: Path, family: FamilySpec) -> tuple[dict[str, Any], HFWeights]:
    """``(model fields for fm_train.config.ModelConfig, lazy weights)`` of a Hugging Face dir of a ``family`` model.

    Reads ``config.json`` and the safetensors headers only; the weights are read later, each rank
    only the slices it holds (:class:`~fm_train.convert.hf_weights.HFWeights`).
    """
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{hf_dir} has no config.json: not a Hugging Face model dir")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"cannot read {cfg_file}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{cfg_file} is not a JSON object")
    fields = _model_fields(family, raw, hf_dir)
    weights = HFWeights(hf_dir, family, want=hf_param_shapes(family, fields), tied=family.tied_params(fields))
    return fields, weights


def import_hf(hf_dir: Path, family: FamilySpec) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model fields for fm_train.config.ModelConfig, state dict)`` of a Hugging Face dir, read whole.

    The state dict has fm_train names and loads with the pure model's ``load_state_dict(strict=True)``
    (a tied head is included as the embedding tensor itself). Tensors keep the stored dtype. Training
    uses :func:`open_hf` instead, which reads only what a rank holds.
    """
    fields, weights = open_hf(hf_dir, family)
    state = {name: weights.read(name) for name in weights.names() if name not in weights.tied}
    for tied, shared in weights.tied.items():
        state[tied] = state[shared]  # the same tensor, as the model shares it
    return fields, state
