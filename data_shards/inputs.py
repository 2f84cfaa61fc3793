"""Input files for shard building: resolve paths and globs, and read them through ``datasets``.

Besides files (.txt, .jsonl, .parquet, .arrow), an input can be a directory written by
``save_to_disk`` or ``hf:NAME[:CONFIG]``, a dataset in the local Hugging Face cache
(:mod:`data_shards.hf_datasets`); their rows are read like parquet rows, from the text column.

``datasets`` does the reading (plain or compressed files, one streaming builder per format, no
Arrow cache written). We do not use its ``json`` builder for .jsonl: its pyarrow reader cannot say
which line is bad and rejects a whole file for one non-UTF-8 byte. Instead .jsonl files are read as
text lines and parsed in the worker processes, which can then name the file and line of every
problem (see :mod:`data_shards.encode`). Bytes that are not UTF-8 are decoded to the marker
:data:`BAD_BYTE` (Arrow strings must be valid UTF-8, so Python's ``surrogateescape`` cannot be used),
and the workers skip or refuse the lines that hold it.
"""

from __future__ import annotations

import codecs
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError
from .hf_datasets import CACHE_PREFIX, dataset_bytes, is_saved_dataset, open_dataset, parse_cache_name

_COMPRESSED = ("", ".gz", ".bz2", ".xz", ".zst")
_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
_UNCOMPRESSED = ("parquet", "arrow")  # formats with their own compression
# Kinds whose rows are the values of a text column (not lines of text to parse).
TABLE_KINDS = ("parquet", "arrow", "hf_disk", "hf_cache")
_HF_KINDS = ("hf_disk", "hf_cache")
TXT_UNITS = ("document", "line")  # a .txt file is one document, or each non-empty line is one
BAD_BYTE = "\U0010FFFE"  # a Unicode noncharacter: reserved for internal use, so never in real text
_ERRORS = "data_shards.mark_bad_bytes"
codecs.register_error(_ERRORS, lambda err: (BAD_BYTE, err.end))


@dataclass(frozen=True)
class InputFile:
    """One input file and how to read it."""

    path: str  # a file, a save_to_disk directory, or hf:NAME[:CONFIG]
    kind: str  # "txt" | "jsonl" | "parquet" | "arrow" | "hf_disk" | "hf_cache"
    bytes: int
    split: str | None = None  # the split read from a saved DatasetDict or a cached dataset


@dataclass
class Segment:
    """Consecutive rows of one file: whole documents (txt document mode) or lines / parquet rows."""

    file: int  # index into the resolved input list
    first_line: int  # 1-based line (or parquet row) number of rows[0]
    rows: list


def file_kind(path: str) -> str | None:
    """Input kind from the file name (``a.jsonl.gz`` is jsonl), or None if unsupported."""
    name = path.lower()
    for ext, kind in _KINDS.items():
        for comp in _COMPRESSED if kind not in _UNCOMPRESSED else ("",):
            if name.endswith(ext + comp):
                return kind
    return None


def resolve_inputs(patterns: list[str], *, split: str = "train") -> list[InputFile]:
    """Expand files and globs (``**`` allowed) in order, without duplicates; DataError on anything unusable.

    ``split``: the split read from saved DatasetDict directories and ``hf:`` datasets.
    """
    files: list[InputFile] = []
    seen: set[str] = set()
    for pattern in patterns:
        if pattern.startswith(CACHE_PREFIX):
            if pattern not in seen:
                seen.add(pattern)
                files.append(_cache_input(pattern, split))
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"input {pattern!r} matches no files")
        for match in matches:
            path = os.path.abspath(match)
            if os.path.isdir(path) and is_saved_dataset(path):
                if path not in seen:
                    seen.add(path)
                    size = sum(p.stat().st_size for p in Path(path).rglob("*.arrow"))
                    files.append(InputFile(path=path, kind="hf_disk", bytes=size, split=split))
                continue
            if os.path.isdir(path):
                if glob.has_magic(pattern):
                    continue  # a glob like data/** also yields directories; only its files count
                raise DataError(f"input {match} is a directory but not a saved dataset (save_to_disk); pass files "
                                f"or a glob such as '{match}/**/*.jsonl'")
            if not os.path.isfile(path):
                raise DataError(f"input {match} does not exist")
            kind = file_kind(path)
            if kind is None:
                raise DataError(f"input {match}: unsupported file type; use .txt, .jsonl (optionally .gz/.bz2/.xz/"
                                ".zst), .parquet, .arrow, a save_to_disk directory or hf:NAME")
            if path not in seen:
                seen.add(path)
                files.append(InputFile(path=path, kind=kind, bytes=os.path.getsize(path)))
    if not files:
        raise DataError("no input files (the inputs matched only directories)")
    return files


