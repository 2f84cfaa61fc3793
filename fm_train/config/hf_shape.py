"""The model shape a Hugging Face dir declares in its ``config.json`` (for ``model.init_from``).

Torch-free, so the config loader can read it before validation: the shape of a continued-pretraining
run comes from the checkpoint (its family from ``model_type``, the fields from the family's Hugging
Face side, asked through :mod:`fm_train.config.family_rules`), and a field set to something else is
reported by name (``fm_train.config.rules``). The weights themselves are read later, by
``fm_train.convert.hf_import``, which also refuses architectures fm_train's model does not compute
identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fm_train.config.family_rules import family_rules

#: Fields a run may set differently from the checkpoint: only the RoPE table length, so that
#: continued pretraining can train on longer (or shorter) sequences than the checkpoint saw.
FREE_FIELDS: frozenset[str] = frozenset({"max_seq_len"})


def hf_config_file(hf_dir: str | Path) -> Path:
    """Where ``hf_dir``'s ``config.json`` is."""
    return Path(hf_dir) / "config.json"


def read_hf_shape(hf_dir: str | Path) -> dict[str, Any]:
    """ModelConfig fields (``family`` included) of the model in ``hf_dir``; ``ValueError`` naming the problem."""
    path = hf_config_file(hf_dir)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    return family_rules().fields_from_hf(raw, str(path))


def hf_key_of(field: str, family: str) -> str:
    """The ``config.json`` key ``model.field`` comes from, for error messages."""
    return "model_type" if field == "family" else family_rules().hf_key(family, field)


def shape_from_init_from(model: Any) -> Any:
    """The raw ``model`` section with the shape fields the user did not set filled from ``init_from``'s
    ``config.json`` (when readable). Never raises: an unreadable dir or a conflicting field is reported
    by the load-time rules, with the field's name (``fm_train.config.rules``)."""
    if not isinstance(model, dict) or not model.get("init_from") or not isinstance(model["init_from"], str):
        return model
    if not hf_config_file(model["init_from"]).is_file():
        return model
    try:
        shape = read_hf_shape(model["init_from"])
    except ValueError:
        return model
    if model.get("vocab_size") == "auto":  # auto takes the checkpoint's vocabulary, not the shards'
        model = {k: v for k, v in model.items() if k != "vocab_size"}
    return {**shape, **model}
