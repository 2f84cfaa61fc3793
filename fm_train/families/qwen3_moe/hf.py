"""The MoE family's Hugging Face side: ``Qwen3MoeForCausalLM``'s names, its ``config.json`` both ways,
what it must not use to import exactly, and a sample generation from an export.

Hugging Face stores each expert's matrices under its own keys (``mlp.experts.{e}.gate_proj.weight``
...; ``transformers`` 5 fuses them into ``gate_up_proj`` / ``down_proj`` when it loads and splits them
again when it saves); fm-train's model holds the fused tensors, so :data:`EXPERT_PIECES` says which
slice of which fused tensor each per-expert key is.
"""

from __future__ import annotations

from typing import Any, Mapping

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
AUTO_CLASS = "AutoModelForCausalLM"

#: fm-train parameter name template -> Hugging Face template ("{i}": block index); the export whitelist.
KEY_TEMPLATES: dict[str, str] = {name: name for name in (
    "model.embed_tokens.weight",
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.self_attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.gate.weight",
    "model.norm.weight",
    "lm_head.weight",
)}

#: Fused expert tensor (fm-train template) -> its per-expert Hugging Face keys ("{e}": expert index),
#: each with ``(part, parts)``: the key holds chunk ``part`` of ``parts`` equal chunks of expert e's
#: rows (gate_up_proj[e] is gate_proj's rows, then up_proj's).
EXPERT_PIECES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "model.layers.{i}.mlp.experts.gate_up_proj": (("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", 0, 2),
                                                  ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", 1, 2)),
    "model.layers.{i}.mlp.experts.down_proj": (("model.layers.{i}.mlp.experts.{e}.down_proj.weight", 0, 1),),
}

#: ModelConfig field -> the Hugging Face config.json key it comes from (named in error messages).
CONFIG_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers", "hidden": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "ffn_hidden": "intermediate_size",
    "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "moe": "num_experts",
}


def config(model_fields: Mapping[str, Any], *, dtype: str, bos: int | None, eos: int | None,
           pad: int | None = None) -> Any:
    """A ``transformers`` ``Qwen3MoeConfig`` matching the checkpoint's model fields exactly."""
    from transformers import Qwen3MoeConfig

    m, moe = model_fields, model_fields["moe"]
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    return Qwen3MoeConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden"], intermediate_size=m["ffn_hidden"],
        num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
        head_dim=m.get("head_dim") or m["hidden"] // m["n_heads"], max_position_embeddings=m["max_seq_len"],
        rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"], hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_theta"])},
        initializer_range=m.get("init_std", 0.02), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        dtype=torch_dtype, attention_bias=False, use_sliding_window=False, decoder_sparse_step=1,
        num_experts=moe["experts"], num_experts_per_tok=moe["top_k"],
        moe_intermediate_size=moe.get("expert_ffn_hidden") or m["ffn_hidden"],
        norm_topk_prob=bool(moe["norm_topk_prob"]), router_aux_loss_coef=float(moe["aux_loss_coef"]),
        mlp_only_layers=list(range(moe.get("dense_layers", 0))), architectures=[ARCHITECTURE])


def fields_from_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``model`` config fields (``family`` included) of a ``config.json``; ``KeyError`` naming a missing key."""
    heads = raw["num_attention_heads"]
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    experts = raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"]
    return {
        "family": "qwen3_moe",
        "n_layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"], "n_heads": heads,
        "n_kv_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads, "ffn_hidden": raw["intermediate_size"],
        "vocab_size": raw["vocab_size"], "max_seq_len": raw["max_position_embeddings"],
        "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        "norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "moe": {"experts": experts, "top_k": raw["num_experts_per_tok"],
                "expert_ffn_hidden": raw["moe_intermediate_size"],
                "dense_layers": len(raw.get("mlp_only_layers") or []),
                "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
                "aux_loss_coef": float(raw.get("router_aux_loss_coef", 0.001))},
    }


def import_problems(raw: Mapping[str, Any]) -> list[str]:
    """Why a ``config.json`` of this ``model_type`` describes a model fm-train's would compute differently."""
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={raw['hidden_act']!r} (fm_train uses silu)")
    if raw.get("attention_bias"):
        problems.append("attention_bias=true (fm_train's MoE attention has no bias)")
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window=true (fm_train attends to the whole sequence)")
    if raw.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={raw['decoder_sparse_step']} (fm_train routes every block after the"
                        " dense ones)")
    dense = list(raw.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        problems.append(f"mlp_only_layers={dense} (fm_train's dense blocks are the first ones: [0 .. n-1])")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (fm_train has plain RoPE)")
    return problems


def sample(hf_dir: Any, *, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A few lines showing what the export in ``hf_dir`` computes (printed after a launch)."""
    from fm_train.families.llama.hf import sample as causal_sample

    return causal_sample(hf_dir, prompt=prompt, max_new_tokens=max_new_tokens, seed=seed)
