"""Everything about where training stands that a checkpoint must carry besides the engine's tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.optim.lr_scheduler import LRScheduler

STATE_VERSION = 1


@dataclass
class TrainState:
    """Step, tokens seen, the data stream position and the LR scheduler, in one saveable place.

    ``data_state`` is the ``state`` dict of the last batch consumed: the reader resumes right after
    it (it travels with each batch, so prefetching cannot skew it). ``lr_scheduler`` is a live object
    (the engine's); only its ``state_dict`` is saved.
    """

    step: int = 0
    tokens_seen: int = 0
    data_state: dict[str, Any] | None = None
    data_receipt: str = ""
    lr_scheduler: LRScheduler | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly values (plus the scheduler's own small dict) for a checkpoint manifest."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_state": self.data_state,
            "data_receipt": self.data_receipt,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the scheduler (if any) is set to the saved step as well."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"train state version {state.get('version')!r} is not {STATE_VERSION}; was it written by a newer fm-train?")
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.data_state = state["data_state"]
        self.data_receipt = str(state["data_receipt"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            # load_state_dict restores the counter but not the rate the optimizer holds right now.
            for group, lr in zip(self.lr_scheduler.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
