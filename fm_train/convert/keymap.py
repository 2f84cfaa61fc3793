"""Declarative key maps between DeepSpeed's parameter names, fm_train's model and Hugging Face.

Three name spaces:

* DeepSpeed names (mapped to fm_train names by :mod:`fm_train.deepspeed_adapter.ckpt_names`, which reads the
  manifest's layer table);
* fm_train names: the pure model's state-dict keys (``fm_train.families.llama.model.LlamaForCausalLM`` ...);
* Hugging Face names: the family's ``transformers`` class's keys (``LlamaForCausalLM`` ...).

Each family spells its templates out (``FamilySpec.hf.key_templates``), also where fm_train's module
names equal Hugging Face's, because the map is the whitelist too: a name outside it is an error,
never silently copied (a renamed module must fail here, not produce a model with missing weights).

Most parameters are one Hugging Face tensor each. A fused expert parameter (``[E, 2F, H]``) is many:
Hugging Face stores each expert's matrices under their own keys (``FamilySpec.hf.expert_pieces``), so
the layout is given as :class:`Piece` s, each naming the part of an fm_train parameter a key holds.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fm_train.convert.errors import ConvertError
from fm_train.families.spec import FamilySpec


@dataclass(frozen=True)
class Piece:
    """The part of fm_train parameter ``name`` one Hugging Face tensor holds: all of it (``row`` None), or
    chunk ``part`` of ``parts`` (along its rows) of expert ``row`` of a fused expert parameter."""

    name: str
    row: int | None = None
    part: int = 0
    parts: int = 1

    def cut(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of ``tensor`` (the whole fm_train parameter)."""
        if self.row is None:
            return tensor
        return tensor[self.row].chunk(self.parts, dim=0)[self.part]

    def shape(self, full: torch.Size) -> torch.Size:
        """This piece's shape, of a parameter of shape ``full``."""
        if self.row is None:
            return full
        return torch.Size((full[1] // self.parts, *full[2:]))


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + escaped + "$")


def _compile(templates: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(_pattern(src), dst) for src, dst in templates.items()]


@functools.lru_cache(maxsize=None)
def _expert_rules(family: FamilySpec) -> tuple[list[tuple[re.Pattern[str], tuple[tuple[str, int, int], ...]]],
                                               list[tuple[re.Pattern[str], str, int, int]]]:
    """``family``'s fused expert templates: (fm_train -> its pieces, Hugging Face piece -> fm_train)."""
    pieces = family.hf.expert_pieces
    forward = [(_pattern(src), tuple(dst)) for src, dst in pieces.items()]
    backward = [(_pattern(hf), src, part, parts) for src, dst in pieces.items() for hf, part, parts in dst]
    return forward, backward


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


def hf_tensors(family: FamilySpec, name: str, shape: torch.Size) -> list[tuple[str, Piece]]:
    """The Hugging Face tensors of fm_train parameter ``name`` (of ``shape``), with the piece each holds."""
    for pattern, pieces in _expert_rules(family)[0]:
        m = pattern.match(name)
        if m:
            return [(template.format(e=row, **m.groupdict()), Piece(name, row, part, parts))
                    for row in range(shape[0]) for template, part, parts in pieces]
    return [(fm_to_hf(family, name), Piece(name))]


def hf_piece(family: FamilySpec, hf_name: str) -> Piece:
    """What part of which fm_train parameter the Hugging Face tensor ``hf_name`` holds."""
    for pattern, template, part, parts in _expert_rules(family)[1]:
        m = pattern.match(hf_name)
        if m:
            groups = m.groupdict()
            return Piece(template.format(i=groups["i"]), int(groups["e"]), part, parts)
    return Piece(hf_to_fm(family, hf_name))


def hf_layout(family: FamilySpec, model_fields: Mapping[str, Any]) -> dict[str, tuple[Piece, torch.Size]]:
    """Every tensor a Hugging Face dir of this model holds: name -> (the piece of fm_train's parameter, its
    shape as stored, without vocabulary padding)."""
    layout: dict[str, tuple[Piece, torch.Size]] = {}
    for name, shape in hf_param_shapes(family, model_fields).items():
        for hf_name, piece in hf_tensors(family, name, shape):
            layout[hf_name] = (piece, piece.shape(shape))
    return layout


def fm_param_shapes(family: FamilySpec, model_fields: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Every parameter fm_train's ``family`` model has for this shape (built on the meta device: no memory).

    A tied head appears once, as the parameter it shares (what Hugging Face stores too).
    """
    return dict(_param_shapes(family, json.dumps(dict(model_fields), sort_keys=True, default=str)))


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
def _param_shapes(family: FamilySpec, fields: str) -> tuple[tuple[str, torch.Size], ...]:
    # Cached: a meta build costs seconds the first time (torch imports its meta kernels lazily).
    from fm_train.config import ModelConfig

    with torch.device("meta"):
        model = family.modules().args(ModelConfig(**json.loads(fields))).build()
    return tuple((n, p.shape) for n, p in model.named_parameters())  # named_parameters drops tied duplicates
