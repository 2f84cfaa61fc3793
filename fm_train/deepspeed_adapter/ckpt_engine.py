"""A wrapper around a DeepSpeed engine's checkpoint engine while fm-train saves or loads a step.

DeepSpeed writes and reads every one of its checkpoint files through ``engine.checkpoint_engine``
(``save(state_dict, path)``, ``load(path, map_location)``; a ``PipelineEngine`` hands the same object
to its layer files). :func:`guarded_checkpoint_engine` swaps in (with
:func:`fm_train.deepspeed_adapter.engine.swapped_checkpoint_engine`) :class:`GuardedCheckpointEngine` for
the duration of one call, which

- records the paths this rank saved, so that each rank hashes exactly its own files after the save;
- loads with ``weights_only=True`` and DeepSpeed's plain record classes
  (:func:`fm_train.deepspeed_adapter.ckpt_files.safe_torch_load`) instead of the stock
  ``TorchCheckpointEngine.load``'s ``weights_only=False``, unless the run trusts its checkpoints.

Everything else (``makedirs``, ``create``, ``commit``, ``is_decoupled``, ...) goes to the original.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fm_train.deepspeed_adapter.ckpt_files import RESUME_HINT, safe_torch_load


class GuardedCheckpointEngine:
    """Delegates to ``inner``; records saved paths in :attr:`saved`; loads without arbitrary pickles."""

    def __init__(self, inner: Any, *, trust: bool, hint: str = RESUME_HINT) -> None:
        self._inner = inner
        self._trust = trust
        self._hint = hint
        self.saved: list[Path] = []

    def save(self, state_dict: Any, path: str) -> None:
        """Save through the original engine and remember ``path``."""
        self._inner.save(state_dict, path)
        self.saved.append(Path(path))

    def load(self, path: str, map_location: Any = None) -> Any:
        """Load ``path`` with ``weights_only=True`` (plus the allow-list) unless trusted."""
        return safe_torch_load(Path(path), trust=self._trust, map_location=map_location, hint=self._hint)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def guarded_checkpoint_engine(engine: Any, *, trust: bool, hint: str = RESUME_HINT) -> Iterator[GuardedCheckpointEngine]:
    """Install a :class:`GuardedCheckpointEngine` on ``engine`` for the ``with`` block, then restore."""
    from fm_train.deepspeed_adapter.engine import swapped_checkpoint_engine

    with swapped_checkpoint_engine(engine, lambda inner: GuardedCheckpointEngine(inner, trust=trust, hint=hint)) as guard:
        yield guard
