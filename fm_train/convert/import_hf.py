"""Import a Hugging Face Llama dir for continued pretraining.

Only what fm_train's model computes identically is accepted: SiLU SwiGLU, default RoPE, no MLP bias,
head_dim = hidden / heads (``attention_bias`` becomes fm_train's ``qkv_bias``: bias on q, k, v and o). Anything else is refused by name rather than loaded into a model
that would silently compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fm_train.convert.errors import ConvertError
from fm_train.convert.hf_weights import EMBEDDING, TIED_HEAD, HFWeights
from fm_train.convert.keymap import hf_param_shapes


def _model_fields(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    kind = cfg.get("model_type")
    if kind != "llama":
        raise ConvertError(f"{where}: model_type {kind!r} is not supported (llama only)")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (fm_train uses silu)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true (fm_train's MLP has no bias)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (fm_train has plain RoPE)")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if problems:
        raise ConvertError(f"{where}: not importable into fm_train's Llama: " + "; ".join(problems))
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return {
        "n_layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "ffn_hidden": cfg["intermediate_size"], "vocab_size": cfg["vocab_size"],
        "max_seq_len": cfg["max_position_embeddings"], "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rope_theta": float(theta), "norm_eps": float(cfg.get("rms_norm_eps", 1e-5)), "qkv_bias": bool(cfg.get("attention_bias", False)),
    }


def open_hf(hf_dir: Path) -> tuple[dict[str, Any], HFWeights]:
    """``(model fields for fm_train.config.ModelConfig, lazy weights)`` of a Hugging Face dir.

    Reads ``config.json`` and the safetensors headers only; the weights are read later, each rank
    only the slices it holds (:class:`~fm_train.convert.hf_weights.HFWeights`).
    """
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{hf_dir} has no config.json: not a Hugging Face model dir")
    fields = _model_fields(json.loads(cfg_file.read_text()), hf_dir)
    weights = HFWeights(hf_dir, tie_embeddings=fields["tie_embeddings"], want=hf_param_shapes(fields))
    return fields, weights


def import_hf(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model fields for fm_train.config.ModelConfig, state dict)`` of a Hugging Face dir, read whole.

    The state dict has fm_train names and loads with ``LlamaForCausalLM.load_state_dict(strict=True)``
    (a tied head is included as the embedding tensor itself). Tensors keep the stored dtype. Training
    uses :func:`open_hf` instead, which reads only what a rank holds.
    """
    fields, weights = open_hf(hf_dir)
    tied = fields["tie_embeddings"]
    state = {name: weights.read(name) for name in weights.names() if not (tied and name == TIED_HEAD)}
    if tied:
        state[TIED_HEAD] = state[EMBEDDING]  # the same tensor, as the model shares it
    return fields, state
