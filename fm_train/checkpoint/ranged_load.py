"""DeepSpeed files read in place from object storage: the pickle once, then only the byte ranges asked for.

A ``torch.save`` file is a zip archive whose tensor bytes are stored uncompressed, each storage in a
record of its own. ``torch.load(map_location="meta")`` reads only the archive's directory and the
pickle (a few KiB of a multi-GiB optimizer file) and tags each meta storage with its record's byte
offset in the file (``_checkpoint_offset``, set by ``torch.serialization`` since torch 2.6). Each
tensor then becomes a :class:`RangedTensor` that reads its bytes by ranged GETs when sliced
(``narrow``) or converted (``float``): the converter's readers take a parameter's fragments from
every dp rank's partition, so a conversion transfers the fp32 master weights it exports and never
the Adam moments next to them, and nothing is written to local disk. Written here because neither
torch (``mmap`` needs a local file) nor DeepSpeed reads checkpoints from object storage.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from fm_train.checkpoint.layout import CheckpointError

#: Tensors of at most this many bytes are read when the file is opened (steps, biases, norms): one
#: ranged GET each later would cost more than the bytes.
EAGER_BYTES = 1 << 16
#: fsspec read-ahead block: one GET fetches this much past what was asked (fragments of consecutive
#: parameters lie next to each other in a partition).
BLOCK_BYTES = 8 << 20


def is_remote(path: Any) -> bool:
    """Whether ``path`` is an fsspec path on a non-local filesystem (a ``UPath`` of ``s3://...``)."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


class _Fetched:
    """Bytes read from storage by every ranged file of the process."""

    def __init__(self) -> None:
        self.total = 0
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.total += count


_FETCHED = _Fetched()


class _RangedFile:
    """One open object in storage, read at absolute offsets (thread-safe)."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self._fh = path.fs.open(path.path, "rb", block_size=BLOCK_BYTES, cache_type="readahead")
        self._lock = threading.Lock()

    def read(self, offset: int, count: int) -> bytes:
        with self._lock:
            self._fh.seek(offset)
            data = self._fh.read(count)
        if len(data) != count:
            raise CheckpointError(f"{self.path}: {count} bytes at offset {offset} asked, {len(data)} read: the "
                                  "object is shorter than its own index says (a torn upload?)")
        _FETCHED.add(count)
        return data


class RangedTensor:
    """A tensor in a file in storage, read on use. Supports what the checkpoint readers do with a
    tensor: ``shape``, ``dtype``, ``numel()``, ``narrow(0, ...)`` (reads only those rows) and
    ``float()`` (reads it whole); anything else, call :meth:`materialize` first."""

    def __init__(self, source: _RangedFile, offset: int, meta: torch.Tensor) -> None:
        self._source, self._offset = source, offset  # the storage's first byte in the file
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
        data = self._source.read(self._offset + first * size, count * size)
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
        row = math.prod(self.shape[1:])
        return self._elements(self._storage_offset + start * row, length * row).view(length, *self.shape[1:])

    def float(self) -> torch.Tensor:
        return self.materialize().float()


def _ranged(obj: Any, source: _RangedFile) -> Any:
    """``obj`` with every meta tensor replaced by a :class:`RangedTensor` (small ones read at once)."""
    if torch.is_tensor(obj):
        offset = getattr(obj.untyped_storage(), "_checkpoint_offset", None)
        if offset is None:
            raise CheckpointError(f"{source.path}: this torch ({torch.__version__}) does not say where a tensor lies in "
                                  "a checkpoint file, so it cannot be read in place from storage; convert from a "
                                  "local copy of the step directory instead")
        tensor = RangedTensor(source, int(offset), obj)
        return tensor.materialize() if tensor.numel() * obj.element_size() <= EAGER_BYTES else tensor
    if isinstance(obj, dict):  # dict or OrderedDict (a module's state dict)
        return type(obj)((k, _ranged(v, source)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_ranged(v, source) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_ranged(v, source) for v in obj)
    return obj  # numbers, strings, DeepSpeed's records (fragment addresses hold ints)


def load_ranged(path: Any, *, trust: bool, hint: str) -> Any:
    """The DeepSpeed file at ``path`` (a remote ``UPath``) with its tensors as :class:`RangedTensor`;
    the pickle is read with ``weights_only=True`` and DeepSpeed's records unless ``trust``."""
    from fm_train.checkpoint.ds_files import safe_torch_load

    source = _RangedFile(path)
    with path.fs.open(path.path, "rb", block_size=1 << 20, cache_type="readahead") as fh:
        tree = safe_torch_load(path, trust=trust, map_location="meta", hint=hint, fileobj=fh)
    return _ranged(tree, source)


def bytes_fetched() -> int:
    """Tensor bytes this process has read from storage through :class:`RangedTensor` s (for progress lines)."""
    return _FETCHED.total
