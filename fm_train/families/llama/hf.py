"""The Llama family's Hugging Face side: ``LlamaForCausalLM``'s names, its ``config.json`` both ways,
what it must not use to import exactly, and a sample generation from an export."""

from __future__ import annotations

from typing import Any, Mapping

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
AUTO_CLASS = "AutoModelForCausalLM"

#: fm-train parameter name template -> Hugging Face template ("{i}": block index); the export whitelist.
KEY_TEMPLATES: dict[str, str] = {name: name for name in (
    "model.embed_tokens.weight",
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.self_attn.o_proj.bias",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)}


#: ModelConfig field -> the Hugging Face config.json key it comes from (named in error messages).
CONFIG_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers", "hidden": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "qkv_bias": "attention_bias",
}


def config(model_fields: Mapping[str, Any], *, dtype: str, bos: int | None, eos: int | None,
           pad: int | None = None) -> Any:
    """A ``transformers`` config matching the checkpoint's model fields exactly."""
    # fm-train's ``qkv_bias`` is Llama's ``attention_bias`` (bias on q, k, v and o).
    from transformers import LlamaConfig

    m = model_fields
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    return LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden"], intermediate_size=m["ffn_hidden"],
        num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
        max_position_embeddings=m["max_seq_len"], rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"],
        hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_theta"])},
        initializer_range=m.get("init_std", 0.02), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        dtype=torch_dtype, attention_bias=bool(m.get("qkv_bias")), mlp_bias=False,
        head_dim=m["hidden"] // m["n_heads"], architectures=[ARCHITECTURE])


def fields_from_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``model`` config fields (``family`` included) of a ``config.json``; ``KeyError`` naming a missing key."""
    heads = raw["num_attention_heads"]
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # transformers 5 | 4 spelling
    return {
        "family": "llama",
        "n_layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"], "n_heads": heads,
        "n_kv_heads": raw.get("num_key_value_heads") or heads, "ffn_hidden": raw["intermediate_size"],
        "vocab_size": raw["vocab_size"], "max_seq_len": raw["max_position_embeddings"],
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        "norm_eps": float(raw.get("rms_norm_eps", 1e-5)), "qkv_bias": bool(raw.get("attention_bias", False)),
    }


def import_problems(raw: Mapping[str, Any]) -> list[str]:
    """Why a ``config.json`` of this ``model_type`` describes a model fm-train's would compute differently."""
    # Only what fm_train's model computes identically: SiLU SwiGLU, default RoPE, no MLP bias,
    # head_dim = hidden / heads (attention_bias is fm_train's qkv_bias: bias on q, k, v and o).
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={raw['hidden_act']!r} (fm_train uses silu)")
    if raw.get("mlp_bias"):
        problems.append("mlp_bias=true (fm_train's MLP has no bias)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (fm_train has plain RoPE)")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    if head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    return problems


def sample(hf_dir: Any, *, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A few lines showing what the export in ``hf_dir`` computes (printed after a launch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
