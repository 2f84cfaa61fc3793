"""The Llama family's torch side, as :class:`~fm_train.families.spec.Modules`."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from fm_train.families.llama.model import DecoderLayer, LlamaArgs, args_from_config, causal_lm_loss, rope_tables
from fm_train.families.llama.pipeline import build_pipeline, pipeline_layer_names, stage_bounds
from fm_train.families.llama.tp_plan import TP_PLAN
from fm_train.families.spec import LossFn, Modules
from fm_train.model.loss import token_mean


def finish_materialize(model: nn.Module, args: LlamaArgs) -> None:
    """Tie the head again and recompute the RoPE tables (``to_empty`` left them empty; no checkpoint holds them)."""
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    buffers = {n for n, _ in model.named_buffers()}
    if buffers != {"model.rope_cos", "model.rope_sin"}:  # a new buffer must be filled here too
        raise RuntimeError(f"LlamaForCausalLM has buffers {sorted(buffers)}; the Llama family's finish_materialize"
                           " must fill them")
    model.model.rope_cos, model.model.rope_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)


def loss(args: LlamaArgs) -> LossFn:
    """Next-token cross-entropy over the real vocabulary."""
    return functools.partial(causal_lm_loss, vocab_size=args.vocab_size)


def pipeline_tied_module(model_cfg: Any) -> str | None:
    """With tied embeddings a pipeline saves the embedding (also the head) under ``tied_modules.<key>``."""
    return "model.embed_tokens" if model_cfg.tie_embeddings else None


MODULES = Modules(
    args=args_from_config,
    block_types=(DecoderLayer,),
    finish_materialize=finish_materialize,
    loss=loss,
    tp_plan=TP_PLAN,
    tp_divided=("n_heads", "n_kv_heads", "ffn_hidden"),
    pipeline_layer_names=pipeline_layer_names,
    stage_bounds=stage_bounds,
    build_pipeline=build_pipeline,
    pipeline_tied_module=pipeline_tied_module,
    head_loss=lambda _args: token_mean,
)
