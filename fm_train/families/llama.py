"""The Llama family: the decoder of :mod:`fm_train.model.llama`, its tp plan and pipeline
(:mod:`fm_train.parallel`), next-token cross-entropy, and ``LlamaForCausalLM`` on the Hugging Face side."""

from __future__ import annotations

from typing import Any, Mapping

from fm_train.families import llama_shape
from fm_train.families.base import split_dims
from fm_train.parallel.tp_plan import LLAMA_TP_PLAN

# fm-train template -> Hugging Face template; "{i}" is the block index. fm-train's module names were
# chosen to equal Hugging Face's, so each maps to itself; spelled out because it is the whitelist too.
_HF_PARAM_NAMES: dict[str, str] = {name: name for name in (
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
_HF_CONFIG_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers", "hidden": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "qkv_bias": "attention_bias",
}


class LlamaFamily:
    """Llama-family decoders (``model.family: llama``, the default)."""

    name = "llama"
    hf_model_type = "llama"
    hf_architecture = "LlamaForCausalLM"
    hf_auto_class = "AutoModelForCausalLM"

    def args(self, model_cfg: Any) -> Any:
        from fm_train.model import args_from_config

        return args_from_config(model_cfg)

    def build(self, args: Any) -> Any:
        from fm_train.model import LlamaForCausalLM

        return LlamaForCausalLM(args)

    def finish_materialize(self, model: Any, args: Any) -> None:
        from fm_train.model.llama import rope_tables

        if args.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        buffers = {n for n, _ in model.named_buffers()}
        if buffers != {"model.rope_cos", "model.rope_sin"}:  # a new buffer must be filled here too
            raise RuntimeError(f"LlamaForCausalLM has buffers {sorted(buffers)}; LlamaFamily.finish_materialize"
                               " must fill them")
        model.model.rope_cos, model.model.rope_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)

    def loss(self, args: Any) -> Any:
        import functools

        from fm_train.model import causal_lm_loss

        return functools.partial(causal_lm_loss, vocab_size=args.vocab_size)

    def config_errors(self, cfg: Any) -> list[str]:
        m = cfg.model
        if m.hidden % m.n_heads == 0 and (m.hidden // m.n_heads) % 2 != 0:
            return [f"model.hidden / model.n_heads = {m.hidden // m.n_heads} is odd; RoPE needs an even head size"]
        return []

    def data_objective(self, info: Any, *, model_vocab_size: int, seed: int) -> Any:
        return None  # the loader's default: labels are the sample shifted by one

    def tokenizer_specials(self) -> dict[str, str]:
        return {}

    def build_train_module(self, cfg: Any, groups: Any = None, *, init: Any = None,
                           ds_config: Mapping[str, Any] | None = None) -> Any:
        from fm_train.parallel.build import build_train_module

        return build_train_module(cfg, groups, init=init, ds_config=dict(ds_config) if ds_config else None)

    tp_plan = LLAMA_TP_PLAN

    def build_pipeline(self, args: Any, *, pp: int, dp: int, tp: Any, seed: Any,
                       activation_checkpointing: bool = False) -> Any:
        from fm_train.parallel.llama_pipeline import build_pipeline

        return build_pipeline(args, pp=pp, dp=dp, tp=tp, seed=seed, activation_checkpointing=activation_checkpointing)

    def layout_errors(self, args: Any, tp: int, pp: int) -> list[str]:
        from fm_train.parallel.build import split_errors
        from fm_train.parallel.llama_pipeline import stage_bounds

        return split_errors(args, tp, pp, divided=("n_heads", "n_kv_heads", "ffn_hidden"), stage_bounds=stage_bounds)

    def manifest_layers(self, cfg: Any) -> list[dict[str, Any]]:
        # The index is the pipeline's own (pipeline_layer_names: the converter renames layer_XX keys
        # with it), the dims are the tp plan's (the converter concatenates mp_rank shards along them).
        # Recorded for every layout, so a reader never has to guess which applies.
        from fm_train.parallel.llama_pipeline import pipeline_layer_names
        from fm_train.parallel.pipeline import layer_table

        args = self.args(cfg.model)
        return layer_table(pipeline_layer_names(args), split_dims(self, args))

    def manifest_tied(self, cfg: Any) -> dict[str, str]:
        # A pipeline saves the tied embedding/head under ``tied_modules.<key>.``, not under a layer index.
        if cfg.parallel.pp == 1 or not cfg.model.tie_embeddings:
            return {}
        from fm_train.parallel.llama_pipeline import pipeline_layer_names
        from fm_train.parallel.pipeline import TIED_KEY

        return {TIED_KEY: pipeline_layer_names(self.args(cfg.model))[0]}

    def block_types(self) -> tuple[type, ...]:
        from fm_train.model.llama import DecoderLayer

        return (DecoderLayer,)

    def logits(self, output: Any, vocab_size: int) -> Any:
        from fm_train.model.llama import real_logits

        return real_logits(output, vocab_size)

    def sample(self, hf_dir: Any, *, prompt: str, max_new_tokens: int, seed: int) -> str:
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

    def hf_config(self, model_fields: Mapping[str, Any], *, dtype: str, bos: int | None, eos: int | None) -> Any:
        # fm-train's ``qkv_bias`` is Llama's ``attention_bias`` (bias on q, k, v and o).
        from transformers import LlamaConfig

        m = model_fields
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        return LlamaConfig(
            vocab_size=m["vocab_size"], hidden_size=m["hidden"], intermediate_size=m["ffn_hidden"],
            num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
            max_position_embeddings=m["max_seq_len"], rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"],
            hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_theta"])},
            initializer_range=m.get("init_std", 0.02), bos_token_id=bos, eos_token_id=eos, use_cache=True,
            dtype=torch_dtype, attention_bias=bool(m.get("qkv_bias")), mlp_bias=False,
            head_dim=m["hidden"] // m["n_heads"], architectures=[self.hf_architecture])

    @property
    def hf_config_keys(self) -> Mapping[str, str]:
        return _HF_CONFIG_KEYS

    def fields_from_hf(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        heads = raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # transformers 5 | 4 spelling
        return {
            "family": self.name,
            "n_layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"], "n_heads": heads,
            "n_kv_heads": raw.get("num_key_value_heads") or heads, "ffn_hidden": raw["intermediate_size"],
            "vocab_size": raw["vocab_size"], "max_seq_len": raw["max_position_embeddings"],
            "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
            "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            "norm_eps": float(raw.get("rms_norm_eps", 1e-5)), "qkv_bias": bool(raw.get("attention_bias", False)),
        }

    def hf_import_problems(self, raw: Mapping[str, Any]) -> list[str]:
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

    def hf_key_templates(self) -> Mapping[str, str]:
        return _HF_PARAM_NAMES

    def tied_params(self, model_fields: Mapping[str, Any]) -> dict[str, str]:
        from fm_train.model.llama import TIED_PARAMS

        return dict(TIED_PARAMS) if model_fields.get("tie_embeddings", True) else {}

    def vocab_row_params(self) -> tuple[str, ...]:
        from fm_train.model.llama import VOCAB_ROW_PARAMS

        return VOCAB_ROW_PARAMS

    def parameter_count(self, shape: Any) -> int:
        return llama_shape.parameter_count(shape)

    def flops_per_token(self, shape: Any, seq_len: int) -> float:
        return llama_shape.flops_per_token(shape, seq_len)

    def block_params(self, shape: Any) -> int:
        return llama_shape.block_matmul_params(shape)

    def stage_params(self, cfg: Any) -> int:
        return llama_shape.stage_params(cfg)

    def activation_bytes_per_layer(self, cfg: Any) -> float:
        return llama_shape.activation_bytes_per_layer(cfg)
