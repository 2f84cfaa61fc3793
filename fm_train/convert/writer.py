"""Write weights as Hugging Face safetensors: one file, or shards plus ``model.safetensors.index.json``.

Shards are planned from shapes alone, before any tensor is read, so the file names
(``model-00001-of-00003.safetensors``) and every tensor's byte offsets are known up front. Each file
is then streamed: its header first, then its tensors packed into chunks of up to 64 MiB, one write
call per chunk; the next chunk is read from the checkpoint and cast (a worker thread; torch and file
writes release the GIL) while the current one is written. Several shards are written at once, up to
one per core (at most 4). Memory holds two chunks (or two of the largest tensor, if bigger) per
shard being written, whatever the shard size.

Why not ``safetensors.torch.save_file``: it takes every tensor of a file at once (a whole shard of
cast copies in memory, 2 GiB by default) and cannot overlap producing tensors with writing them. The format itself is small and fixed (an 8-byte
little-endian header length, a JSON header with dtype, shape and data offsets, then the raw bytes),
and every file written here is read back by ``safetensors`` itself (the tests, and verification
through ``transformers``).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Bytes packed per write call: large enough that calls are few, small enough that two stay cheap.
CHUNK_BYTES = 64 * 1024**2
# Shard files written at once (each with its own reader thread), at most one per core.
MAX_PARALLEL_FILES = 4
# safetensors' names for torch dtypes (its format spec).
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return shape.numel() * torch.empty(0, dtype=dtype).element_size()


def plan_shards(shapes: Mapping[str, torch.Size], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Group names in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def safetensors_header(names: Sequence[str], shapes: Mapping[str, torch.Size], dtype: torch.dtype) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``names`` in this order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + _nbytes(shapes[name], dtype)
        entries[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(header)) + header


def _chunks(names: Sequence[str], shapes: Mapping[str, torch.Size], dtype: torch.dtype,
            chunk_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into runs of at most ``chunk_bytes`` (a bigger tensor is a run alone)."""
    return plan_shards({n: shapes[n] for n in names}, dtype, chunk_bytes)


def _stream_file(path: Path, names: Sequence[str], shapes: Mapping[str, torch.Size],
                 fetch: Callable[[str], torch.Tensor], dtype: torch.dtype, chunk_bytes: int) -> None:
    """Write one safetensors file: tensors are read, cast and packed into a chunk of about
    ``chunk_bytes`` in a worker thread while the previous chunk is written with one ``write`` call."""
    chunks = _chunks(names, shapes, dtype, chunk_bytes)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    size = max((sum(shapes[n].numel() for n in chunk) for chunk in chunks), default=0) * itemsize
    # Two chunk buffers, reused: a fresh allocation per chunk would page-fault its whole size in again,
    # and one large write costs far less than one per tensor (the system-call cost is per call and page).
    buffers = [torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)]

    def pack(j: int) -> memoryview:
        buf, offset = buffers[j % 2], 0
        for name in chunks[j]:
            t = fetch(name)
            if t.shape != shapes[name]:
                raise ValueError(f"{name}: got shape {tuple(t.shape)}, planned {tuple(shapes[name])}")
            nbytes = t.numel() * itemsize
            buf[offset:offset + nbytes].view(dtype).view(t.shape).copy_(t)  # cast and gather in one pass
            offset += nbytes
        return memoryview(buf[:offset].numpy())

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-train-convert") as pool, open(path, "wb") as fh:
        fh.write(safetensors_header(names, shapes, dtype))
        pending = pool.submit(pack, 0)
        for j in range(len(chunks)):
            data = pending.result()
            if j + 1 < len(chunks):
                # Buffer (j+1) % 2 was last written from in iteration j-1, which has finished.
                pending = pool.submit(pack, j + 1)
            fh.write(data)


def write_safetensors(out_dir: Path, shapes: Mapping[str, torch.Size], fetch: Callable[[str], torch.Tensor],
                      dtype: torch.dtype, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: Callable[[str], None] = lambda _msg: None) -> dict[str, str]:
    """Write every tensor ``fetch(name)`` (cast to ``dtype``); returns ``{name: file}``.

    ``shapes`` is in Hugging Face names and fixes order and plan; ``fetch`` must return that shape.
    """
    if sys.byteorder != "little":
        raise RuntimeError("the safetensors writer needs a little-endian machine (the format's byte order)")
    if dtype not in _SAFETENSORS_DTYPE:
        raise ValueError(f"cannot write {dtype} as safetensors here; use one of {', '.join(DTYPES)}")
    plan = plan_shards(shapes, dtype, max_shard_bytes)
    n = len(plan)
    total = sum(_nbytes(shape, dtype) for shape in shapes.values())
    progress(f"writing {len(shapes)} tensors ({total / 1e9:.2f} GB {str(dtype).removeprefix('torch.')}) "
             f"in {n} file{'s' if n > 1 else ''}")
    files = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {name: fname for fname, names in zip(files, plan) for name in names}
    # Several shards at once where cores allow: a filesystem serialises writes to one file, not to several.
    writers = max(1, min(n, os.cpu_count() or 1, MAX_PARALLEL_FILES))
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="fm-train-shard") as pool:
        futures = {pool.submit(_stream_file, out_dir / fname, names, shapes, fetch, dtype, CHUNK_BYTES): (fname, names)
                   for fname, names in zip(files, plan)}
        for future in as_completed(futures):
            future.result()  # the first failure stops the conversion (the caller removes the partial output)
            fname, names = futures[future]
            progress(f"wrote {fname} ({len(names)} tensors)")
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def read_weight_names(out_dir: Path) -> list[str]:
    """Tensor names stored in a Hugging Face dir (from the index, else from the single file's header)."""
    index = out_dir / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(out_dir / SINGLE_FILE), framework="pt") as fh:
        return list(fh.keys())
