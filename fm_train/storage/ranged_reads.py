"""DeepSpeed files read in place from object storage: the pickle once, then only the byte ranges asked for.

A ``torch.save`` file is a zip archive whose tensor bytes are stored uncompressed, each storage in a
record of its own. ``torch.load(map_location="meta")`` reads only the archive's directory and the
pickle (a few KiB of a multi-GiB optimizer file) and tags each meta storage with its record's byte
offset in the file (``_checkpoint_offset``, set by ``torch.serialization``). Each tensor then becomes
a :class:`RangedTensor` that fetches exactly its bytes, one ranged GET per read, when it is sliced
(``narrow``) or used whole (``float``, ``item``): the converter's readers take each parameter's
fragments from every dp rank's partition, so a conversion transfers the fp32 master weights it
exports and none of the Adam moments stored next to them, keeps nothing cached and writes nothing
to local disk. Written here because neither torch (``mmap`` needs a local file) nor DeepSpeed
reads checkpoints from object storage.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from fm_train.storage.errors import CheckpointError


def is_remote(path: Any) -> bool:
    """Whether ``path`` is an fsspec path on a non-local filesystem (a ``UPath`` of ``s3://...``)."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


class _Fetched:
    """Tensor bytes read from storage by this process (each one a byte of a ranged GET's body)."""

    def __init__(self) -> None:
        self.total = 0
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.total += count


_FETCHED = _Fetched()


def _read(path: Any, offset: int, count: int) -> bytes:
    """Bytes ``[offset, offset + count)`` of the object ``path``: one ranged GET, nothing cached."""
    try:
        data = path.fs.cat_file(path.path, start=offset, end=offset + count)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is gone: it was deleted while being read (checkpoint.keep of a run that is "
                              "still saving removes old steps); convert a step the run keeps, or a copy") from None
    except OSError as exc:
        raise CheckpointError(f"reading {count} bytes at offset {offset} of {path} failed: {exc}") from None
    if len(data) != count:
        raise CheckpointError(f"{path}: {count} bytes at offset {offset} asked, {len(data)} read: the object is "
                              "shorter than its own index says (a torn upload?)")
    _FETCHED.add(count)
    return data


class RangedTensor:
    """A tensor in a file in storage, read on use. Supports what the checkpoint readers do with a
    tensor: ``shape``, ``dtype``, ``numel()``, ``narrow(0, ...)`` (reads only those rows),
    ``float()`` and ``item()`` (read it whole); anything else, call :meth:`materialize` first."""

    def __init__(self, path: Any, offset: int, meta: torch.Tensor) -> None:
        self._path, self._offset = path, offset  # the object, and its storage's first byte in it
        self.shape, self.dtype = meta.shape, meta.dtype
        self._stride, self._storage_offset = meta.stride(), meta.storage_offset()
        self._contiguous = meta.is_contiguous()

    def numel(self) -> int:
        return math.prod(self.shape)

    def _elements(self, first: int, count: int) -> torch.Tensor:
        """``count`` storage elements from element ``first`` of this tensor's storage, 1-D."""
        if count == 0:  # a ZeRO-3 rank's empty share, a narrow of nothing
            return torch.empty(0, dtype=self.dtype)
        size = torch.empty((), dtype=self.dtype).element_size()
        data = _read(self._path, self._offset + first * size, count * size)
        return torch.frombuffer(bytearray(data), dtype=self.dtype)

    def materialize(self) -> torch.Tensor:
        """The whole tensor as an ordinary CPU tensor."""
        if self._contiguous:
            return self._elements(self._storage_offset, self.numel()).view(self.shape)
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self._stride)) if self.numel() else 0
        return self._elements(self._storage_offset, span).as_strided(self.shape, self._stride)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows ``[start, start + length)`` along ``dim`` (only their bytes are read when ``dim`` is 0)."""
        if dim != 0 or not self._contiguous:
            return self.materialize().narrow(dim, start, length)
        if start < 0 or length < 0 or start + length > self.shape[0]:
            raise CheckpointError(f"{self._path}: rows [{start}, {start + length}) asked of a tensor of "
                                  f"{self.shape[0]}: the checkpoint's index and its tensors disagree")
        row = math.prod(self.shape[1:])
        return self._elements(self._storage_offset + start * row, length * row).view(length, *self.shape[1:])

    def float(self) -> torch.Tensor:
        return self.materialize().float()

    def item(self) -> Any:
        return self.materialize().item()


def ranged_tensors(obj: Any, path: Any) -> Any:
    """``obj`` with every meta tensor replaced by a :class:`RangedTensor` of the object ``path``."""
    if torch.is_tensor(obj):
        offset = getattr(obj.untyped_storage(), "_checkpoint_offset", None)
        if offset is None:
            raise CheckpointError(
                f"{path}: torch did not say where its tensors lie in the file (a file in torch's legacy, non-zip "
                f"format, or a torch older than 2.6), so it cannot be read in place; copy the step directory "
                f"(e.g. `aws s3 cp --recursive`) and convert the local copy")
        return RangedTensor(path, int(offset), obj)
    if isinstance(obj, dict):  # dict or OrderedDict (a module's state dict)
        return type(obj)((k, ranged_tensors(v, path)) for k, v in obj.items())
    if isinstance(obj, list):
        return [ranged_tensors(v, path) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(ranged_tensors(v, path) for v in obj)
    return obj  # numbers, strings, DeepSpeed's records (fragment addresses hold ints)


def bytes_fetched() -> int:
    """Tensor bytes this process has read from storage through :class:`RangedTensor` s (for progress lines)."""
    return _FETCHED.total
