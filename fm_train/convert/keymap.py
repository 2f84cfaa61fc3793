"""Declarative key maps between DeepSpeed's parameter names, fm_train's model and Hugging Face.

Three name spaces:

* DeepSpeed names (mapped to fm_train names by :mod:`fm_train.deepspeed_adapter.ckpt_names`, which reads the
  manifest's layer table);
* fm_train names: the pure model's state-dict keys (``fm_train.families.llama.model.LlamaForCausalLM`` ...);
* Hugging Face names: the family's ``transformers`` class's keys (``LlamaForCausalLM`` ...).

Each family spells its templates out (``FamilySpec.hf.key_templates``), also where fm_train's module
names equal Hugging Face's, because the map is the whitelist too: a name outside it is an error,
never silently copied (a renamed module must fail here, not produce a model with missing weights).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import torch

from fm_train.convert.errors import ConvertError
from fm_train.families.spec import FamilySpec


def _compile(templates: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), dst)
            for src, dst in templates.items()]


@functools.lru_cache(maxsize=None)
def _rules(family: FamilySpec) -> tuple[list[tuple[re.Pattern[str], str]], list[tuple[re.Pattern[str], str]]]:
    """``family``'s templates compiled both ways: (fm_train -> Hugging Face, Hugging Face -> fm_train)."""
    templates = family.hf.key_templates
    return _compile(templates), _compile({v: k for k, v in templates.items()})


def _apply(rules: list[tuple[re.Pattern[str], str]], name: str, what: str) -> str:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    raise ConvertError(f"{what} parameter {name!r} is not in the key map (the family's hf.key_templates)")


def fm_to_hf(family: FamilySpec, name: str) -> str:
    """Hugging Face name of an fm_train parameter name of a ``family`` model."""
    return _apply(_rules(family)[0], name, "fm_train")


def hf_to_fm(family: FamilySpec, name: str) -> str:
    """fm_train name of a Hugging Face parameter name of a ``family`` model."""
    return _apply(_rules(family)[1], name, "Hugging Face")


def fm_param_shapes(family: FamilySpec, model_fields: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Every parameter fm_train's ``family`` model has for this shape (built on the meta device: no memory).

    A tied head appears once, as the parameter it shares (what Hugging Face stores too).
    """
    return dict(_param_shapes(family, tuple(sorted(model_fields.items()))))


def hf_param_shapes(family: FamilySpec, model_fields: Mapping[str, Any]) -> dict[str, torch.Size]:
    """:func:`fm_param_shapes` as a Hugging Face dir stores them: the embedding and the head keep
    ``vocab_size`` rows, the tokenizer's vocabulary, without fm_train's vocabulary padding."""
    rows = family.vocab_row_params
    vocab = int(model_fields["vocab_size"])
    return {n: torch.Size((vocab, *s[1:])) if n.endswith(rows) else s
            for n, s in fm_param_shapes(family, model_fields).items()}


def without_padding(family: FamilySpec, name: str, tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``tensor`` (fm_train parameter ``name`` of a ``family`` model) as exported: vocabulary padding rows dropped."""
    return tensor[:vocab_size] if name.endswith(family.vocab_row_params) else tensor


@functools.lru_cache(maxsize=8)
def _param_shapes(family: FamilySpec, fields: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, torch.Size], ...]:
    # Cached: a meta build costs seconds the first time (torch imports its meta kernels lazily).
    from fm_train.config import ModelConfig

    with torch.device("meta"):
        model = family.modules().args(ModelConfig(**dict(fields))).build()
    return tuple((n, p.shape) for n, p in model.named_parameters())  # named_parameters drops tied duplicates
