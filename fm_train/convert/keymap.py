"""Declarative key maps between DeepSpeed's parameter names, fm_train's model and Hugging Face.

Three name spaces:

* DeepSpeed names (mapped to fm_train names by :mod:`fm_train.checkpoint.ds_names`, which reads the
  manifest's layer table);
* fm_train names: ``fm_train.model.LlamaForCausalLM`` state-dict keys;
* Hugging Face names: ``LlamaForCausalLM`` state-dict keys.

fm_train's module names were chosen to equal Hugging Face's, so :data:`FM_TO_HF` maps each template
to itself; it is still spelled out, because it is also the whitelist: a name outside it is an error,
never silently copied (a renamed module must fail here, not produce a model with missing weights).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import torch

from fm_train.convert.errors import ConvertError

# fm_train template -> Hugging Face template; "{i}" is the block index.
FM_TO_HF: dict[str, str] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


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
    from fm_train.model.llama import VOCAB_ROW_PARAMS

    vocab = int(model_fields["vocab_size"])
    return {n: torch.Size((vocab, *s[1:])) if n.endswith(VOCAB_ROW_PARAMS) else s
            for n, s in fm_param_shapes(model_fields).items()}


def without_padding(name: str, tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``tensor`` (fm_train parameter ``name``) as exported: vocabulary padding rows dropped."""
    from fm_train.model.llama import VOCAB_ROW_PARAMS

    return tensor[:vocab_size] if name.endswith(VOCAB_ROW_PARAMS) else tensor


@functools.lru_cache(maxsize=8)
def _param_shapes(fields: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, torch.Size], ...]:
    # Cached: a meta build costs seconds the first time (torch imports its meta kernels lazily).
    from fm_train.config import ModelConfig
    from fm_train.model import LlamaForCausalLM, args_from_config

    with torch.device("meta"):
        model = LlamaForCausalLM(args_from_config(ModelConfig(**dict(fields))))
    return tuple((n, p.shape) for n, p in model.named_parameters())  # named_parameters drops tied duplicates
