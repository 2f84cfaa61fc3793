"""Tensor-parallel plans: which modules of a pure model are split, and how, by module name.

A plan names modules by a dotted suffix of their path (``q_proj`` matches ``model.layers.3.self_attn.q_proj``
and a pipeline block's local ``self_attn.q_proj``); the longest matching suffix wins, so a plan may say
``attention.output.dense`` where a leaf name alone (``dense``) would be ambiguous. Torch-free: the
families, the planner and the checkpoint manifest read it without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

Style = Literal["column", "row", "vocab"]


def _suffix_match(name: str, table: Mapping[str, object]) -> str | None:
    """The longest key of ``table`` that is ``name`` or a dotted suffix of it."""
    best = None
    for key in table:
        if (name == key or name.endswith("." + key)) and (best is None or len(key) > len(best)):
            best = key
    return best


@dataclass(frozen=True)
class TPPlan:
    """Megatron-style split of one model family.

    - ``modules``: module suffix -> style. ``column``: an ``nn.Linear`` split along its outputs
      (weight and bias dim 0); ``row``: split along its inputs (weight dim 1, the bias replicated and
      added after the all-reduce); ``vocab``: an ``nn.Embedding`` split along its rows.
    - ``params``: parameter suffix -> split dim, for parameters held directly by a module the plan does
      not swap (BERT's MLM bias, one entry per vocabulary column).
    - ``regions``: modules whose input enters the tp region once (a forward pre-hook), for the
      column-parallel linears inside them that share it (q/k/v).
    - ``summed_grads``: modules inside the region whose weights stay whole although each tp rank
      applies them to its own heads only (Qwen3's per-head q/k norms): each rank's gradient is a
      partial sum, so it is summed over the tp ranks in backward (Megatron-Core all-reduces its
      qk-layernorm gradients the same way).
    """

    modules: Mapping[str, Style]
    params: Mapping[str, int] = field(default_factory=dict)
    regions: tuple[str, ...] = ()
    summed_grads: tuple[str, ...] = ()

    def style_of(self, module: str) -> Style | None:
        """How the module named ``module`` is split (None: the plan leaves it whole)."""
        key = _suffix_match(module, self.modules)
        return None if key is None else self.modules[key]

    def is_region(self, module: str) -> bool:
        """Whether ``module``'s input is copied into the tp region on entry."""
        return _suffix_match(module, dict.fromkeys(self.regions)) is not None

    def sums_grads(self, module: str) -> bool:
        """Whether ``module``'s whole weights get gradients summed over the tp ranks."""
        return _suffix_match(module, dict.fromkeys(self.summed_grads)) is not None

    def own_param_dim(self, name: str) -> int | None:
        """Split dim of ``name`` when the plan lists the parameter itself (``params``), else None."""
        key = _suffix_match(name, self.params)
        return None if key is None else self.params[key]

    def split_dim_of(self, name: str) -> int | None:
        """Tensor-parallel split dim of the parameter ``name`` (None: replicated on every tp rank)."""
        own = self.own_param_dim(name)
        if own is not None:
            return own
        module, _, kind = name.rpartition(".")
        style = self.style_of(module)
        if style is None:
            return None
        if kind == "bias":  # column biases follow the split outputs; a row bias is added after the reduce
            return 0 if style == "column" else None
        return 1 if style == "row" else 0
