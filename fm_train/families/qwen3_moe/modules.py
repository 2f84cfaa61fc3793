"""The MoE family's torch side, as :class:`~fm_train.families.spec.Modules`."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from fm_train.families.llama.model import rope_tables
from fm_train.families.qwen3_moe.model import (
    DecoderLayer,
    Experts,
    MoEArgs,
    args_from_config,
    causal_lm_loss,
    set_router_loss_scale,
    take_router_metrics,
)
from fm_train.families.qwen3_moe.pipeline import build_pipeline, pipeline_layer_names, stage_bounds
from fm_train.families.qwen3_moe.tp_plan import TP_PLAN
from fm_train.families.spec import LossFn, Modules
from fm_train.model.loss import token_mean


def finish_materialize(model: nn.Module, args: MoEArgs) -> None:
    """Tie the head again and recompute the RoPE tables (``to_empty`` left them empty; no checkpoint holds them)."""
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    buffers = {n for n, _ in model.named_buffers()}
    if buffers != {"model.rope_cos", "model.rope_sin"}:  # a new buffer must be filled here too
        raise RuntimeError(f"MoEForCausalLM has buffers {sorted(buffers)}; the MoE family's finish_materialize"
                           " must fill them")
    model.model.rope_cos, model.model.rope_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)


def loss(args: MoEArgs) -> LossFn:
    """Next-token cross-entropy over the real vocabulary (the router losses enter inside the blocks)."""
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
    expert_types=(Experts,),
    set_layer_loss_scale=set_router_loss_scale,
    take_metrics=take_router_metrics,
    metric_fields=(("moe_aux_loss", "aux", "{:.3f}"), ("moe_load_max_mean", "load max/mean", "{:.2f}"),
                   ("moe_dropped", "dropped", "{:.1%}")),
)
