"""Open shard directories for reading: consistency checks across sources and per-shard health checks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .index import HEADER_BYTES, TOKENIZER_DIRNAME, ShardEntry, ShardIndex, member_name, read_index
from .storage import Location, as_location, read_range


@dataclass
class SourcesInfo:
    """What the engine needs to know about its data before building the model."""

    vocab_size: int  # largest across sources (embedding rows needed)
    eos_id: int
    seq_len: int  # training tokens per sample (stored samples hold seq_len + 1)
    tokenizer_dir: Location  # the first source's tokenizer/, to ship with the converted model
    tokenizer_hash: str
    dtype: str
    paths: list[Location]  # pathlib.Path, or UPath for object storage (data_shards.storage)
    indexes: list[ShardIndex]


def check_sources(paths: list[str], model_vocab_size: int | None = None) -> SourcesInfo:
    """Read every source's index.json and refuse inconsistent data with a DataError that says what to do.

    Refused: a missing or unfinished directory, sources built with different tokenizers or seq_len,
    and a vocabulary larger than ``model_vocab_size`` (the model's embedding rows).
    """
    if not paths:
        raise DataError("no data sources given (data.sources is empty)")
    dirs = [as_location(p, what="data source") for p in paths]
    indexes = [read_index(d) for d in dirs]
    first, head = indexes[0], dirs[0]
    for d, ix in zip(dirs[1:], indexes[1:]):
        if ix.tokenizer_hash != first.tokenizer_hash or ix.eos_id != first.eos_id:
            raise DataError(f"{d} was built with a different tokenizer than {head} (hash {ix.tokenizer_hash[:12]} vs "
                            f"{first.tokenizer_hash[:12]}); rebuild it with `fm-train shard ... --tokenizer "
                            f"{head / TOKENIZER_DIRNAME} --out {d} --overwrite`")
        if ix.seq_len != first.seq_len:
            raise DataError(f"{d} holds samples of seq_len {ix.seq_len} but {head} of {first.seq_len}; rebuild one "
                            f"of them with the other's --seq-len")
    vocab = max(ix.vocab_size for ix in indexes)
    if model_vocab_size is not None and vocab > model_vocab_size:
        raise DataError(f"the tokenizer of {head} has {vocab} tokens but model.vocab_size is {model_vocab_size}; "
                        f"set model.vocab_size >= {vocab} or rebuild the shards with --vocab-size <= "
                        f"{model_vocab_size}")
    if not (head / TOKENIZER_DIRNAME / "tokenizer.json").is_file():
        raise DataError(f"{head / TOKENIZER_DIRNAME} is missing; rebuild with `fm-train shard ... --out {head} "
                        "--overwrite`")
    return SourcesInfo(vocab_size=vocab, eos_id=first.eos_id, seq_len=first.seq_len,
                       tokenizer_dir=head / TOKENIZER_DIRNAME, tokenizer_hash=first.tokenizer_hash,
                       dtype=first.dtype, paths=dirs, indexes=indexes)


def shard_problem(directory: Location, index: ShardIndex, entry: ShardEntry, verify_sha256: bool = False) -> str | None:
    """What is wrong with one shard (missing, truncated, bad headers, sha256), or None if it looks right.

    Without ``verify_sha256`` this costs one stat and two 512-byte reads, so every rank can afford it
    at start; it catches missing and truncated files and most overwritten ones.
    """
    path = directory / entry.name
    try:
        size = path.stat().st_size
    except (OSError, ValueError):
        return "missing"
    if size != entry.bytes:
        return f"{'truncated' if size < entry.bytes else 'longer than expected'} ({size} of {entry.bytes} bytes)"
    for local in sorted({0, entry.samples - 1}):
        start = local * index.stride_bytes
        header = read_range(path, start, start + HEADER_BYTES)  # one ranged GET on object storage
        if not header_matches(header, member_name(entry.first_sample + local, index.dtype)):
            return f"corrupted (tar header of sample {local} does not match index.json)"
    if verify_sha256 and _sha256(path) != entry.sha256:
        return "corrupted (sha256 differs from index.json)"
    return None


def header_matches(header: bytes, name: str) -> bool:
    """True if a tar header block names member ``name`` (USTAR magic included)."""
    raw = name.encode("ascii")
    return header[: len(raw)] == raw and header[len(raw)] == 0 and header[257:262] == b"ustar"


def bad_shard_message(directory: Location, index: ShardIndex, name: str, problem: str) -> str:
    """Error text for a bad shard: which one, what is wrong, and what to run."""
    rebuild = f" (it was built by: {index.created_by})" if index.created_by else ""
    return (f"shard {directory / name} is {problem}; run `fm-train shard --verify --out {directory}` to check all "
            f"shards, rebuild the directory{rebuild} with --overwrite, or set data.on_bad_shard: skip to leave "
            "bad shards out")


def verify_directory(directory: str | Path, verify_sha256: bool = True) -> list[tuple[str, str]]:
    """(shard name, problem) for every bad shard of a directory; empty when all are fine."""
    directory = as_location(directory, what="--out")
    index = read_index(directory)
    problems = [(e.name, shard_problem(directory, index, e, verify_sha256)) for e in index.shards]
    return [(name, p) for name, p in problems if p is not None]


def _sha256(path: Location) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