def _cache_input(spec: str, split: str) -> InputFile:
    """``hf:NAME[:CONFIG]``, found in the local cache now (before anything is built), with its size."""
    parse_cache_name(spec)
    return InputFile(path=spec, kind="hf_cache", bytes=dataset_bytes(open_dataset(spec, "hf_cache", split, None)),
                     split=split)


def iter_segments(files: list[InputFile], *, text_field: str, txt_unit: str,
                  batch_rows: int = 1024) -> Iterator[Segment]:
    """Rows of every file in input order, in segments of at most ``batch_rows`` rows, read by ``datasets``."""
    import datasets  # heavy (about 2 s); only shard building needs it

    datasets.disable_progress_bars()
    streams = _open_streams(datasets, files, text_field=text_field, txt_unit=txt_unit)
    for i, f in enumerate(files):
        column = text_field if f.kind in TABLE_KINDS else "text"
        if f.kind in _HF_KINDS:
            batches = open_dataset(f.path, f.kind, f.split or "train", text_field).iter(batch_size=batch_rows)
        else:
            ds, shard, n = streams[f.kind]
            batches = ds.shard(num_shards=n, index=shard[i], contiguous=True).iter(batch_size=batch_rows)
        line = 1
        try:
            for batch in batches:
                rows = batch[column]
                yield Segment(file=i, first_line=line, rows=rows)
                line += len(rows)
        except DataError:
            raise
        except Exception as exc:  # datasets/pyarrow raise many types; the user needs the file name
            hint = f" (does it have a string column {text_field!r}? pass --text-field)" if f.kind in TABLE_KINDS else ""
            raise DataError(f"cannot read {f.path}{hint}: {type(exc).__name__}: {exc}") from exc


def _open_streams(datasets, files: list[InputFile], *, text_field: str, txt_unit: str) -> dict:
    """One streaming dataset per kind; each file is one of its shards (index recorded per input file)."""
    streams = {}
    for kind in sorted({f.kind for f in files} - set(_HF_KINDS)):
        members = [i for i, f in enumerate(files) if f.kind == kind]
        paths = [files[i].path for i in members]
        if kind == "parquet":
            for p in paths:
                _check_parquet_column(p, text_field)
            ds = datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True,
                                       columns=[text_field])
        elif kind == "arrow":
            for p in paths:
                _check_arrow_column(p, text_field)
            ds = datasets.load_dataset("arrow", data_files=paths, split="train", streaming=True)
        else:
            sample_by = txt_unit if kind == "txt" else "line"
            ds = datasets.load_dataset("text", data_files=paths, split="train", streaming=True,
                                       sample_by=sample_by, encoding_errors=_ERRORS)
        if ds.num_shards != len(paths):  # our per-file line numbers rely on one shard per file
            raise RuntimeError(f"datasets split {len(paths)} {kind} files into {ds.num_shards} shards")
        streams[kind] = (ds, {i: j for j, i in enumerate(members)}, len(paths))
    return streams


def _check_parquet_column(path: str, text_field: str) -> None:
    """Refuse a parquet file without a string column ``text_field``, listing the columns it has."""
    import pyarrow.parquet as pq  # the engine under datasets' parquet builder; read only the schema

    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file: {exc}") from exc
    _check_text_column(path, schema, text_field)


def _check_arrow_column(path: str, text_field: str) -> None:
    """Refuse an Arrow file (the IPC stream format ``datasets`` writes) without a string ``text_field``."""
    import pyarrow as pa

    try:
        with pa.memory_map(path) as source:
            schema = pa.ipc.open_stream(source).schema
    except Exception as exc:
        raise DataError(f"{path} is not a readable Arrow stream file (as datasets writes them): {exc}") from exc
    _check_text_column(path, schema, text_field)


def _check_text_column(path: str, schema: Any, text_field: str) -> None:
    """A DataError unless the pyarrow ``schema`` of ``path`` has a string column ``text_field``."""
    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "pass --text-field NAME")
    if str(schema.field(text_field).type) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column {text_field!r} has type {schema.field(text_field).type}, not string")
