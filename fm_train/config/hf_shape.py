"""The model shape a Hugging Face dir declares in its ``config.json`` (for ``model.init_from``).

Torch-free, so the config loader can read it: the shape of a continued-pretraining run comes from
the checkpoint (its family from ``model_type``, the fields from the family's
``ModelFamily.fields_from_hf``), and a field set to something else is reported by name
(``fm_train.config.rules``). The weights themselves are read later, by ``fm_train.convert.hf_import``,
which also refuses architectures fm_train's model does not compute identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Fields a run may set differently from the checkpoint: only the RoPE table length, so that
#: continued pretraining can train on longer (or shorter) sequences than the checkpoint saw.
FREE_FIELDS: frozenset[str] = frozenset({"max_seq_len"})


def hf_config_file(hf_dir: str | Path) -> Path:
    """Where ``hf_dir``'s ``config.json`` is."""
    return Path(hf_dir) / "config.json"


def read_hf_shape(hf_dir: str | Path) -> dict[str, Any]:
    """ModelConfig fields (``family`` included) of the model in ``hf_dir``; ``ValueError`` naming the problem."""
    from fm_train.families import FAMILIES, family_of_hf

    path = hf_config_file(hf_dir)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    family = family_of_hf(raw.get("model_type"))
    if family is None:
        known = ", ".join(f.hf_model_type for f in FAMILIES.values())
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not one fm-train trains ({known})")
    try:
        return family.fields_from_hf(raw)
    except KeyError as exc:
        raise ValueError(f"{path} lacks {exc.args[0]!r}") from None


def hf_key_of(field: str, family: str) -> str:
    """The ``config.json`` key ``model.field`` comes from, for error messages."""
    from fm_train.families import family_of

    return "model_type" if field == "family" else family_of(family).hf_config_keys.get(field, field)
