"""Build the trainable module for a layout: the pure model, then parallelism applied from outside.

Contract with the engine: for ``pp == 1`` the result is an ``nn.Module`` whose
``forward(input_ids, labels)`` returns the scalar mean next-token loss (vocab-parallel when tp > 1);
for ``pp > 1`` it is a ``deepspeed.pipe.PipelineModule`` fed ``((input_ids,), labels)`` tuples.
tp > 1 or pp > 1 needs the rank's :class:`~fm_train.dist.groups.ParallelGroups`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from fm_train.config import FmConfig
from fm_train.dist.groups import ParallelGroups
from fm_train.model import LlamaForCausalLM, args_from_config, causal_lm_loss
from fm_train.model.llama import LlamaArgs, rope_tables
from fm_train.parallel.pipeline import build_pipeline, stage_bounds
from fm_train.parallel.sharded_init import materialize_
from fm_train.parallel.tensor_parallel import TPGroup, apply_tensor_parallel, vocab_parallel_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CausalLMWithLoss(nn.Module):
    """Wraps the pure model so that DeepSpeed's engine sees ``forward(input_ids, labels) -> loss``."""

    def __init__(self, model: LlamaForCausalLM, loss_fn: LossFn = causal_lm_loss) -> None:
        super().__init__()
        self.model = model  # keys stay "model.model.layers..." inside the wrapper; stripped on export
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(input_ids), labels)


def build_dense_model(cfg: FmConfig) -> LlamaForCausalLM:
    """The whole pure model on CPU, seeded-initialised exactly as in every other layout."""
    model = LlamaForCausalLM(args_from_config(cfg.model))
    model.init_weights(cfg.run.seed)
    return model


def build_tp_model(args: LlamaArgs, tp: TPGroup, seed: int) -> LlamaForCausalLM:
    """The pure model with the tp plan applied, holding only this rank's shards of the seeded init.

    Built on the meta device, so the full model never exists on a rank; each shard equals the
    matching slice of :func:`build_dense_model`'s weights. Its forward returns vocab-sharded logits.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    apply_tensor_parallel(model, tp)
    materialize_(model, args, seed, tp)
    # RoPE tables are derived, not initialised: recompute them in place of the meta placeholders.
    model.model.rope_cos, model.model.rope_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    return model


def layout_errors(args: LlamaArgs, tp: int, pp: int) -> list[str]:
    """Every reason the model cannot be split ``tp`` ways and into ``pp`` stages (empty when it can)."""
    errors = [
        f"parallel.tp={tp} does not divide model.{field}={value}; pick a tp that divides it"
        for field, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                             ("ffn_hidden", args.ffn_hidden))
        if value % tp
    ]
    if args.vocab_size % tp:
        errors.append(f"parallel.tp={tp} does not divide model.vocab_size={args.vocab_size}: the vocab-parallel"
                      f" embedding cannot split it; round model.vocab_size up to a multiple of {tp}")
    if pp > 1:
        try:
            stage_bounds(args, pp)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _check(cfg: FmConfig, groups: ParallelGroups | None) -> None:
    p = cfg.parallel
    errors = layout_errors(args_from_config(cfg.model), p.tp, p.pp)
    if (p.tp > 1 or p.pp > 1) and groups is None:
        errors.append(f"parallel.tp={p.tp}, parallel.pp={p.pp} needs the rank's ParallelGroups:"
                      " build_train_module(cfg, groups=ParallelGroups(topology))")
    if groups is not None and (groups.topology.tp, groups.topology.pp) != (p.tp, p.pp):
        t = groups.topology
        errors.append(f"groups were built for tp={t.tp}, pp={t.pp} but the config says parallel.tp={p.tp},"
                      f" parallel.pp={p.pp}")
    if errors:
        raise ValueError("cannot build the train module:\n  " + "\n  ".join(errors))


def build_train_module(cfg: FmConfig, groups: ParallelGroups | None = None) -> nn.Module:
    """The trainable module for ``cfg``'s layout; raises ``ValueError`` before any step if it cannot exist.

    - tp = pp = 1: the dense model wrapped with its loss (``groups`` unused).
    - tp > 1, pp = 1: the tp-sharded model with the vocab-parallel loss; pass ``mpu=groups`` to
      ``deepspeed.initialize``.
    - pp > 1: a ``PipelineModule`` (tp-sharded stages when tp > 1) with activation checkpointing
      inside the stages when ``parallel.activation_checkpointing``; DeepSpeed takes its ``mpu``
      from the module, so pass none.
    """
    _check(cfg, groups)
    p, args = cfg.parallel, args_from_config(cfg.model)
    if p.tp == 1 and p.pp == 1:
        return CausalLMWithLoss(build_dense_model(cfg))
    assert groups is not None  # _check raised otherwise
    tp = TPGroup.from_groups(groups)
    if p.pp > 1:
        return build_pipeline(args, pp=p.pp, dp=groups.topology.dp, tp=tp, seed=cfg.run.seed,
                              activation_checkpointing=p.activation_checkpointing)
    model = build_tp_model(args, tp, cfg.run.seed)
    return CausalLMWithLoss(model, loss_fn=functools.partial(vocab_parallel_cross_entropy, tp=tp))
