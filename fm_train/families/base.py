"""The contract of a model family: what the engine, checkpoints, planner and converter may ask of one.

A family bundles what differs between, say, a Llama decoder and a BERT encoder: the pure module and
its shape arguments, the train module for a layout (its tensor-parallel plan and pipeline split
applied from outside the pure model), the objective, the manifest's layer table, the blocks that
activation checkpointing and ``torch.compile`` wrap, the Hugging Face config and key map, and the
FLOPs and parameter formulas. Everything else (ZeRO, checkpoint files, resharding, the launcher) is
the same for every family and never asks which one it has.

Implementations import torch, DeepSpeed and transformers inside their methods, so that looking a
family up (the config, the planner, the launcher) stays cheap.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol


class ModelFamily(Protocol):
    """One model family (``model.family`` names it; :func:`fm_train.families.family_of` finds it)."""

    #: ``model.family`` value.
    name: str
    #: ``config.json`` ``model_type`` of the family's Hugging Face models (import and export).
    hf_model_type: str
    #: ``architectures`` entry of an export (the class ``AutoModel...`` loads).
    hf_architecture: str
    #: The ``transformers`` auto class that loads an export (``AutoModelForCausalLM``, ...).
    hf_auto_class: str

    def args(self, model_cfg: Any) -> Any:
        """The pure module's shape arguments from the config's ``model`` section."""

    def build(self, args: Any) -> Any:
        """The pure ``nn.Module`` on the current default device (``torch.device("meta")`` works)."""

    def finish_materialize(self, model: Any, args: Any) -> None:
        """Make a pure module built on meta and given storage by ``to_empty`` whole again: tie its tied
        weights once more (``to_empty`` gives each its own storage) and recompute derived buffers
        (RoPE tables, ...), which no checkpoint holds."""

    def loss(self, args: Any) -> LossFn:
        """The objective on the pure module's output: ``loss(output, labels) -> scalar`` (tp = pp = 1)."""

    def config_errors(self, cfg: Any) -> list[str]:
        """The family's own rules on a whole ``FmConfig`` (torch-free), each naming the field and the fix."""

    def data_objective(self, info: Any, *, model_vocab_size: int, seed: int) -> Any:
        """What the data path must produce for the objective: None for next-token batches, or a
        ``data_shards`` objective (``MaskedLM``) for the sources' ``SourcesInfo`` ``info``, a model of
        ``model_vocab_size`` ids (``model.vocab_size``) and the run's ``seed``."""

    def tokenizer_specials(self) -> dict[str, str]:
        """Special tokens the family appends after the shards' tokenizer vocabulary (``{"mask_token":
        "[MASK]", ...}``, in id order); the export's tokenizer gets them too. Empty: none."""

    def build_train_module(self, cfg: Any, groups: Any = None, *, init: Any = None,
                           ds_config: Mapping[str, Any] | None = None) -> Any:
        """The trainable module of ``cfg``'s layout (the engine's contract: ``forward(inputs, labels) -> loss``,
        or a ``PipelineModule``), built with parallelism applied from outside the pure module."""

    #: How tensor parallelism splits the pure module (a :class:`fm_train.parallel.tp_plan.TPPlan`).
    tp_plan: Any

    def build_pipeline(self, args: Any, *, pp: int, dp: int, tp: Any, seed: Any,
                       activation_checkpointing: bool = False) -> Any:
        """The family's DeepSpeed ``PipelineModule`` over a ``pp x dp x tp`` grid (``tp``: this rank's
        ``TPGroup``, ``seed``: the initial weights), fed ``((input_ids,), labels)``; every rank calls it."""

    def layout_errors(self, args: Any, tp: int, pp: int) -> list[str]:
        """Every reason the model cannot be split ``tp`` ways and into ``pp`` stages (empty when it can)."""

    def manifest_layers(self, cfg: Any) -> list[dict[str, Any]]:
        """The manifest's layer table: pipeline index -> pure-model module and its tp split dims."""

    def manifest_tied(self, cfg: Any) -> dict[str, str]:
        """DeepSpeed's tied-module key -> pure-model module for a pipeline (empty when nothing is tied)."""

    def block_types(self) -> tuple[type, ...]:
        """The repeated blocks: what activation checkpointing recomputes and ``torch.compile`` compiles."""

    def logits(self, output: Any, vocab_size: int) -> Any:
        """The module's output as logits over the real vocabulary (padding columns dropped)."""

    def sample(self, hf_dir: Any, *, prompt: str, max_new_tokens: int, seed: int) -> str:
        """A few lines showing what the converted model in ``hf_dir`` computes (printed after a launch):
        a continuation of ``prompt`` for a decoder, the top fillers of a mask after it for an encoder."""

    def hf_config(self, model_fields: Mapping[str, Any], *, dtype: str, bos: int | None, eos: int | None) -> Any:
        """A ``transformers`` config object matching the checkpoint's model fields exactly."""

    #: ``model`` config field -> the ``config.json`` key it comes from (named in error messages).
    hf_config_keys: Mapping[str, str]

    def fields_from_hf(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """``model`` config fields (``family`` included) of a Hugging Face ``config.json``; ``KeyError``
        naming a missing key. Torch-free: the config loader reads it for ``model.init_from``."""

    def hf_import_problems(self, raw: Mapping[str, Any]) -> list[str]:
        """Why a ``config.json`` of this family's ``model_type`` describes a model fm-train's would compute
        differently (activation, position scheme, biases ...); empty when it imports exactly."""

    def hf_key_templates(self) -> Mapping[str, str]:
        """fm-train parameter name template -> Hugging Face template (``{i}``: block index); also the
        whitelist of names an export may contain."""

    def tied_params(self, model_fields: Mapping[str, Any]) -> dict[str, str]:
        """Tied parameter -> the parameter it shares, for a model of these fields (empty: nothing tied).
        A checkpoint or Hugging Face dir may hold the tied one too; readers take the shared one."""

    def vocab_row_params(self) -> tuple[str, ...]:
        """Name suffixes of parameters with one row per (padded) vocabulary entry."""

    def parameter_count(self, shape: Any) -> int:
        """Trainable parameters of a model of this shape (tied weights once), without building it."""

    def flops_per_token(self, shape: Any, seq_len: int) -> float:
        """Model FLOPs of one trained token (forward + backward) at ``seq_len``: the MFU numerator."""

    # The planner's memory terms (fm_train.plan.memory); the rest of its estimate is the same for every family.
    def block_params(self, shape: Any) -> int:
        """Parameters of one block's matmuls, before tensor-parallel splitting (ZeRO-3's gathered working set)."""

    def stage_params(self, cfg: Any) -> int:
        """Parameters of the largest pipeline stage of ``cfg``, before tensor-parallel splitting."""

    def activation_bytes_per_layer(self, cfg: Any) -> float:
        """Bytes one block keeps for backward, per micro-batch, without recomputation."""


def split_dims(family: ModelFamily, args: Any) -> dict[str, int | None]:
    """Pure-model parameter name -> its tp split dim under ``family``'s plan (tied duplicates included)."""
    import torch

    from fm_train.parallel.tensor_parallel import tp_split_dims

    with torch.device("meta"):
        return tp_split_dims(family.build(args), family.tp_plan)


#: ``ModelFamily.build_train_module``'s loss: ``(logits or hidden states, labels) -> scalar``.
LossFn = Callable[[Any, Any], Any]
