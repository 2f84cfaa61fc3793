"""AdamW parameter groups: weight decay on matrices only.

Norm weights, biases and every other 1-D parameter are excluded from decay: decaying a norm's gain
or a bias towards zero only fights the loss (GPT-3, Llama and OLMo recipes all exclude them).
Embedding and output matrices are 2-D and decay like every other matrix.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fm_train.deepspeed_adapter.zero3 import unpartitioned_shape


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over ``module``'s trainable parameters: ``[decayed matrices, undecayed rest]``.

    Shared (tied) parameters appear once, as ``named_parameters`` yields them once. Each group carries
    a ``names`` list (ignored by the optimizer) so logs and tests can see which weight went where.
    Empty groups are dropped, as DeepSpeed rejects them in some ZeRO stages.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 parameter built partitioned (deepspeed.zero.Init) is an empty 1-D placeholder.
        if len(unpartitioned_shape(param)) >= 2:
            decay.append(param)
            decay_names.append(name)
        else:
            no_decay.append(param)
            no_decay_names.append(name)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]
    return [g for g in groups if g["params"]]
