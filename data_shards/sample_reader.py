"""Random access to samples: one ``preadv`` per sample at an offset computed from the index.

Why not ``webdataset.WebDataset`` here: it streams a tar front to back, so a reader that needs
samples by index (equal batches on every rank, exact resume) would read and discard most of the
file. Our members have fixed offsets (see :mod:`data_shards.index`), so a seek is enough. Each
sample (header included) is read straight into one row of a batch buffer; headers are then checked
for the whole batch at once with numpy, so the per-sample Python work is one system call.

Shards on object storage are read the same way through ranged GETs (a batch's samples that lie next
to each other in a shard share one request, and a batch's requests run concurrently), or, with a
:class:`~data_shards.shard_cache.ShardCache`, downloaded whole once and then read like local files.

With a :class:`~data_shards.verify.ShardVerifier`, a local shard's sha256 is checked the first time
it is opened, before any of its samples is returned (a cached one was checked as it was downloaded);
a mismatch is a :class:`BadShardError` like any other bad shard.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadShardError, DataError
from .index import HEADER_BYTES, KEY_DIGITS, ShardIndex, member_data_bytes, member_ext, member_name
from .shard_cache import ShardCache
from .sources import bad_shard_message
from .storage import Location
from .verify import ShardVerifier, sha256_problem

_MAX_OPEN = 128  # file descriptors kept open per process
_POWERS = 10 ** np.arange(KEY_DIGITS - 1, -1, -1, dtype=np.int64)


class SampleReader:
    """Reads samples ``(source, shard, local)`` of shard directories built with one tokenizer and seq_len."""

    def __init__(self, directories: list[Location], indexes: list[ShardIndex],
                 cache: ShardCache | None = None, verifier: ShardVerifier | None = None) -> None:
        self.directories, self.indexes, self.cache, self.verifier = directories, indexes, cache, verifier
        first = indexes[0]
        self.sample_tokens, self.stride = first.sample_tokens, first.stride_bytes
        self.vocab_size = max(ix.vocab_size for ix in indexes)  # one tokenizer for all (check_sources)
        self.data_bytes = member_data_bytes(first.sample_tokens, first.dtype)
        self.dtype = np.dtype("<u2" if first.dtype == "uint16" else "<u4")
        suffix = ("." + member_ext(first.dtype)).encode("ascii") + b"\0"
        self._suffix = np.frombuffer(suffix, dtype=np.uint8)
        self._first = [np.array([e.first_sample for e in ix.shards], dtype=np.int64) for ix in indexes]
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._remote = [not isinstance(d, Path) for d in directories]  # object storage: ranged GETs
        self._fs: dict[int, Any] = {}
        self._fs_pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()  # descriptors do not travel to loader workers; each opens its own
        state["_fs"] = {}  # nor do object-store clients (their event loop and sessions are per process)
        return state

    def read(self, source: np.ndarray, shard: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Token arrays ``[n, seq_len + 1]`` (stored dtype, little-endian) of the given samples, in order."""
        n = len(source)
        buf = np.empty((n, self.stride), dtype=np.uint8)
        flat = memoryview(buf).cast("B")  # 1-D view: rows are sliced as flat byte ranges
        stride = self.stride
        got = np.empty(n, dtype=np.int64)
        numbers = np.empty(n, dtype=np.int64)
        fds = np.empty(n, dtype=np.int64)
        key = source * (1 << 32) + shard
        for k in np.unique(key).tolist():  # a batch touches few shards: look each one up once
            sel = key == k
            s, h = divmod(k, 1 << 32)
            fds[sel] = -1 if self._remote[s] and not self._cached(s, h) else self._fd(s, h)
            numbers[sel] = self._first[s][h] + local[sel]
        offsets = local * stride
        for row, (fd, offset) in enumerate(zip(fds.tolist(), offsets.tolist())):
            if fd >= 0:
                got[row] = os.preadv(fd, [flat[row * stride:(row + 1) * stride]], offset)
        if (fds < 0).any():
            self._read_remote(np.flatnonzero(fds < 0), source, shard, offsets, flat, got)
        ok = got >= HEADER_BYTES + self.data_bytes
        ok &= (buf[:, :KEY_DIGITS] == (numbers[:, None] // _POWERS) % 10 + ord("0")).all(axis=1)
        ok &= (buf[:, KEY_DIGITS:KEY_DIGITS + len(self._suffix)] == self._suffix).all(axis=1)
        ok &= (buf[:, 257:262] == np.frombuffer(b"ustar", dtype=np.uint8)).all(axis=1)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            self._raise(row, source, shard, local, "truncated" if got[row] < HEADER_BYTES + self.data_bytes
                        else "corrupted")
        data = np.ascontiguousarray(buf[:, HEADER_BYTES:HEADER_BYTES + self.data_bytes]).view(self.dtype)
        # Token bytes overwritten behind an intact header: an id past the vocabulary would otherwise
        # surface as an index error inside the embedding, on one rank, with no file named.
        highest = data.max(axis=1)
        if (highest >= self.vocab_size).any():
            row = int(np.flatnonzero(highest >= self.vocab_size)[0])
            self._raise(row, source, shard, local, "corrupted",
                        f": token id {int(highest[row])} is not below the vocabulary size {self.vocab_size}")
        return data

    def _raise(self, row: int, source: np.ndarray, shard: np.ndarray, local: np.ndarray, problem: str,
               detail: str = "") -> None:
        s, h, i = int(source[row]), int(shard[row]), int(local[row])
        index = self.indexes[s]
        name = member_name(index.shards[h].first_sample + i, index.dtype)
        raise BadShardError(bad_shard_message(self.directories[s], index, index.shards[h].name,
                                              f"{problem} at sample {i} ({name}){detail}"),
                            key=f"{s}:{index.shards[h].name}")

    def _read_remote(self, rows: np.ndarray, source: np.ndarray, shard: np.ndarray, offsets: np.ndarray,
                     flat: memoryview, got: np.ndarray) -> None:
        """Fill ``rows`` from object storage: samples adjacent in one shard share one ranged GET, and
        the GETs of a batch run concurrently (fsspec's ``cat_ranges``)."""
        stride = self.stride
        order = rows[np.lexsort((offsets[rows], shard[rows], source[rows]))]
        runs: list[list[int]] = []  # rows of one contiguous byte range each
        for row in order.tolist():
            last = runs[-1][-1] if runs else None
            if (last is not None and source[last] == source[row] and shard[last] == shard[row]
                    and offsets[last] + stride == offsets[row]):
                runs[-1].append(row)
            else:
                runs.append([row])
        by_fs: dict[int, list[list[int]]] = {}
        for run in runs:
            by_fs.setdefault(int(source[run[0]]), []).append(run)
        for s, group in by_fs.items():
            names = [self.indexes[s].shards[int(shard[run[0]])].name for run in group]
            paths = [(self.directories[s] / name).path for name in names]
            starts = [int(offsets[run[0]]) for run in group]
            ends = [start + len(run) * stride for start, run in zip(starts, group)]
            blobs = self._filesystem(s).cat_ranges(paths, starts, ends, on_error="return")
            for run, name, blob in zip(group, names, blobs):
                if isinstance(blob, BaseException):
                    if not isinstance(blob, (OSError, ValueError)):  # 416 past the end reads as truncated
                        raise BadShardError(bad_shard_message(self.directories[s], self.indexes[s], name,
                                                              f"unreadable ({type(blob).__name__}: {blob})"),
                                            key=f"{s}:{name}") from blob
                    blob = b""
                for i, row in enumerate(run):
                    part = blob[i * stride:(i + 1) * stride]
                    flat[row * stride:row * stride + len(part)] = part
                    got[row] = len(part)

    def _filesystem(self, source: int) -> Any:
        """This process's fsspec client for ``source`` (made anew after a fork: a loader worker)."""
        if self._fs_pid != os.getpid():
            self._fs, self._fs_pid = {}, os.getpid()
        if source not in self._fs:
            import fsspec

            d = self.directories[source]
            self._fs[source] = fsspec.filesystem(d.protocol, **d.storage_options)
        return self._fs[source]

    def _cached(self, source: int, shard: int) -> bool:
        """Whether a remote shard is read from the local shard cache (no cache, or too large: ranged GETs)."""
        return self.cache is not None and self.cache.holds(self.indexes[source].shards[shard].bytes)

    def _fd(self, source: int, shard: int) -> int:
        key = (source, shard)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        entry = self.indexes[source].shards[shard]
        path = self.directories[source] / entry.name
        if self._remote[source]:  # a whole shard from object storage, through the node's cache
            assert self.cache is not None
            try:
                path = self.cache.local_copy(self._filesystem(source), path.path, entry.sha256, entry.bytes)
            except (OSError, DataError) as exc:
                message = bad_shard_message(self.directories[source], self.indexes[source], entry.name,
                                            f"not downloadable ({exc})")
                raise BadShardError(message, key=f"{source}:{entry.name}") from exc
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            message = bad_shard_message(self.directories[source], self.indexes[source], entry.name,
                                        f"unreadable ({exc.strerror})")
            raise BadShardError(message, key=f"{source}:{entry.name}") from exc
        if self.verifier is not None and not self._remote[source]:
            self._verify(fd, source, entry.name, entry.sha256)
        self._fds[key] = fd
        if len(self._fds) > _MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _verify(self, fd: int, source: int, name: str, expected: str) -> None:
        """Raise BadShardError (and close ``fd``) if the shard's bytes are not the ones index.json hashed."""
        assert self.verifier is not None
        got = self.verifier.mismatch(fd, expected)
        if got is not None:
            os.close(fd)
            raise BadShardError(bad_shard_message(self.directories[source], self.indexes[source], name,
                                                  sha256_problem(expected, got)), key=f"{source}:{name}")

    def close(self) -> None:
        """Close the open shard files."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
