"""Pure Llama-family model (imports torch only)."""

from fm_train.model.llama import (
    LlamaArgs,
    LlamaForCausalLM,
    args_from_config,
    causal_lm_loss,
)

__all__ = ["LlamaArgs", "LlamaForCausalLM", "args_from_config", "causal_lm_loss"]
