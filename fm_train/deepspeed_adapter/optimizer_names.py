"""The optimizer's per-parameter state names (Adam's moments), taken from the optimizer, not spelled out.

fm-train trains with Adam(W) (DeepSpeed's fused/CPU Adam or torch's, all keeping torch's state names);
checkpoints hold its moments under those names, and resharding writes them back under the same
names. Rather than a string constant per reader, the names come from one step of torch's ``AdamW``
on a one-element parameter, once per process: a torch that renamed them would change them here and
in every reader at once.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def adam_moments() -> tuple[str, ...]:
    """The tensor state names Adam keeps per parameter besides its step count (torch: ``exp_avg``,
    ``exp_avg_sq``), in the order torch creates them."""
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.ones(1)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    optimizer.step()
    return tuple(k for k, v in optimizer.state[param].items() if k != "step" and isinstance(v, torch.Tensor))

