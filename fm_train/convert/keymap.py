"""Declarative key maps between DeepSpeed's parameter names, fm_train's model and Hugging Face.

Three name spaces:

* DeepSpeed names (mapped to fm_train names by :mod:`fm_train.deepspeed_adapter.ckpt_names`, which reads the
  manifest's layer table);
* fm_train names: the pure model's state-dict keys (``fm_train.model.LlamaForCausalLM`` ...);
* Hugging Face names: the family's ``transformers`` class's keys (``LlamaForCausalLM`` ...).

Each family spells its templates out (``ModelFamily.hf_key_templates``), also where fm_train's module
names equal Hugging Face's, because the map is the whitelist too: a name outside it is an error,
never silently copied (a renamed module must fail here, not produce a model with missing weights).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import torch

from fm_train.convert.errors import ConvertError
from fm_train.families import DEFAULT_FAMILY, FAMILIES, family_of

# fm_train template -> Hugging Face template ("{i}" is the block index), every family's: a family's
# names are its own (Llama's model.layers.*, an encoder's encoder.layer.*), and an export is checked
# against its family's parameter shapes besides.
FM_TO_HF: dict[str, str] = {src: dst for family in FAMILIES.values() for src, dst in family.hf_key_templates().items()}


def _compile(templates: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), dst)
            for src, dst in templates.items()]


_FM_TO_HF = _compile(FM_TO_HF)
_HF_TO_FM = _compile({v: k for k, v in FM_TO_HF.items()})


def _apply(rules: list[tuple[re.Pattern[str], str]], name: str, what: str) -> str:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    raise ConvertError(f"{what} parameter {name!r} is not in the key map (fm_train/convert/keymap.py)")


def fm_to_hf(name: str) -> str:
    """Hugging Face name of an fm_train parameter name."""
    return _apply(_FM_TO_HF, name, "fm_train")


def hf_to_fm(name: str) -> str:
    """fm_train name of a Hugging Face parameter name."""
    return _apply(_HF_TO_FM, name, "Hugging Face")


def fm_param_shapes(model_fields: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Every parameter fm_train's model has for this shape (built on the meta device: no memory).

    A tied head appears once, as ``model.embed_tokens.weight`` (what Hugging Face stores too).
    """
    return dict(_param_shapes(tuple(sorted(model_fields.items()))))


def hf_param_shapes(model_fields: Mapping[str, Any]) -> dict[str, torch.Size]:
    """:func:`fm_param_shapes` as a Hugging Face dir stores them: the embedding and the head keep
    ``vocab_size`` rows, the tokenizer's vocabulary, without fm_train's vocabulary padding."""
    rows = family_of(model_fields).vocab_row_params()
    vocab = int(model_fields["vocab_size"])
    return {n: torch.Size((vocab, *s[1:])) if n.endswith(rows) else s
            for n, s in fm_param_shapes(model_fields).items()}


def without_padding(name: str, tensor: torch.Tensor, vocab_size: int, family: str | None = None) -> torch.Tensor:
    """``tensor`` (fm_train parameter ``name``) as exported: vocabulary padding rows dropped
    (``family``: ``model.family``, default the default family)."""
    rows = family_of(family or DEFAULT_FAMILY).vocab_row_params()
    return tensor[:vocab_size] if name.endswith(rows) else tensor


@functools.lru_cache(maxsize=8)
def _param_shapes(fields: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, torch.Size], ...]:
    # Cached: a meta build costs seconds the first time (torch imports its meta kernels lazily).
    from fm_train.config import ModelConfig

    family = family_of(dict(fields))
    with torch.device("meta"):
        model = family.build(family.args(ModelConfig(**dict(fields))))
    return tuple((n, p.shape) for n, p in model.named_parameters())  # named_parameters drops tied duplicates
