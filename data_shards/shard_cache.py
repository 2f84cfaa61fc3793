"""A bounded local cache of whole shards from object storage, shared by the processes of a node.

Without it, every sample read from ``s3://`` is a ranged GET (:mod:`data_shards.sample_reader`): no
disk, but each epoch pays the network again. With it, a shard is downloaded once on first touch into
``directory`` and then read with ``preadv`` like a local one; when the files pass ``max_bytes`` the
least recently used are deleted. MosaicML streaming caches the same way; it is written here because
fsspec's caching filesystems have no size bound and cache blocks, not the index-addressed shards.

Files are named by the shard's sha256 from ``index.json``: content-addressed, so a rebuilt shard is
never served stale, and two prefixes holding the same shard share one copy. Downloads go to a
temporary name and are renamed into place, so loader workers and ranks of one node can share the
directory: a reader sees a whole file or none, and one evicted while another process reads it stays
readable through that process's open descriptor (POSIX unlink semantics; its blocks are freed when
the reader closes it, so the disk may briefly hold more than the bound). Recency is the file's
mtime, touched on every use.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from .errors import DataError
from .index import SHA256_HEX
from .safe_paths import UnsafePathError, resolve_under
from .verify import check_download


class ShardCache:
    """Whole shards on local disk, at most ``max_bytes`` in all (least recently used evicted first)."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise DataError(f"the shard cache needs a positive size, got {max_bytes} bytes")
        self.directory, self.max_bytes = Path(directory), int(max_bytes)

    def __repr__(self) -> str:
        return f"ShardCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def holds(self, size: int) -> bool:
        """Whether a shard of ``size`` bytes fits at all (larger ones are read by ranged GETs)."""
        return size <= self.max_bytes

    def local_copy(self, fs: Any, remote_path: str, sha256: str, size: int) -> Path:
        """The cached file of shard ``remote_path`` (``size`` bytes, ``sha256`` from the index),
        downloaded first if no process of this node has it."""
        path = self._file(sha256, f"{sha256}.tar")
        try:
            if path.stat().st_size == size:
                os.utime(path)  # most recently used
                return path
        except FileNotFoundError:
            pass
        self.directory.mkdir(parents=True, exist_ok=True)
        self._make_room(size)
        tmp = self._file(sha256, f".{sha256}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        try:
            fs.get_file(remote_path, str(tmp))
            got = tmp.stat().st_size
            if got != size:
                raise DataError(f"shard {remote_path} downloaded with {got} bytes, index.json says {size}")
            check_download(tmp, remote_path, sha256)  # its name promises these bytes to the node's processes
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _file(self, sha256: str, name: str) -> Path:
        """``name`` inside the cache directory, built from a shard's ``sha256``: read_index validated it,
        and it is checked again here because the name decides where bytes are written."""
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise DataError(f"shard cache {self.directory}: {sha256!r:.80} is not a sha256 (64 lowercase hex "
                            "digits); the shard's index.json is damaged: rebuild it with fm-train shard")
        try:
            return resolve_under(self.directory, name, what=f"shard cache {self.directory}")
        except UnsafePathError as exc:  # only a symlink inside the cache directory can lead here
            raise DataError(f"{exc}; remove it from the cache directory") from exc

    def _make_room(self, incoming: int) -> None:
        """Delete least recently used shards until ``incoming`` more bytes fit under ``max_bytes``."""
        entries = []
        for p in self.directory.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total + incoming <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
