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
from fm_train.convert.keymap import fm_param_shapes, hf_to_fm


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


def import_hf(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model fields for fm_train.config.ModelConfig, state dict)`` of a Hugging Face dir.

    The state dict has fm_train names and loads with ``LlamaForCausalLM.load_state_dict(strict=True)``
    (a tied head is included as the embedding tensor itself). Tensors keep the stored dtype.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{hf_dir} has no config.json: not a Hugging Face model dir")
    fields = _model_fields(json.loads(cfg_file.read_text()), hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for fname in files:
        if not (hf_dir / fname).is_file():
            raise ConvertError(f"{hf_dir} lacks {fname} (only safetensors weights are imported)")
        with safe_open(str(hf_dir / fname), framework="pt") as fh:
            for key in fh.keys():
                if fields["tie_embeddings"] and key == "lm_head.weight":
                    continue  # some exports store the tied head too; fm_train's model shares the embedding
                state[hf_to_fm(key)] = fh.get_tensor(key)
    want = fm_param_shapes(fields)
    missing = sorted(set(want) - set(state))
    wrong = [n for n in want if n in state and state[n].shape != want[n]]
    if missing or wrong:
        raise ConvertError(f"{hf_dir}: missing tensors {missing[:5]}, wrong shapes {wrong[:5]}")
    if fields["tie_embeddings"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return fields, state
