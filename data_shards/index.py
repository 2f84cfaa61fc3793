"""index.json of a shard directory: what it holds, how to read it, and how to check it.

A shard is a standard (USTAR) tar file whose members all have the same size: one packed sample of
``seq_len + 1`` little-endian token ids per member, named ``{global sample number:012d}.tokens.u16``
(or ``.u32``). Because every member has the same size and a single 512-byte header, member ``i`` of
a shard starts at byte ``i * stride_bytes``; the reader uses that to seek straight to any sample,
instead of storing millions of offsets in the index.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .storage import as_location, remote_error

FORMAT = "fm-train-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_DIRNAME = "tokenizer"
HEADER_BYTES = 512  # one USTAR header block per member (names are short, so never a PAX header)
KEY_DIGITS = 12  # member names are the zero-padded global sample number: fixed length on purpose


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id of a vocabulary (``uint16`` or ``uint32``)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def member_ext(dtype: str) -> str:
    """Extension (webdataset field name) of the sample members for ``dtype``."""
    return {"uint16": "tokens.u16", "uint32": "tokens.u32"}[dtype]


def member_data_bytes(sample_tokens: int, dtype: str) -> int:
    """Bytes of token data in one member."""
    return sample_tokens * (2 if dtype == "uint16" else 4)


def member_stride(sample_tokens: int, dtype: str) -> int:
    """Bytes from one member's header to the next one's: header plus data padded to 512-byte blocks."""
    data = member_data_bytes(sample_tokens, dtype)
    return HEADER_BYTES + -(-data // 512) * 512


def member_name(sample_number: int, dtype: str) -> str:
    """Tar member name of the sample with this global number inside its directory."""
    return f"{sample_number:0{KEY_DIGITS}d}.{member_ext(dtype)}"


@dataclass
class ShardEntry:
    """One .tar file of a shard directory."""

    name: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    first_sample: int  # global number of its first sample, so member names are unique per directory


@dataclass
class ShardIndex:
    """Contents of index.json."""

    seq_len: int  # training tokens per sample; each stored sample holds seq_len + 1 tokens
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_hash: str
    shards: list[ShardEntry]
    sources: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    created_by: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def sample_tokens(self) -> int:
        """Tokens stored per sample (``seq_len + 1``: inputs plus the shifted label)."""
        return self.seq_len + 1

    @property
    def stride_bytes(self) -> int:
        """Distance in bytes between consecutive members of a shard."""
        return member_stride(self.sample_tokens, self.dtype)

    @property
    def num_samples(self) -> int:
        """Samples in all shards together."""
        return sum(s.samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to index.json (layout fields included for other readers)."""
        obj = {"format": self.format, "format_version": self.format_version, **asdict(self)}
        obj["sample_tokens"] = self.sample_tokens
        obj["member"] = {"ext": member_ext(self.dtype), "header_bytes": HEADER_BYTES,
                         "stride_bytes": self.stride_bytes, "byte_order": "little",
                         "name_format": "{sample_number:012d}." + member_ext(self.dtype)}
        obj["tokenizer_dir"] = TOKENIZER_DIRNAME
        return obj


def write_index(directory: Path, index: ShardIndex) -> Path:
    """Write index.json atomically (temp file, fsync, rename): it is the directory's commit marker."""
    path = directory / INDEX_NAME
    tmp = directory / f".{INDEX_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_index(directory: str | Path) -> ShardIndex:
    """Load and sanity-check ``directory/index.json``; raise DataError naming the directory if unusable."""
    directory = as_location(directory, what="shard directory")
    path = directory / INDEX_NAME
    try:
        is_dir, is_file = directory.is_dir(), path.is_file()
    except Exception as exc:  # object storage: no credentials, no such bucket, endpoint unreachable
        raise remote_error(directory, exc) from exc
    if not is_dir:
        raise DataError(f"shard directory {directory} does not exist; build it with "
                        f"`fm-train shard INPUTS --out {directory}`")
    if not is_file:
        raise DataError(f"{directory} has no {INDEX_NAME}: it is not a finished shard directory; build it with "
                        f"`fm-train shard INPUTS --out {directory}` (add --overwrite to replace a partial build)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); rebuild with `fm-train shard ... --out {directory} "
                        f"--overwrite`") from exc
    if obj.get("format") != FORMAT or obj.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format {obj.get('format')!r} version {obj.get('format_version')!r}; this "
                        f"reader needs {FORMAT!r} version {FORMAT_VERSION}: rebuild with `fm-train shard`")
    try:
        return ShardIndex(
            seq_len=int(obj["seq_len"]), dtype=str(obj["dtype"]), vocab_size=int(obj["vocab_size"]),
            eos_id=int(obj["eos_id"]), tokenizer_hash=str(obj["tokenizer_hash"]),
            shards=[ShardEntry(**s) for s in obj["shards"]], sources=list(obj.get("sources", [])),
            totals=dict(obj.get("totals", {})), created_by=str(obj.get("created_by", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is missing or has a bad field ({exc!r}); rebuild with `fm-train shard`") from exc
