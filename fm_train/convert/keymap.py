"""Declarative key maps between DeepSpeed's parameter names, fm_train's model and Hugging Face.

Three name spaces:

* DeepSpeed names: the pure model under the engine's wrapper (``model.`` + fm name), or, for a
  pipeline (pp > 1), ``{layer index}.{param}`` and ``tied_modules.{key}.{param}``;
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


def ds_to_fm(name: str, manifest: Mapping[str, Any]) -> str:
    """fm_train name of a DeepSpeed parameter name, using the manifest's prefix and layer table."""
    if manifest["topology"]["pp"] > 1:
        head, _, rest = name.partition(".")
        if head == "tied_modules":
            key, _, rest = rest.partition(".")
            tied = manifest.get("tied", {})
            if key not in tied:
                raise ConvertError(f"pipeline tied module {key!r} (param {name!r}) is not in the manifest's tied table")
            return f"{tied[key]}.{rest}"
        if not head.isdigit():
            raise ConvertError(f"pipeline parameter {name!r} does not start with a layer index")
        layers = {int(e["index"]): e["module"] for e in manifest["layers"]}
        if int(head) not in layers:
            raise ConvertError(f"pipeline layer {head} (param {name!r}) is not in the manifest's layer table")
        return f"{layers[int(head)]}.{rest}"
    prefix = manifest.get("param_prefix", "model.")
    if not name.startswith(prefix):
        raise ConvertError(f"DeepSpeed parameter {name!r} lacks the wrapper prefix {prefix!r} the manifest names")
    return name[len(prefix):]


def tp_split_dim(fm_name: str, manifest: Mapping[str, Any]) -> int | None:
    """The dim along which tp shards of ``fm_name`` are concatenated (None: replicated)."""
    for entry in manifest["layers"]:
        module = entry["module"] + "."
        if fm_name.startswith(module):
            return entry.get("tp_split_dims", {}).get(fm_name[len(module):])
    return None


def fm_param_shapes(model_fields: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Every parameter fm_train's model has for this shape (built on the meta device: no memory).

    A tied head appears once, as ``model.embed_tokens.weight`` (what Hugging Face stores too).
    """
    return dict(_param_shapes(tuple(sorted(model_fields.items()))))


@functools.lru_cache(maxsize=8)
def _param_shapes(fields: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, torch.Size], ...]:
    # Cached: a meta build costs seconds the first time (torch imports its meta kernels lazily).
    from fm_train.config import ModelConfig
    from fm_train.model import LlamaForCausalLM, args_from_config

    with torch.device("meta"):
        model = LlamaForCausalLM(args_from_config(ModelConfig(**dict(fields))))
    return tuple((n, p.shape) for n, p in model.named_parameters())  # named_parameters drops tied duplicates
