"""The BERT family: encoders (learned positions, token types, post-LayerNorm, GELU) pretrained with
masked-language modelling, exported as ``BertForMaskedLM``.

``model.py`` the pure module, ``tp_plan.py`` and ``pipeline.py`` its splits, ``shape.py`` its size
formulas, ``objective.py`` its special tokens and masked windows, ``hf.py`` its Hugging Face side,
``modules.py`` the torch side of the spec below.
"""

from __future__ import annotations

from typing import Any, Mapping

from fm_train.families.bert import hf, objective, shape
from fm_train.families.spec import FamilySpec, HuggingFace, Modules, Objective, Sizes

#: Tied parameter -> the parameter it shares (always: the MLM decoder is the word embedding).
TIED_PARAMS: dict[str, str] = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
#: Parameters with one row per vocabulary entry, padding rows included (names end with these).
VOCAB_ROW_PARAMS: tuple[str, ...] = ("word_embeddings.weight", "predictions.bias", "decoder.weight")


def _tied_params(model_fields: Mapping[str, Any]) -> dict[str, str]:
    """Tied parameter -> the one it shares, for a model of these fields."""
    return dict(TIED_PARAMS)


def _modules() -> Modules:
    """The torch side, imported on first use."""
    from fm_train.families.bert.modules import MODULES

    return MODULES


SPEC = FamilySpec(
    name="bert",
    summary="BERT-style encoders",
    sizes=Sizes(parameter_count=shape.parameter_count, flops_per_token=shape.flops_per_token,
                block_params=shape.block_matmul_params, stage_params=shape.stage_params,
                activation_bytes_per_layer=shape.activation_bytes_per_layer, config_errors=shape.config_errors,
                fused_head_loss=True, head_tokens=shape.head_tokens),
    objective=Objective(tokenizer_specials=objective.SPECIALS, data=objective.data_objective),
    hf=HuggingFace(model_type=hf.MODEL_TYPE, architecture=hf.ARCHITECTURE, auto_class=hf.AUTO_CLASS,
                   config_keys=hf.CONFIG_KEYS, key_templates=hf.KEY_TEMPLATES,
                   fields_from_config=hf.fields_from_config, import_problems=hf.import_problems,
                   config=hf.config, sample=hf.sample),
    tied_params=_tied_params,
    vocab_row_params=VOCAB_ROW_PARAMS,
    load_modules=_modules,
)
