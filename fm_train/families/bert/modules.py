"""The BERT family's torch side, as :class:`~fm_train.families.spec.Modules`."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from fm_train.families.bert.model import BertArgs, BertLayer, bert_args_from_config, masked_lm_loss
from fm_train.families.bert.pipeline import build_pipeline, pipeline_layer_names, stage_bounds
from fm_train.families.bert.tp_plan import TP_PLAN
from fm_train.families.spec import LossFn, Modules
from fm_train.model.loss import token_mean


def finish_materialize(model: nn.Module, args: BertArgs) -> None:
    """Tie the decoder to the word embedding again; no derived buffers (positions are learned)."""
    model.tie_weights()


def loss(args: BertArgs) -> LossFn:
    """Masked-token cross-entropy over the real vocabulary, from logits (training takes ``head_loss``'s)."""
    return functools.partial(masked_lm_loss, vocab_size=args.vocab_size)


def pipeline_tied_module(model_cfg: Any) -> str | None:
    """A pipeline saves the word embedding (also the decoder) under ``tied_modules.<key>``."""
    return "bert.embeddings.word_embeddings"


MODULES = Modules(
    args=bert_args_from_config,
    block_types=(BertLayer,),
    finish_materialize=finish_materialize,
    loss=loss,
    tp_plan=TP_PLAN,
    tp_divided=("n_heads", "ffn_hidden"),
    pipeline_layer_names=pipeline_layer_names,
    stage_bounds=stage_bounds,
    build_pipeline=build_pipeline,
    pipeline_tied_module=pipeline_tied_module,
    # Given labels the model returns each token's loss, its head run on the masked tokens only.
    head_loss=lambda _args: token_mean,
)
