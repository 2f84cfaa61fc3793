"""The model-family registry: which families exist, and resolving one by name or Hugging Face ``model_type``.

A family is one folder here (``llama/``, ``bert/``) exposing a :class:`~fm_train.families.spec.FamilySpec`
as ``SPEC``, and one line in :data:`FAMILIES`. Entry points (the worker, the commands, the launcher,
the conversion of a checkpoint, ``fm-train eval``) resolve the family once with :func:`family_of` and pass the spec to what needs it; nothing below them
looks a family up. The registry also serves the config loader's family rules
(:mod:`fm_train.config.family_rules`), registered by ``fm_train/__init__.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

from fm_train.families import bert, llama, qwen3_moe
from fm_train.families.spec import FamilySpec, HuggingFace, LossFn, Modules, Objective, Sizes

#: ``model.family`` -> the family.
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (llama.SPEC, bert.SPEC, qwen3_moe.SPEC)}


def family_of(model: Any) -> FamilySpec:
    """The family of a ``model`` config section, a manifest's model fields (a mapping), or a family name.

    ``ValueError`` naming ``model.family`` when it is missing or unknown: no fallback (a ``ModelConfig``
    always has one, its documented default ``llama``; a manifest or a mapping without one is refused).
    """
    if isinstance(model, str):
        name: Any = model
    elif isinstance(model, Mapping):
        name = model.get("family")
    else:
        name = getattr(model, "family", None)
    if name not in FAMILIES:
        said = " is missing" if name is None else f"={name!r} is not a known model family"
        raise ValueError(f"model.family{said}; use one of {list(FAMILIES)}")
    return FAMILIES[name]


def family_of_hf(model_type: str | None) -> FamilySpec | None:
    """The family whose Hugging Face models have ``config.json`` ``model_type`` (None: no family does)."""
    return next((f for f in FAMILIES.values() if f.hf.model_type == model_type), None)


class ConfigRules:
    """The registry as the config loader asks it (:class:`fm_train.config.family_rules.FamilyRules`)."""

    def names(self) -> tuple[str, ...]:
        """The registered family names, in registry order."""
        return tuple(FAMILIES)

    def config_errors(self, cfg: Any) -> list[str]:
        """The rules of ``cfg``'s family on it."""
        return family_of(cfg.model).sizes.config_errors(cfg)

    def fields_from_hf(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``model`` fields of the family whose ``model_type`` ``raw`` names; ``ValueError`` naming the problem."""
        family = family_of_hf(raw.get("model_type"))
        if family is None:
            known = ", ".join(f.hf.model_type for f in FAMILIES.values())
            raise ValueError(f"{where}: model_type {raw.get('model_type')!r} is not one fm-train trains ({known}: the"
                             " architectures its families compute exactly); continue from a checkpoint of one of them,"
                             " or set model.init_from: null to train from scratch")
        try:
            return family.hf.fields_from_config(raw)
        except KeyError as exc:
            raise ValueError(f"{where} lacks {exc.args[0]!r}") from None

    def hf_key(self, family: str, field: str) -> str:
        """The ``config.json`` key ``model.<field>`` comes from in ``family``."""
        return family_of(family).hf.config_keys.get(field, field)


__all__ = ["FAMILIES", "ConfigRules", "FamilySpec", "HuggingFace", "LossFn", "Modules", "Objective", "Sizes",
           "family_of", "family_of_hf"]
