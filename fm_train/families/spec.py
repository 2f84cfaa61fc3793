"""What a model family is to the rest of fm-train: one frozen :class:`FamilySpec` of a few typed parts.

The torch-free parts (``sizes``, ``objective``, ``hf``) serve the config rules, the planner, the
launcher and the converter without importing torch; ``modules()`` loads the torch side (the pure
module's arguments, its blocks, loss, tensor-parallel plan and pipeline split) on first use. The
family is resolved once, by an entry point (:func:`fm_train.families.family_of`), and handed to
whatever needs it. The helpers below derive what every family computes the same way from its parts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fm_train.config import FmConfig
    from fm_train.model.base import ModelArgs
    from fm_train.parallel.tp_plan import TPPlan

#: A family's training loss: ``(logits or hidden states, labels) -> scalar``.
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Sizes:
    """Torch-free formulas over the ``model`` fields (``shape``: a ``ModelConfig`` or the module's args)
    or the whole config (``cfg``): the planner's memory terms, the MFU numerator, the family's config rules."""

    #: Trainable parameters (tied weights once), without building the model.
    parameter_count: Callable[[Any], int]
    #: Model FLOPs of one trained token (forward + backward) at a sequence length.
    flops_per_token: Callable[[Any, int], float]
    #: Parameters of one block's matmuls before tensor-parallel splitting (ZeRO-3's gathered working set).
    block_params: Callable[[Any], int]
    #: Parameters of the largest pipeline stage of ``cfg``, before tensor-parallel splitting.
    stage_params: Callable[["FmConfig"], int]
    #: Bytes one block keeps for backward, per micro-batch, without recomputation.
    activation_bytes_per_layer: Callable[["FmConfig"], float]
    #: The family's own rules on a whole config, each naming the field and the fix.
    config_errors: Callable[["FmConfig"], list[str]]
    #: Parameters one token computes with (a Mixture-of-Experts model: its k experts only); None: all.
    active_parameter_count: Callable[[Any], int] | None = None
    #: Parameters of the routed experts, which expert parallelism splits (None: the family has none).
    expert_parameter_count: Callable[[Any], int] | None = None
    #: Bytes of expert parallelism's token exchange on the busiest rank of ``cfg`` (None: no experts).
    dispatch_bytes: Callable[["FmConfig"], float] | None = None
    #: The output head is fused with the loss (``Modules.head_loss``): the last stage holds a few rows of
    #: logits at a time, not the whole ``tokens x vocab`` and its fp32 copies (the planner's loss term).
    fused_head_loss: bool = False
    #: With ``fused_head_loss``: how many tokens of one micro-batch of ``cfg`` the fused head computes, at
    #: most (a masked LM's head runs on the masked ones only); None: all of them.
    head_tokens: Callable[["FmConfig"], int] | None = None


@dataclass(frozen=True)
class Objective:
    """What the data path and the tokenizer must provide for the family's objective (torch-free)."""

    #: Special tokens appended after the shards' tokenizer vocabulary, in id order (empty: none).
    tokenizer_specials: Mapping[str, str]
    #: ``(sources_info, model_vocab_size, seed)`` -> None for next-token batches, or a ``data_shards``
    #: objective (``MaskedLM``) the loader applies.
    data: Callable[[Any, int, int], Any]


@dataclass(frozen=True)
class HuggingFace:
    """The family's Hugging Face side: names, ``config.json`` mapping, import rules (torch-free);
    ``config`` and ``sample`` import ``transformers`` when called."""

    #: ``config.json`` ``model_type`` (import and export).
    model_type: str
    #: ``architectures`` entry of an export.
    architecture: str
    #: The ``transformers`` auto class that loads an export.
    auto_class: str
    #: ``model`` config field -> the ``config.json`` key it comes from (named in error messages).
    config_keys: Mapping[str, str]
    #: fm-train parameter name template -> Hugging Face template (``{i}``: block index); the export whitelist.
    key_templates: Mapping[str, str]
    #: ``config.json`` -> ``model`` fields (``family`` included); ``KeyError`` naming a missing key.
    fields_from_config: Callable[[Mapping[str, Any]], dict[str, Any]]
    #: Why a ``config.json`` describes a model fm-train's would compute differently (empty: imports exactly).
    import_problems: Callable[[Mapping[str, Any]], list[str]]
    #: ``(model_fields, dtype=, bos=, eos=, pad=None)`` -> a ``transformers`` config matching the checkpoint
    #: exactly (``pad``: a dedicated padding token's id, which transformers makes the embedding's padding_idx).
    config: Callable[..., Any]
    #: ``(hf_dir, prompt=, max_new_tokens=, seed=)`` -> a few lines showing what an export computes.
    sample: Callable[..., str]
    #: Fused expert parameter (fm-train template) -> its per-expert Hugging Face keys (``{e}``: expert),
    #: each ``(template, part, parts)``: chunk ``part`` of ``parts`` of expert e's rows (empty: none).
    expert_pieces: Mapping[str, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)
    #: The export's tokenizer pads with its EOS token when it has no padding token (decoders); False: padding
    #: comes from the family's ``tokenizer_specials`` (an encoder's [PAD]).
    pads_with_eos: bool = False


@dataclass(frozen=True)
class Modules:
    """The torch side of a family, loaded by :meth:`FamilySpec.modules`."""

    #: The pure module's shape arguments from the config's ``model`` section.
    args: Callable[[Any], "ModelArgs"]
    #: The repeated blocks: what activation checkpointing recomputes and ``torch.compile`` compiles.
    block_types: tuple[type, ...]
    #: Make a module built on meta and given storage by ``to_empty`` whole again (ties, derived buffers).
    finish_materialize: Callable[["nn.Module", Any], None]
    #: The objective on the pure module's output at tp = pp = 1.
    loss: Callable[[Any], LossFn]
    #: How tensor parallelism splits the pure module.
    tp_plan: "TPPlan"
    #: ``model`` fields tensor parallelism must divide.
    tp_divided: tuple[str, ...]
    #: Pipeline layer index -> the pure model's module prefix of that layer's parameters.
    pipeline_layer_names: Callable[[Any], dict[int, str]]
    #: Layer boundaries of ``pp`` balanced stages; ``ValueError`` naming the fix when impossible.
    stage_bounds: Callable[[Any, int], list[int]]
    #: ``(args, pp=, dp=, tp=, seed=, activation_checkpointing=)`` -> a DeepSpeed ``PipelineModule``.
    build_pipeline: Callable[..., Any]
    #: The module a pipeline saves under ``tied_modules.<key>`` for this ``model`` section (None: nothing tied).
    pipeline_tied_module: Callable[[Any], str | None]
    #: Modules holding stacked experts (one row per expert; ``forward(tokens, counts)``) that expert
    #: parallelism splits (empty: the family has none).
    expert_types: tuple[type, ...] = ()
    #: Sets the factor the engine puts on each micro-batch's loss (``1 / grad_accum``) on the losses the
    #: family adds inside its layers (MoE router losses); None: it adds none.
    set_layer_loss_scale: Callable[[float], None] | None = None
    #: Metrics the model measured in its forwards since the last call, ``name -> (sum, count)`` with the
    #: same names on every rank (the loop adds both over all ranks, then divides); the counters restart.
    #: MoE: router losses and expert load. None: nothing beyond the loss.
    take_metrics: Callable[["nn.Module"], dict[str, tuple[float, float]]] | None = None
    #: ``(metric, label, format)`` of the metrics above worth a place on the stdout log line.
    metric_fields: tuple[tuple[str, str, str], ...] = ()
    #: The objective when the pure module (pp = 1) is given ``labels``: its head then returns each token's loss
    #: (the head fused with the cross-entropy, tensor-parallel or not; :class:`fm_train.model.loss.LMHead`) and
    #: this reduces them, ``(token losses, labels) -> scalar``. None: the module returns logits, ``loss`` applies.
    head_loss: Callable[[Any], LossFn] | None = None


@dataclass(frozen=True, eq=False)
class FamilySpec:
    """One model family (``model.family`` names it); one instance per family, compared and hashed by identity."""

    name: str
    #: What the family trains, for help texts ("Llama-family decoders").
    summary: str
    sizes: Sizes
    objective: Objective
    hf: HuggingFace
    #: Tied parameter -> the parameter it shares, for a model of these fields (empty: nothing tied).
    tied_params: Callable[[Mapping[str, Any]], dict[str, str]]
    #: Name suffixes of parameters with one row per (padded) vocabulary entry.
    vocab_row_params: tuple[str, ...]
    #: Loads the torch side (imported on first use, so that the registry stays torch-free).
    load_modules: Callable[[], Modules]

    def modules(self) -> Modules:
        """The family's torch side."""
        return _modules(self.load_modules)


@functools.cache
def _modules(load: Callable[[], Modules]) -> Modules:
    """``load()``, once per family."""
    return load()


def split_dims(family: FamilySpec, args: Any) -> dict[str, int | None]:
    """Pure-model parameter name -> its tp split dim under the family's plan (tied duplicates included)."""
    import torch

    from fm_train.parallel.tensor_parallel import tp_split_dims

    with torch.device("meta"):
        return tp_split_dims(args.build(), family.modules().tp_plan)


def layout_errors(family: FamilySpec, args: Any, tp: int, pp: int) -> list[str]:
    """Every reason the model of ``args`` cannot be split ``tp`` ways and into ``pp`` stages (empty: it can)."""
    modules = family.modules()
    errors = [f"parallel.tp={tp} does not divide model.{f}={getattr(args, f)}; pick a tp that divides it"
              for f in modules.tp_divided if getattr(args, f) % tp]
    if args.padded_vocab_size % tp:
        errors.append(f"parallel.tp={tp} does not divide the padded vocabulary {args.padded_vocab_size}"
                      f" (model.vocab_size={args.vocab_size}, model.vocab_multiple={args.vocab_multiple}): the"
                      f" vocab-parallel embedding cannot split it; set model.vocab_multiple to a multiple of {tp}")
    if pp > 1:
        try:
            modules.stage_bounds(args, pp)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def manifest_layers(family: FamilySpec, cfg: "FmConfig") -> list[dict[str, Any]]:
    """The manifest's layer table: pipeline index -> pure-model module and its tp split dims.

    The index is the pipeline's own (the converter renames ``layer_XX`` keys with it), the dims the
    tp plan's (the converter concatenates ``mp_rank`` shards along them); recorded for every layout,
    so a reader never has to guess which applies.
    """
    from fm_train.parallel.pipeline import layer_table

    modules = family.modules()
    args = modules.args(cfg.model)
    return layer_table(modules.pipeline_layer_names(args), split_dims(family, args))


def manifest_experts(family: FamilySpec, cfg: "FmConfig") -> dict[str, Any] | None:
    """The manifest's ``experts`` record when ``parallel.ep`` > 1 (None otherwise): the pure model's
    stacked expert parameters, whichever pipeline stage holds them, and the global experts of each ep
    rank (consecutive runs, as :class:`fm_train.parallel.expert_parallel.EPGroup` keeps them).

    DeepSpeed's optimizer partitions carry every ep rank's rows under the same parameter name: this
    record is what lets a reader put the rows together again (:mod:`fm_train.deepspeed_adapter.ckpt_reader`).
    """
    ep = cfg.parallel.ep
    if ep == 1:
        return None
    import torch

    modules = family.modules()
    with torch.device("meta"):
        model = modules.args(cfg.model).build()
    params, experts = [], 0
    for name, module in model.named_modules():
        if isinstance(module, modules.expert_types):
            for pname, param in module.named_parameters(recurse=False):
                params.append(f"{name}.{pname}")
                experts = param.shape[0]
    per_rank = experts // ep
    return {"ep": ep, "params": params, "ranks": [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep)]}


def manifest_tied(family: FamilySpec, cfg: "FmConfig") -> dict[str, str]:
    """DeepSpeed's tied-module key -> pure-model module for a pipeline (empty when nothing is tied)."""
    if cfg.parallel.pp == 1:
        return {}
    from fm_train.parallel.pipeline import TIED_KEY

    module = family.modules().pipeline_tied_module(cfg.model)
    return {} if module is None else {TIED_KEY: module}
