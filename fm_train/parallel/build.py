"""Build the trainable module for a layout: the pure model, then parallelism applied from outside.

Contract with the engine: for ``pp == 1`` the result is an ``nn.Module`` whose
``forward(input_ids, labels)`` returns the scalar mean next-token loss (vocab-parallel when tp > 1);
for ``pp > 1`` it is a ``deepspeed.pipe.PipelineModule`` fed ``((input_ids,), labels)`` tuples.
"""

from __future__ import annotations

import torch
from torch import nn

from fm_train.config import FmConfig
from fm_train.model import LlamaForCausalLM, args_from_config, causal_lm_loss


class CausalLMWithLoss(nn.Module):
    """Wraps the pure model so that DeepSpeed's engine sees ``forward(input_ids, labels) -> loss``."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model  # keys stay "model.model.layers..." inside the wrapper; stripped on export

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model(input_ids), labels)


def build_dense_model(cfg: FmConfig) -> LlamaForCausalLM:
    """The whole pure model on CPU, seeded-initialised exactly as in every other layout."""
    model = LlamaForCausalLM(args_from_config(cfg.model))
    model.init_weights(cfg.run.seed)
    return model


def build_train_module(cfg: FmConfig) -> nn.Module:
    """The trainable module for ``cfg``'s layout (tp = pp = 1 here; the parallel plans extend it)."""
    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1:
        raise NotImplementedError(
            f"parallel.tp={cfg.parallel.tp}, parallel.pp={cfg.parallel.pp}: tensor/pipeline plans are not built yet"
        )
    return CausalLMWithLoss(build_dense_model(cfg))
