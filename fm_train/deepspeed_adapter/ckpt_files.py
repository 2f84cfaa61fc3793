"""Open one DeepSpeed checkpoint file: ``weights_only`` with DeepSpeed's plain record classes allowed,
unless the caller trusts the checkpoint; memory-mapped for the readers that slice tensors.

``torch.load(weights_only=False)`` rebuilds any object a pickle names, i.e. runs code chosen by whoever
wrote the file. DeepSpeed's files hold tensors, containers, numbers and strings plus four small record
classes, so everything fm-train reads (converter, resharding, and the resume's own loads through
:mod:`fm_train.deepspeed_adapter.ckpt_engine`) goes through :func:`safe_torch_load`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fm_train.storage.errors import CheckpointError
from fm_train.storage.ranged_reads import is_remote, ranged_tensors

CONVERT_HINT = "if you trust where this checkpoint came from, pass --trust-checkpoint"
RESUME_HINT = "if you trust where this checkpoint came from, set checkpoint.trust_pickles=true"


def _safe_globals() -> list[Any]:
    """DeepSpeed classes that its checkpoints pickle: plain records, safe to rebuild (imported on first
    use: reading a checkpoint's layout needs no DeepSpeed)."""
    from fm_train.deepspeed_adapter.files import checkpoint_record_classes

    return checkpoint_record_classes()


def safe_torch_load(path: Any, *, trust: bool, map_location: Any = "cpu", mmap: bool = False,
                    hint: str = CONVERT_HINT, fileobj: BinaryIO | None = None) -> Any:
    """``torch.load`` of ``path`` (or of ``fileobj``, opened from ``path``, which errors then name) with
    ``weights_only=True`` and the allow-list, unless ``trust``.

    A file that needs anything else is refused with a :class:`CheckpointError` naming it and ``hint``
    (how to trust it); undecodable bytes are reported as a damaged file, not as torch's traceback.
    """
    source: Any = fileobj if fileobj is not None else Path(path)
    try:
        if trust:
            return torch.load(source, map_location=map_location, mmap=mmap, weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(source, map_location=map_location, mmap=mmap, weights_only=True)
    except OSError as exc:  # unreadable, not damaged: permissions, the network, credentials, a vanished object
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} does not load with weights_only=True ({first}): it holds objects other than "
                              "tensors and DeepSpeed's plain records, and unpickling them would run code named by "
                              f"the file; {hint}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load's errors on damaged bytes have no common type
        # Garbage or torn bytes surface as RuntimeError (zip), UnicodeDecodeError, EOFError, ...: all mean
        # the file is damaged, and the user needs its name, not torch's traceback.
        lines = str(exc).strip().splitlines()
        raise CheckpointError(f"{path} is damaged: it does not load as a torch checkpoint ({type(exc).__name__}: "
                              f"{lines[0] if lines else ''}); copy it again from where the run wrote it") from None


def load_ds_file(path: Path, *, trust: bool, hint: str = CONVERT_HINT) -> dict[str, Any]:
    """``torch.load`` one DeepSpeed file memory-mapped, or, for a ``UPath`` in object storage, read in
    place by ranged reads (:mod:`fm_train.storage.ranged_reads`); ``weights_only=True`` unless ``trust``."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} lacks {path.name}: the checkpoint is incomplete (a rank's shard "
                              "was not written or not copied)")
    if is_remote(path):
        return load_ranged(path, trust=trust, hint=hint)
    return safe_torch_load(path, trust=trust, mmap=True, hint=hint)


def load_ranged(path: Any, *, trust: bool, hint: str) -> Any:
    """The DeepSpeed file at ``path`` (a remote ``UPath``) with its tensors as
    :class:`fm_train.storage.ranged_reads.RangedTensor`;
    the pickle is read with ``weights_only=True`` and DeepSpeed's records unless ``trust``."""
    # The pickle and the zip directory: small reads near each other, so a modest read-ahead.
    with path.fs.open(path.path, "rb", block_size=1 << 20, cache_type="readahead") as fh:
        tree = safe_torch_load(path, trust=trust, map_location="meta", hint=hint, fileobj=fh)
    return ranged_tensors(tree, path)


def scan_pickles(files: list[Path], *, hint: str = RESUME_HINT) -> int:
    """Open each of ``files`` with ``weights_only=True`` (memory-mapped: only the pickle is read) and raise
    naming the first that needs more. Returns how many were checked.

    Run before DeepSpeed reads a step, so that every rank refuses alike instead of one rank failing
    inside DeepSpeed's load while its peers wait in a collective.
    """
    count = 0
    for path in files:
        safe_torch_load(path, trust=False, mmap=True, hint=hint)
        count += 1
    return count


