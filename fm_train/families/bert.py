"""The BERT family: the encoder of :mod:`fm_train.model.bert`, its tp plan and pipeline
(:mod:`fm_train.parallel`), masked-token cross-entropy, and ``BertForMaskedLM`` on the Hugging Face side."""

from __future__ import annotations

import functools
from typing import Any, Mapping

from fm_train.families import bert_shape
from fm_train.families.base import split_dims
from fm_train.parallel.tp_plan import BERT_TP_PLAN

# fm-train names equal BertForMaskedLM's; spelled out because the map is the export whitelist too.
_HF_PARAM_NAMES: dict[str, str] = {name: name for name in (
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
_HF_CONFIG_KEYS: dict[str, str] = {
    "n_layers": "num_hidden_layers", "hidden": "hidden_size", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_attention_heads", "ffn_hidden": "intermediate_size", "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings", "type_vocab_size": "type_vocab_size", "norm_eps": "layer_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


#: Special tokens appended after the shards' tokenizer vocabulary, in id order.
_SPECIALS: dict[str, str] = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _tokenizer_special_ids(tokenizer_dir: Any) -> tuple[int, int, int] | None:
    """The ids of [CLS], [SEP] and [MASK] in the shards' tokenizer; None when it has none of them."""
    from tokenizers import Tokenizer

    from data_shards import DataError

    tokenizer = Tokenizer.from_str((tokenizer_dir / "tokenizer.json").read_text())
    ids = [tokenizer.token_to_id(token) for token in _SPECIALS.values()]
    if all(i is None for i in ids):
        return None
    if any(i is None for i in ids):
        missing = [t for t, i in zip(_SPECIALS.values(), ids) if i is None]
        raise DataError(f"the tokenizer in {tokenizer_dir} has some of BERT's special tokens but not {missing}: an"
                        " encoder needs all of [CLS], [SEP] and [MASK] or none (then they are appended)")
    return ids[0], ids[1], ids[2]


class BertFamily:
    """BERT-style encoders pretrained with masked-language modelling (``model.family: bert``)."""

    name = "bert"
    hf_model_type = "bert"
    hf_architecture = "BertForMaskedLM"
    hf_auto_class = "AutoModelForMaskedLM"

    def args(self, model_cfg: Any) -> Any:
        from fm_train.model.bert import bert_args_from_config

        return bert_args_from_config(model_cfg)

    def build(self, args: Any) -> Any:
        from fm_train.model.bert import BertForMaskedLM

        return BertForMaskedLM(args)

    def finish_materialize(self, model: Any, args: Any) -> None:
        model.tie_weights()  # no derived buffers: positions are learned

    def loss(self, args: Any) -> Any:
        from fm_train.model.bert import masked_lm_loss

        return functools.partial(masked_lm_loss, vocab_size=args.vocab_size)

    def data_objective(self, info: Any, *, model_vocab_size: int, seed: int) -> Any:
        # A tokenizer that has [CLS], [SEP] and [MASK] (a BERT WordPiece one) keeps its ids; otherwise
        # they follow its vocabulary (tokenizer_specials): a tokenizer trained by ``fm-train shard``
        # serves both families, and the export's tokenizer gets them at the same ids.
        from data_shards import DataError, MaskedLM

        own = _tokenizer_special_ids(info.tokenizer_dir)
        if own is not None:
            cls_id, sep_id, mask_id = own
            return MaskedLM(cls_id=cls_id, sep_id=sep_id, mask_id=mask_id, vocab_size=int(info.vocab_size),
                            seed=seed, eos_id=int(info.eos_id) if int(info.eos_id) not in own else None)
        base = int(info.vocab_size)
        if model_vocab_size < base + len(_SPECIALS):
            raise DataError(f"model.vocab_size={model_vocab_size} leaves no room for the encoder's [CLS], [SEP] and"
                            f" [MASK] after the {base} tokens of {info.tokenizer_dir}; set model.vocab_size to at"
                            f" least {base + len(_SPECIALS)}")
        return MaskedLM(cls_id=base, sep_id=base + 1, mask_id=base + 2, vocab_size=base + len(_SPECIALS),
                        seed=seed, eos_id=int(info.eos_id))

    def tokenizer_specials(self) -> dict[str, str]:
        return dict(_SPECIALS)

    def build_train_module(self, cfg: Any, groups: Any = None, *, init: Any = None,
                           ds_config: Mapping[str, Any] | None = None) -> Any:
        from fm_train.parallel.build import build_train_module

        return build_train_module(cfg, groups, init=init, ds_config=dict(ds_config) if ds_config else None)

    tp_plan = BERT_TP_PLAN

    def build_pipeline(self, args: Any, *, pp: int, dp: int, tp: Any, seed: Any,
                       activation_checkpointing: bool = False) -> Any:
        from fm_train.parallel.bert_pipeline import build_pipeline

        return build_pipeline(args, pp=pp, dp=dp, tp=tp, seed=seed, activation_checkpointing=activation_checkpointing)

    def layout_errors(self, args: Any, tp: int, pp: int) -> list[str]:
        from fm_train.parallel.bert_pipeline import stage_bounds
        from fm_train.parallel.build import split_errors

        return split_errors(args, tp, pp, divided=("n_heads", "ffn_hidden"), stage_bounds=stage_bounds)

    def config_errors(self, cfg: Any) -> list[str]:
        m = cfg.model
        errors = []
        if m.n_kv_heads != m.n_heads:
            errors.append(f"model.n_kv_heads={m.n_kv_heads} differs from model.n_heads={m.n_heads}: BERT has no"
                          " grouped-query attention; set them equal (the bert-* presets do)")
        if not m.tie_embeddings:
            errors.append("model.tie_embeddings=false: BERT's MLM decoder is the word embedding; set it to true")
        return errors

    def manifest_layers(self, cfg: Any) -> list[dict[str, Any]]:
        # The pipeline's layer index and the tp plan's split dims, recorded for every layout (as Llama's).
        from fm_train.parallel.bert_pipeline import pipeline_layer_names
        from fm_train.parallel.pipeline import layer_table

        args = self.args(cfg.model)
        return layer_table(pipeline_layer_names(args), split_dims(self, args))

    def manifest_tied(self, cfg: Any) -> dict[str, str]:
        # A pipeline saves the word embedding (also the decoder) under ``tied_modules.<key>.``.
        if cfg.parallel.pp == 1:
            return {}
        from fm_train.parallel.pipeline import TIED_KEY

        return {TIED_KEY: "bert.embeddings.word_embeddings"}

    def block_types(self) -> tuple[type, ...]:
        from fm_train.model.bert import BertLayer

        return (BertLayer,)

    def logits(self, output: Any, vocab_size: int) -> Any:
        from fm_train.model.llama import real_logits

        return real_logits(output, vocab_size)

    def sample(self, hf_dir: Any, *, prompt: str, max_new_tokens: int, seed: int) -> str:
        from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(str(hf_dir), local_files_only=True),
                        tokenizer=tok)
        text = f"{prompt}{tok.mask_token}"
        guesses = ", ".join(f"{g['token_str']!r} {g['score']:.2f}" for g in fill(text, top_k=5))
        return f"fill-mask {text!r}: {guesses}"

    def hf_config(self, model_fields: Mapping[str, Any], *, dtype: str, bos: int | None, eos: int | None) -> Any:
        from transformers import BertConfig

        m = model_fields
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        return BertConfig(
            vocab_size=m["vocab_size"], hidden_size=m["hidden"], num_hidden_layers=m["n_layers"],
            num_attention_heads=m["n_heads"], intermediate_size=m["ffn_hidden"], hidden_act="gelu",
            max_position_embeddings=m["max_seq_len"], type_vocab_size=m.get("type_vocab_size", 2),
            layer_norm_eps=m["norm_eps"], initializer_range=m.get("init_std", 0.02), hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
            dtype=torch_dtype, architectures=[self.hf_architecture])

    @property
    def hf_config_keys(self) -> Mapping[str, str]:
        return _HF_CONFIG_KEYS

    def fields_from_hf(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        heads = raw["num_attention_heads"]
        return {"family": self.name, "n_layers": raw["num_hidden_layers"], "hidden": raw["hidden_size"],
                "n_heads": heads, "n_kv_heads": heads, "ffn_hidden": raw["intermediate_size"],
                "vocab_size": raw["vocab_size"], "max_seq_len": raw["max_position_embeddings"],
                "type_vocab_size": raw.get("type_vocab_size", 2), "norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
                "tie_embeddings": True}

    def hf_import_problems(self, raw: Mapping[str, Any]) -> list[str]:
        problems = []
        if raw.get("hidden_act", "gelu") != "gelu":
            problems.append(f"hidden_act={raw['hidden_act']!r} (fm_train's encoder uses gelu)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type={raw['position_embedding_type']!r} (fm_train's encoder has"
                            " absolute positions)")
        if raw.get("tie_word_embeddings", True) is False:
            problems.append("tie_word_embeddings=false (fm_train's MLM decoder is the word embedding)")
        return problems

    def hf_key_templates(self) -> Mapping[str, str]:
        return _HF_PARAM_NAMES

    def tied_params(self, model_fields: Mapping[str, Any]) -> dict[str, str]:
        from fm_train.model.bert import TIED_PARAMS

        return dict(TIED_PARAMS)

    def vocab_row_params(self) -> tuple[str, ...]:
        from fm_train.model.bert import VOCAB_ROW_PARAMS

        return VOCAB_ROW_PARAMS

    def parameter_count(self, shape: Any) -> int:
        return bert_shape.parameter_count(shape)

    def flops_per_token(self, shape: Any, seq_len: int) -> float:
        return bert_shape.flops_per_token(shape, seq_len)

    def block_params(self, shape: Any) -> int:
        return bert_shape.block_matmul_params(shape)

    def stage_params(self, cfg: Any) -> int:
        return bert_shape.stage_params(cfg)

    def activation_bytes_per_layer(self, cfg: Any) -> float:
        return bert_shape.activation_bytes_per_layer(cfg)
