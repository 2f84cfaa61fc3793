"""Build the trainable module for a layout: the pure model, then parallelism applied from outside.

Contract with the engine: for ``pp == 1`` the result is an ``nn.Module`` whose
``forward(input_ids, labels)`` returns the family's scalar loss (vocab-parallel when tp > 1);
for ``pp > 1`` it is a ``deepspeed.pipe.PipelineModule`` fed ``((input_ids,), labels)`` tuples.
tp > 1 or pp > 1 needs the rank's :class:`~fm_train.dist.groups.ParallelGroups`.

Initial weights (``init``) are the run seed, full tensors by name, or a Hugging Face checkpoint opened
lazily for continued pretraining (a ``SliceReader``: each rank reads only the slices it holds); every
layout slices the same values (:mod:`fm_train.parallel.sharded_init`).
No rank ever holds the whole model unless the layout keeps it whole: tp shards and pipeline stages
are built on the meta device, and ZeRO-3 builds under ``deepspeed.zero.Init`` (one full parameter at
a time, then only this rank's partition).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from fm_train.config import FmConfig
from fm_train.deepspeed_adapter.moe import mark_expert_parameters, register_expert_groups
from fm_train.deepspeed_adapter.zero3 import partitioned_construction
from fm_train.engine.activation_checkpointing import apply_activation_checkpointing
from fm_train.engine.source_metrics import per_sample_cross_entropy
from fm_train.dist.groups import ParallelGroups
from fm_train.families.spec import FamilySpec, LossFn, layout_errors
from fm_train.model.loss import IGNORE_INDEX
from fm_train.parallel.deepspeed_config import deepspeed_config
from fm_train.parallel.expert_parallel import EPGroup, apply_expert_parallel
from fm_train.parallel.pipeline import vocab_loss
from fm_train.parallel.sequence_parallel import SINGLE_SP, SPGroup, apply_sequence_parallel, local_inputs
from fm_train.parallel.sharded_init import (
    InitSource,
    SliceReader,
    initial_value,
    materialize_,
    materialize_zero3_,
)
from fm_train.parallel.tensor_parallel import SINGLE, TPGroup, apply_tensor_parallel


class ModelWithLoss(nn.Module):
    """Wraps the pure model so that DeepSpeed's engine sees ``forward(input_ids, labels, document_ids=None) ->
    loss``, the loss being the family's objective.

    The batch comes whole (every sample's tokens): with sequence parallelism (``sp``) the wrapper keeps this
    rank's chunk of the tokens and gives the model their positions (:func:`local_inputs`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, sp: SPGroup = SINGLE_SP, *, head_loss: bool = False) -> None:
        """``head_loss``: the model takes ``labels`` and returns each token's loss (its head fused with the
        cross-entropy, :class:`fm_train.model.loss.LMHead`), which ``loss_fn`` reduces; else it returns logits."""
        super().__init__()
        self.model = model  # keys stay "model.model.layers..." inside the wrapper; stripped on export
        self.loss_fn = loss_fn
        self.sp = sp
        self.head_loss = head_loss
        # Per-source metrics: (logits, labels) -> per-sample (loss sums, token counts), no gradient; None: off.
        self.sample_loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._sample_losses: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if self.sp.size > 1 or document_ids is not None:
            batch = {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}
            input_ids, labels, extra = local_inputs(batch, self.sp, device=input_ids.device)
        if self.head_loss:
            extra["labels"] = labels
        return self._loss(self.model(input_ids, **extra), labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.sample_loss_fn is not None and self.training and self.head_loss:  # per-token losses: sum them
            self._sample_losses = (logits.detach().sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1).to(torch.float32))
        elif self.sample_loss_fn is not None and self.training:  # from the same logits: no second forward
            self._sample_losses = self.sample_loss_fn(logits.detach(), labels)
        return self.loss_fn(logits, labels)

    def take_sample_losses(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-sample (loss sums, token counts) of the last training forward (once), when enabled."""
        out, self._sample_losses = self._sample_losses, None
        return out


def build_dense_model(cfg: FmConfig, family: FamilySpec, init: InitSource | None = None) -> nn.Module:
    """The whole pure model on torch's default device (a GPU rank's own under :func:`build_train_module`, else
    CPU), initialised exactly as in every other layout (``init``: default the run seed)."""
    args = family.modules().args(cfg.model)
    model = args.build()
    init = cfg.run.seed if init is None else init
    if isinstance(init, int):  # the per-parameter seeded init every layout slices (ModelArgs.init_parameter)
        with torch.no_grad():
            for name, param in model.named_parameters():
                args.init_parameter(name, param, init)
    elif isinstance(init, SliceReader):  # one tensor at a time: never the checkpoint and the model at once
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(initial_value(args, init, name))
    else:
        model.load_state_dict(dict(init), strict=True)  # copies (and casts) into the model's own tensors
    return model


def build_zero3_model(cfg: FmConfig, family: FamilySpec, init: InitSource | None = None,
                      ds_config: dict[str, Any] | None = None) -> nn.Module:
    """The pure model partitioned over the data-parallel ranks as it is built (ZeRO-3, tp = pp = 1).

    ``deepspeed.zero.Init`` partitions each sub-module's parameters as soon as its constructor
    returns, so a rank holds its partitions plus the parameters of one module at a time, never the
    whole model; each partition is then overwritten with its slice of the initial weights.
    ``ds_config`` is the config ``deepspeed.initialize`` will get (its precision decides the dtype
    of the partitions); default: rendered from ``cfg``.
    """
    args = family.modules().args(cfg.model)
    # Without zero.Init's broadcast of each new parameter: every partition is overwritten below.
    with partitioned_construction(ds_config if ds_config is not None else deepspeed_config(cfg)):
        model = args.build()
    return materialize_zero3_(model, args, cfg.run.seed if init is None else init)


def build_tp_model(family: FamilySpec, args: Any, tp: TPGroup, init: InitSource, ep: EPGroup | None = None) -> nn.Module:
    """The pure model with the family's tp plan applied (and with ``ep``, its experts split), holding only
    this rank's shards of the initial weights.

    Built on the meta device, so the full model never exists on a rank; each shard equals the
    matching slice of :func:`build_dense_model`'s weights, and from a Hugging Face checkpoint a rank
    reads only its shards and its experts. Its forward returns vocab-sharded logits when tp > 1.
    """
    modules = family.modules()
    with torch.device("meta"):
        model = args.build()
    apply_tensor_parallel(model, tp, modules.tp_plan)
    rows = {}
    if ep is not None:
        apply_expert_parallel(model, ep, modules.expert_types)
        rows = {f"{name}.{pname}": (ep.rank, ep.size) for name, m in model.named_modules()
                if isinstance(m, modules.expert_types) for pname, _ in m.named_parameters(recurse=False)}
    materialize_(model, args, init, tp, modules.tp_plan, rows=rows)
    modules.finish_materialize(model, args)  # derived buffers (RoPE tables) are recomputed, not initialised
    return model


def _check(cfg: FmConfig, family: FamilySpec, groups: ParallelGroups | None) -> None:
    p = cfg.parallel
    errors = layout_errors(family, family.modules().args(cfg.model), p.tp, p.pp)
    if (p.tp > 1 or p.pp > 1 or p.ep > 1 or p.sp > 1) and groups is None:
        errors.append(f"parallel.tp={p.tp}, parallel.pp={p.pp}, parallel.ep={p.ep}, parallel.sp={p.sp} needs the"
                      " rank's ParallelGroups:"
                      " build_train_module(cfg, family, groups=ParallelGroups(topology))")
    if groups is not None and (groups.topology.tp, groups.topology.pp, groups.topology.sp) != (p.tp, p.pp, p.sp):
        t = groups.topology
        errors.append(f"groups were built for tp={t.tp}, pp={t.pp}, sp={t.sp} but the config says parallel.tp={p.tp},"
                      f" parallel.pp={p.pp}, parallel.sp={p.sp}")
    if errors:
        raise ValueError("cannot build the train module:\n  " + "\n  ".join(errors))


def build_train_module(cfg: FmConfig, family: FamilySpec, groups: ParallelGroups | None = None, *,
                       init: InitSource | None = None, ds_config: dict[str, Any] | None = None) -> nn.Module:
    """The trainable module for ``cfg``'s layout; raises ``ValueError`` before any step if it cannot exist.

    ``init``: the initial weights (default: the run seed; a state dict by pure-model name, or a
    ``SliceReader`` such as ``open_hf``'s weights, for continued pretraining). ``ds_config``: the
    DeepSpeed config the engine will get, when it is not the one rendered from ``cfg`` (read by the
    ZeRO-3 build only).

    - tp = pp = 1: the dense model wrapped with its loss (``groups`` unused); with ZeRO-3 and a
      process group, built already partitioned (:func:`build_zero3_model`).
    - tp > 1, pp = 1: the tp-sharded model with the vocab-parallel loss; pass ``mpu=groups`` to
      ``deepspeed.initialize``.
    - sp > 1 (pp = 1): as above, each ``CoreAttention`` wrapped for Ulysses and the wrapper cutting
      every batch to this rank's chunk of the tokens.
    - pp > 1: a ``PipelineModule`` (tp-sharded stages when tp > 1) with activation checkpointing
      inside the stages when ``parallel.activation_checkpointing``; DeepSpeed takes its ``mpu``
      from the module, so pass none.
    """
    _check(cfg, family, groups)
    with _init_device():  # the initial weights are drawn where the rank will hold them
        module = _build(cfg, family, groups, init, ds_config)
    if cfg.parallel.ep > 1:
        assert groups is not None  # _check raised otherwise
        _register_experts(module, family, groups)
    return module


def _init_device() -> torch.device:
    """Where a rank builds its module and draws its initial weights: its GPU (where DeepSpeed would move
    them anyway), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _build(cfg: FmConfig, family: FamilySpec, groups: ParallelGroups | None, init: InitSource | None,
           ds_config: dict[str, Any] | None) -> nn.Module:
    p, modules = cfg.parallel, family.modules()
    args = modules.args(cfg.model)
    init = cfg.run.seed if init is None else init
    if modules.set_layer_loss_scale is not None:  # DeepSpeed puts 1 / grad_accum on each micro-batch's loss
        modules.set_layer_loss_scale(1.0 / cfg.train.grad_accum)
    module: nn.Module
    sp = _sp_group(groups) if p.sp > 1 and groups is not None else SINGLE_SP
    # A family whose head computes the loss itself (never the full logits) gets the labels into its forward.
    head_loss = modules.head_loss(args) if modules.head_loss is not None else None
    wrap = functools.partial(ModelWithLoss, sp=sp, head_loss=head_loss is not None)
    if p.tp == 1 and p.pp == 1:
        loss = head_loss or modules.loss(args)
        # Without a process group there is nothing to partition over (a single-process reference).
        if p.zero_stage == 3 and dist.is_initialized():
            module = wrap(build_zero3_model(cfg, family, init, ds_config), loss)
        elif p.ep > 1:
            assert groups is not None  # _check raised otherwise
            module = wrap(build_tp_model(family, args, SINGLE, init, ep=_ep_group(groups)), loss)
        else:
            module = wrap(build_dense_model(cfg, family, init), loss)
        if len(cfg.data.sources) > 1 and cfg.logging.loss_per_source and p.sp == 1:  # whole logits of whole samples
            module.sample_loss_fn = functools.partial(per_sample_cross_entropy, vocab_size=args.vocab_size)
    else:
        assert groups is not None  # _check raised otherwise
        tp = TPGroup.from_groups(groups, sequence_parallel=p.tp_sequence_parallel,
                                 regather=not p.activation_checkpointing,
                                 overlap=p.tp_overlap and p.zero_stage < 3)
        if p.pp > 1:
            module = modules.build_pipeline(args, pp=p.pp, dp=groups.topology.dp, tp=tp, seed=init,
                                            activation_checkpointing=p.activation_checkpointing
                                            and p.recompute_blocks is None)
            if p.activation_checkpointing and p.recompute_blocks is not None:  # DeepSpeed's interval does all or none
                apply_activation_checkpointing(module, modules.block_types, limit=p.recompute_blocks)
            if p.ep > 1:  # the stages are built whole: split their experts now
                apply_expert_parallel(module, _ep_group(groups), modules.expert_types)
        else:
            module = wrap(build_tp_model(family, args, tp, init, ep=_ep_group(groups) if p.ep > 1 else None),
                          head_loss or vocab_loss(modules.loss(args), args.vocab_size, tp))
    apply_sequence_parallel(module, sp)
    module.sp = sp  # what the pipeline's feed, evaluation and probe cut each batch by (sequence_group)
    return module


def _sp_group(groups: ParallelGroups) -> SPGroup:
    t = groups.topology
    return SPGroup(groups.group("sp"), t.sp_rank(groups.rank), t.sp)


def _ep_group(groups: ParallelGroups) -> EPGroup:
    ranks = groups.ranks("ep")
    return EPGroup(groups.group("ep"), ranks.index(groups.rank), len(ranks))


def _register_experts(module: nn.Module, family: FamilySpec, groups: ParallelGroups) -> None:
    """Expert parallelism applied to ``module`` (each rank keeps its experts and exchanges tokens with its
    expert-parallel group): DeepSpeed learns which parameters are experts and over which ranks to
    average their gradients."""
    experts = [m for m in module.modules() if isinstance(m, family.modules().expert_types)]
    if not experts:
        raise ValueError(f"parallel.ep={groups.topology.ep}, but the {family.name} model has no experts to split")
    ep_ranks, edp_ranks = groups.ranks("ep"), groups.ranks("edp")
    register_expert_groups(len(ep_ranks), groups.group("ep"), ep_ranks, groups.group("edp"), edp_ranks)
    total = len(ep_ranks) * next(experts[0].parameters()).shape[0]
    mark_expert_parameters(experts, ep=len(ep_ranks), total_experts=total)
