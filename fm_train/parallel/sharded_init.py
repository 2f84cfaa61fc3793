"""Materialise only this rank's shard of a model built on the meta device, equal to slicing the full init.

``LlamaForCausalLM.init_weights`` draws every parameter from a generator seeded by the run seed and
the parameter's name, so one parameter's full value can be produced on its own. A shard is then that
full tensor sliced along its tp split dim: tp2 starts from exactly the weights of tp1, and a rank never
holds more than one full parameter at a time (never the whole model).
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn

from fm_train.model.llama import LlamaArgs, LlamaForCausalLM
from fm_train.parallel.tensor_parallel import TPGroup, mark_tensor_parallel, retie, shard, split_dim_of, tied_parameters


@functools.lru_cache(maxsize=8)
def full_shapes(args: LlamaArgs) -> dict[str, torch.Size]:
    """Unsharded shape of every parameter of the pure model, by name (built on meta: no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    return {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}


class _OneParameter:
    """Stands in for the model inside ``LlamaForCausalLM.init_weights``, which reads ``args`` and
    ``named_parameters()`` only; this reuses the model's own recipe (std, residual scaling, per-name
    seed) for one tensor instead of copying it here, where it could drift."""

    def __init__(self, args: LlamaArgs, name: str, tensor: torch.Tensor) -> None:
        self.args, self._name, self._tensor = args, name, tensor

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield self._name, self._tensor


def full_init(args: LlamaArgs, seed: int, name: str) -> torch.Tensor:
    """The full fp32 initial value of the pure model's parameter ``name`` (a Hugging Face key)."""
    if name == "lm_head.weight" and args.tie_embeddings:
        name = "model.embed_tokens.weight"  # the tied head is the embedding; init_weights sees that name
    shapes = full_shapes(args)
    if name not in shapes:
        raise KeyError(f"{name!r} is not a parameter of the model (known: {sorted(shapes)[:4]} ...)")
    tensor = torch.empty(shapes[name], dtype=torch.float32)
    LlamaForCausalLM.init_weights(_OneParameter(args, name, tensor), seed)  # type: ignore[arg-type]
    return tensor


@torch.no_grad()
def materialize_(module: nn.Module, args: LlamaArgs, seed: int, tp: TPGroup, *, prefix: str = "",
                 device: torch.device | str = "cpu") -> nn.Module:
    """Give ``module``'s parameters real storage holding this rank's shard of the seeded init.

    ``prefix + local name`` must be the pure model's parameter name (``model.layers.3.`` for a
    pipeline block, empty for the whole model). Buffers become uninitialised storage: the caller
    recomputes them (RoPE tables are derived from ``args``, never stored).
    """
    ties = tied_parameters(module)
    if any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()]):
        module.to_empty(device=device)
        retie(module, ties)  # to_empty replaces each module's parameters separately, breaking ties
    for name, param in module.named_parameters():
        full_name = prefix + name
        dim = split_dim_of(full_name)
        param.copy_(shard(full_init(args, seed, full_name), dim, tp))
        mark_tensor_parallel(param, dim, tp)  # to_empty made new Parameter objects: tag them again
    return module
