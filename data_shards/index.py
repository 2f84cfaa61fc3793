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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import DataError
from .safe_paths import UnsafePathError, relative_name
from .storage import Location, as_location, remote_error

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
    """Load ``directory/index.json`` and validate every field once, here: the file is untrusted input
    (a copied directory, a bucket), so a name, count or hash from it is used nowhere before it passed.
    Anything unusable is one DataError naming the file, the field and the fix."""
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
    check = _IndexCheck(path, directory)
    return check.index(_load_json(path, check))


# Bounds of what the writer can produce; anything past them is a damaged or hostile index.json.
MAX_INDEX_BYTES = 64 << 20  # about 600,000 shard entries; refused before parsing
MAX_SEQ_LEN = 1 << 24
MAX_VOCAB = 1 << 32  # uint32 token ids
MAX_SHARD_BYTES = 1 << 40
MAX_SAMPLES = 10**KEY_DIGITS  # member names hold the global sample number in KEY_DIGITS digits
DTYPES = ("uint16", "uint32")
END_OF_ARCHIVE = 2 * HEADER_BYTES  # the two zero blocks that close every shard
SHARD_NAME = re.compile(r"shard-\d{6,}\.tar")  # what ShardWriter names its files, and nothing else
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUIRED = ("format", "format_version", "seq_len", "dtype", "vocab_size", "eos_id", "tokenizer_hash", "shards")
_OPTIONAL = ("sources", "totals", "created_by", "sample_tokens", "member", "tokenizer_dir")
_SHARD_FIELDS = ("name", "samples", "tokens", "bytes", "sha256", "first_sample")
_SOURCE_FIELDS = (("path", "kind"), ("bytes", "split"))  # required, optional


def shard_file_name(position: int) -> str:
    """The file name the writer gives the shard at ``position`` of a directory."""
    return f"shard-{position:06d}.tar"


