"""Pack a token stream into fixed-length samples and write them as standard webdataset .tar shards.

Why the tar members are written by hand: ``tarfile.addfile`` (which ``webdataset.TarWriter`` also uses)
costs 70-100 us per member on our CPUs, more than tokenizing the sample. All members of a shard share
one layout, so we take the header ``tarfile`` itself renders for the first name as a template and
only patch the 12 name digits and the checksum, for a whole batch of samples at once with numpy.
The result is an ordinary USTAR archive (tests read it back with ``tarfile`` and ``webdataset``).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np

from .index import HEADER_BYTES, KEY_DIGITS, ShardEntry, member_data_bytes, member_name, member_stride

_CHKSUM = slice(148, 156)  # USTAR checksum field: six octal digits, NUL, space


def _header_template(dtype: str, data_bytes: int) -> tuple[np.ndarray, int]:
    """tarfile's own header for sample 0 (reproducible: mtime 0, no owner) and its checksum."""
    info = tarfile.TarInfo(member_name(0, dtype))
    info.size, info.mtime, info.mode, info.uname, info.gname = data_bytes, 0, 0o644, "", ""
    buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    assert len(buf) == HEADER_BYTES
    return np.frombuffer(buf, dtype=np.uint8).copy(), int(buf[_CHKSUM][:6], 8)


class ShardWriter:
    """Turns token arrays into ``seq_len + 1``-token samples, ``samples_per_shard`` per .tar file.

    Tokens that do not fill a last sample are dropped (counted in ``dropped_tokens``): padding would
    teach the model to predict padding, and the loss is a few hundred tokens per directory.
    """

    def __init__(self, directory: Path, *, sample_tokens: int, dtype: str, samples_per_shard: int) -> None:
        self.directory = directory
        self.sample_tokens = sample_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._dtype_name = dtype
        self.samples_per_shard = max(1, samples_per_shard)
        self.data_bytes = member_data_bytes(sample_tokens, dtype)
        self.stride = member_stride(sample_tokens, dtype)
        self._template, self._template_chk = _header_template(dtype, self.data_bytes)
        self._template_digit_sum = int(self._template[:KEY_DIGITS].astype(np.int64).sum())
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.shards: list[ShardEntry] = []
        self.samples_written = 0
        self.dropped_tokens = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens to the stream; write every sample that is complete."""
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens < self.sample_tokens:
            return
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        full = len(stream) // self.sample_tokens
        self._write_samples(stream[: full * self.sample_tokens].reshape(full, self.sample_tokens))
        rest = stream[full * self.sample_tokens:]
        self._pending, self._pending_tokens = ([rest] if len(rest) else []), len(rest)

    def close(self) -> list[ShardEntry]:
        """Finish the last shard and return the entries of all shards written."""
        self.dropped_tokens += self._pending_tokens
        self._pending, self._pending_tokens = [], 0
        self._finish_shard()
        return self.shards

    def _write_samples(self, rows: np.ndarray) -> None:
        start = 0
        while start < len(rows):
            if self._file is None:
                self._open_shard()
            take = min(len(rows) - start, self.samples_per_shard - self._in_shard)
            block = self._members(rows[start:start + take], self.samples_written)
            self._file.write(block)
            self._hash.update(block)
            self._in_shard += take
            self.samples_written += take
            start += take
            if self._in_shard == self.samples_per_shard:
                self._finish_shard()

    def _members(self, rows: np.ndarray, first_number: int) -> memoryview:
        """Header + padded data of consecutive samples, as one contiguous buffer."""
        n = len(rows)
        block = np.zeros((n, self.stride), dtype=np.uint8)
        block[:, :HEADER_BYTES] = self._template
        numbers = np.arange(first_number, first_number + n, dtype=np.int64)
        powers = 10 ** np.arange(KEY_DIGITS - 1, -1, -1, dtype=np.int64)
        digits = (numbers[:, None] // powers) % 10 + ord("0")
        block[:, :KEY_DIGITS] = digits
        chk = self._template_chk - self._template_digit_sum + digits.sum(axis=1)
        octal = (chk[:, None] >> (3 * np.arange(5, -1, -1))) & 7
        block[:, 148:154] = octal + ord("0")
        block[:, HEADER_BYTES:HEADER_BYTES + self.data_bytes] = (
            np.ascontiguousarray(rows, dtype=self.dtype).view(np.uint8).reshape(n, self.data_bytes))
        return memoryview(block).cast("B")

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self._first = self.samples_written
        self._name = name

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        end = bytes(2 * HEADER_BYTES)  # end-of-archive marker: two zero blocks
        self._file.write(end)
        self._hash.update(end)
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self.shards.append(ShardEntry(name=self._name, samples=self._in_shard,
                                      tokens=self._in_shard * self.sample_tokens, bytes=size,
                                      sha256=self._hash.hexdigest(), first_sample=self._first))
        self._file = None
