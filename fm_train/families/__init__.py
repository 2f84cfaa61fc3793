"""Model families, looked up by ``model.family``: the one place that knows which family a run trains.

See :mod:`fm_train.families.base` for what a family provides. The engine, checkpoints, planner and
converter call ``family_of(cfg.model)`` and nothing family-specific; a new family is a new module
here plus its pure model, registered in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any, Mapping

from fm_train.families.base import LossFn, ModelFamily
from fm_train.families.bert import BertFamily
from fm_train.families.llama import LlamaFamily

#: ``model.family`` -> the family object.
FAMILIES: dict[str, ModelFamily] = {"llama": LlamaFamily(), "bert": BertFamily()}
#: What a manifest written before ``model.family`` existed trained.
DEFAULT_FAMILY = "llama"


def family_of(model: Any) -> ModelFamily:
    """The family of a ``model`` config section, a manifest's model fields (a mapping), or a family name."""
    if isinstance(model, str):
        name = model
    elif isinstance(model, Mapping):
        name = model.get("family", DEFAULT_FAMILY)
    else:
        name = getattr(model, "family", DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not a known model family; use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_hf(model_type: str | None) -> ModelFamily | None:
    """The family whose Hugging Face models have ``config.json`` ``model_type`` (None: no family does)."""
    return next((f for f in FAMILIES.values() if f.hf_model_type == model_type), None)


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "LossFn", "ModelFamily", "family_of", "family_of_hf"]