def _load_json(path: Location, check: _IndexCheck) -> dict[str, Any]:
    """The parsed JSON object of ``path``, read only up to MAX_INDEX_BYTES (a bigger file is refused
    unparsed, so a hostile one cannot take the memory of every rank)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        check.fail("", f"cannot be read ({exc})")
    if len(raw) > MAX_INDEX_BYTES:
        check.fail("", f"is larger than {MAX_INDEX_BYTES >> 20} MiB, far more than fm-train writes")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:  # the C decoder recurses per nesting level; the schema is 3 levels deep
        check.fail("", "is nested too deep to be an index")
    except ValueError as exc:
        check.fail("", f"is not valid JSON ({exc})")
    if not isinstance(obj, dict):
        check.fail("", f"holds a {type(obj).__name__}, not a JSON object")
    return obj


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class BadIndexError(DataError):
    """An index.json that fails validation; ``problem`` is the message without the rebuild advice."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class _IndexCheck:
    """The field checks of one index.json; every failure names the file, the field and the rebuild."""

    def __init__(self, path: Location, directory: Location) -> None:
        self.path, self.directory = path, directory

    def fail(self, field: str, problem: str) -> NoReturn:
        """Raise the DataError for ``field`` (empty: the whole file)."""
        where = f"{self.path}: {field}" if field else str(self.path)
        raise BadIndexError(f"{where} {problem}; it is not an index fm-train wrote: rebuild the directory with "
                            f"`fm-train shard ... --out {self.directory} --overwrite`", f"{where} {problem}")

    def integer(self, value: object, field: str, low: int, high: int) -> int:
        """``value`` as an int in ``[low, high]`` (a bool, float or string is refused, not converted)."""
        if type(value) is not int:
            self.fail(field, f"is {_show(value)}, not an integer")
        if not low <= value <= high:
            self.fail(field, f"is {value}, outside {low}..{high}")
        return value

    def exact(self, value: object, field: str, expected: int, why: str) -> int:
        """``value`` as an int equal to ``expected``, which the writer derives from ``why``."""
        if type(value) is not int or value != expected:
            self.fail(field, f"is {_show(value)}, but {why} make it {expected}")
        return value

    def text(self, value: object, field: str, pattern: re.Pattern[str] | None = None, expected: str = "", *,
             one_line: bool = True) -> str:
        """``value`` as a string matching ``pattern`` if given; ``one_line``: without control characters
        (it is printed in messages, where a newline would forge a line of output)."""
        if not isinstance(value, str) or (one_line and _CONTROL.search(value)):
            self.fail(field, f"is {_show(value)}, not a {'single-line ' if one_line else ''}string")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"is {_show(value)} ({expected})")
        return value

    def fields(self, obj: object, field: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
        """``obj`` as a JSON object with all ``required`` keys and no key outside ``required + optional``."""
        if not isinstance(obj, dict):
            self.fail(field, f"is {_show(obj)}, not a JSON object")
        missing = [k for k in required if k not in obj]
        if missing:
            self.fail(f"{field}.{missing[0]}" if field else missing[0], "is missing")
        unknown = sorted(str(k) for k in obj if k not in required + optional)
        if unknown:
            self.fail(f"{field}.{unknown[0]}" if field else unknown[0], "is not a field of a format "
                      f"{FORMAT_VERSION} index")
        return obj

    def index(self, obj: dict[str, Any]) -> ShardIndex:
        """The validated ShardIndex of a parsed index.json."""
        if obj.get("format") != FORMAT or type(obj.get("format_version")) is not int \
                or obj.get("format_version") != FORMAT_VERSION:
            self.fail("", f"has format {_show(obj.get('format'))} version {_show(obj.get('format_version'))}; "
                      f"this reader needs {FORMAT!r} version {FORMAT_VERSION}")
        self.fields(obj, "", _REQUIRED, _OPTIONAL)
        vocab = self.integer(obj["vocab_size"], "vocab_size", 1, MAX_VOCAB)
        dtype = self.text(obj["dtype"], "dtype")
        if dtype != dtype_for_vocab(vocab):
            self.fail("dtype", f"is {_show(dtype)}, but the writer stores a vocabulary of {vocab} as "
                      f"{dtype_for_vocab(vocab)!r} (one of {', '.join(DTYPES)})")
        index = ShardIndex(
            seq_len=self.integer(obj["seq_len"], "seq_len", 1, MAX_SEQ_LEN), dtype=dtype, vocab_size=vocab,
            eos_id=self.integer(obj["eos_id"], "eos_id", 0, vocab - 1),
            tokenizer_hash=self.text(obj["tokenizer_hash"], "tokenizer_hash", SHA256_HEX, "expected 64 lowercase hex"),
            shards=[], sources=self.sources(obj.get("sources", [])), totals=self.totals(obj.get("totals", {})),
            created_by=self.text(obj.get("created_by", ""), "created_by"))
        index.shards = self.shards(obj["shards"], index)
        layout = index.to_json()
        for key in ("sample_tokens", "member", "tokenizer_dir"):
            if key in obj and obj[key] != layout[key]:
                self.fail(key, f"is {_show(obj[key])}, but seq_len and dtype give {_show(layout[key])}")
        return index

    def shards(self, raw: object, index: ShardIndex) -> list[ShardEntry]:
        """The shard entries, each consistent with the layout and following its predecessor."""
        if not isinstance(raw, list) or not raw:
            self.fail("shards", f"is {_show(raw)}, not a non-empty list")
        entries: list[ShardEntry] = []
        first = 0
        for i, item in enumerate(raw):
            entries.append(self.shard(item, f"shards[{i}]", i, first, index))
            first += entries[-1].samples
        return entries

    def shard(self, raw: object, field: str, position: int, first: int, index: ShardIndex) -> ShardEntry:
        """One shard entry: a name the writer gives, counts and size that fit the layout, a sha256."""
        item = self.fields(raw, field, _SHARD_FIELDS)
        try:
            relative_name(item["name"], what=f"{field}.name", strict=True)
        except UnsafePathError as exc:
            self.fail(f"{field}.name", f"is refused ({exc})")
        self.text(item["name"], f"{field}.name", SHARD_NAME, "expected shard-NNNNNN.tar, the writer's names")
        if item["name"] != shard_file_name(position):
            self.fail(f"{field}.name", f"is {_show(item['name'])}, but the writer names shard {position} "
                      f"{shard_file_name(position)!r}")
        samples = self.integer(item["samples"], f"{field}.samples", 1, (MAX_SHARD_BYTES - END_OF_ARCHIVE)
                               // index.stride_bytes)
        self.exact(item["first_sample"], f"{field}.first_sample", first, "the samples of the shards before it")
        if first + samples > MAX_SAMPLES:
            self.fail(f"{field}.samples", f"takes the directory past {MAX_SAMPLES} samples")
        tokens = self.exact(item["tokens"], f"{field}.tokens", samples * index.sample_tokens, "samples and seq_len")
        size = self.exact(item["bytes"], f"{field}.bytes", samples * index.stride_bytes + END_OF_ARCHIVE,
                          "samples, seq_len and dtype (tar headers and end blocks included)")
        sha = self.text(item["sha256"], f"{field}.sha256", SHA256_HEX, "expected 64 lowercase hex digits")
        return ShardEntry(name=item["name"], samples=samples, tokens=tokens, bytes=size, sha256=sha,
                          first_sample=first)

    def sources(self, raw: object) -> list[dict[str, Any]]:
        """The recorded inputs: flat objects of short strings and counts (shown to users, never opened)."""
        if not isinstance(raw, list):
            self.fail("sources", f"is {_show(raw)}, not a list")
        for i, item in enumerate(raw):
            entry = self.fields(item, f"sources[{i}]", *_SOURCE_FIELDS)
            for key, value in entry.items():
                if key == "bytes":
                    self.integer(value, f"sources[{i}].bytes", 0, 1 << 62)
                else:
                    self.text(value, f"sources[{i}].{key}", one_line=False)  # a record, never opened
        return list(raw)

    def totals(self, raw: object) -> dict[str, int]:
        """The build's counters: names to non-negative integers."""
        if not isinstance(raw, dict):
            self.fail("totals", f"is {_show(raw)}, not a JSON object")
        return {self.text(k, "totals"): self.integer(v, f"totals.{k}", 0, 1 << 62) for k, v in raw.items()}
