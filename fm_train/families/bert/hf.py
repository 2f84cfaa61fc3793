"""The BERT family's Hugging Face side: ``BertForMaskedLM``'s names, its ``config.json`` both ways,
what it must not use to import exactly, and a fill-mask sample from an export."""

from __future__ import annotations

from typing import Any, Mapping

MODEL_TYPE = "bert"
ARCHITECTURE = "BertForMaskedLM"
AUTO_CLASS = "AutoModelForMaskedLM"

#: fm-train parameter name template -> Hugging Face template ("{i}": block index); the export whitelist.
KEY_TEMPLATES: dict[str, str] = {name: name for name in (
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    *(f"bert.encoder.layer.{{i}}.{module}.{kind}"
      for module in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
      for kind in ("weight", "bias")),
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
)}

#: ModelConfig field -> the Hugging Face config.json key it comes from (named in error messages).
CONFIG_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers", "hidden": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_attention_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings", "type_vocab_size": "type_vocab_size", "norm_eps": "layer_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


def config(model_fields: Mapping[str, Any], *, dtype: str, bos: int | None, eos: int | None,
           pad: int | None = None) -> Any:
    """A ``transformers`` config matching the checkpoint's model fields exactly."""
    from transformers import BertConfig

    m = model_fields
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    return BertConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden"], num_hidden_layers=m["n_layers"],
        num_attention_heads=m["n_heads"], intermediate_size=m["ffn_hidden"], hidden_act="gelu",
        max_position_embeddings=m["max_seq_len"], type_vocab_size=m.get("type_vocab_size", 2),
        layer_norm_eps=m["norm_eps"], initializer_range=m.get("init_std", 0.02), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad,
        dtype=torch_dtype, architectures=[ARCHITECTURE])


def fields_from_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``model`` config fields (``family`` included) of a ``config.json``; ``KeyError`` naming a missing key."""
    heads = raw["num_attention_heads"]
    return {"family": "bert", "n_layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"],
            "n_heads": heads, "n_kv_heads": heads, "ffn_hidden": raw["intermediate_size"],
            "vocab_size": raw["vocab_size"], "max_seq_len": raw["max_position_embeddings"],
            "type_vocab_size": raw.get("type_vocab_size", 2), "norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
            "tie_embeddings": True}


def import_problems(raw: Mapping[str, Any]) -> list[str]:
    """Why a ``config.json`` of this ``model_type`` describes a model fm-train's would compute differently."""
    problems = []
    if raw.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={raw['hidden_act']!r} (fm_train's encoder uses gelu)")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={raw['position_embedding_type']!r} (fm_train's encoder has"
                        " absolute positions)")
    if raw.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings=false (fm_train's MLM decoder is the word embedding)")
    return problems


def sample(hf_dir: Any, *, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A few lines showing what the export in ``hf_dir`` computes (printed after a launch)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(str(hf_dir), local_files_only=True),
                    tokenizer=tok)
    text = f"{prompt}{tok.mask_token}"
    guesses = ", ".join(f"{g['token_str']!r} {g['score']:.2f}" for g in fill(text, top_k=5))
    return f"fill-mask {text!r}: {guesses}"
