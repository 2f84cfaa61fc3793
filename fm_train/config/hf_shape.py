"""The model shape a Hugging Face Llama dir declares in its ``config.json`` (for ``model.init_from``).

Torch-free, so the config loader can read it: the shape of a continued-pretraining run comes from
the checkpoint, and a field set to something else is reported by name (``fm_train.config.rules``).
The weights themselves are read later, by ``fm_train.convert.import_hf``, which also refuses
architectures fm_train's model does not compute identically (activation, RoPE scaling, MLP bias).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: ModelConfig field -> the config.json key it comes from (named in error messages).
HF_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers", "hidden": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "qkv_bias": "attention_bias",
}

#: Fields a run may set differently from the checkpoint: only the RoPE table length, so that
#: continued pretraining can train on longer (or shorter) sequences than the checkpoint saw.
FREE_FIELDS: frozenset[str] = frozenset({"max_seq_len"})


def hf_config_file(hf_dir: str | Path) -> Path:
    """Where ``hf_dir``'s ``config.json`` is."""
    return Path(hf_dir) / "config.json"


def read_hf_shape(hf_dir: str | Path) -> dict[str, Any]:
    """ModelConfig fields of the Llama model in ``hf_dir``; ``ValueError`` naming the problem otherwise."""
    path = hf_config_file(hf_dir)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if raw.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not llama")
    try:
        heads = raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # transformers 5 | 4 spelling
        return {
            "n_layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"], "n_heads": heads,
            "n_kv_heads": raw.get("num_key_value_heads") or heads, "ffn_hidden": raw["intermediate_size"],
            "vocab_size": raw["vocab_size"], "max_seq_len": raw["max_position_embeddings"],
            "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            "norm_eps": float(raw.get("rms_norm_eps", 1e-5)), "qkv_bias": bool(raw.get("attention_bias", False)),
        }
    except KeyError as exc:
        raise ValueError(f"{path} lacks {exc.args[0]!r}") from None
