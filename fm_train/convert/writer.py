"""Write weights as Hugging Face safetensors: one file, or shards plus ``model.safetensors.index.json``.

Shards are planned from shapes alone, before any tensor is read, so the file names
(``model-00001-of-00003.safetensors``) are known up front and each shard is filled, written and
dropped in turn: memory holds one shard at most.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def plan_shards(shapes: Mapping[str, torch.Size], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Group names in order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(out_dir: Path, shapes: Mapping[str, torch.Size], fetch: Callable[[str], torch.Tensor],
                      dtype: torch.dtype, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: Callable[[str], None] = lambda _msg: None) -> dict[str, str]:
    """Write every tensor ``fetch(name)`` (cast to ``dtype``); returns ``{name: file}``.

    ``shapes`` is in Hugging Face names and fixes order and plan; ``fetch`` must return that shape.
    """
    plan = plan_shards(shapes, dtype, max_shard_bytes)
    n = len(plan)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(plan, start=1):
        fname = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            t = fetch(name)
            if t.shape != shapes[name]:
                raise ValueError(f"{name}: got shape {tuple(t.shape)}, planned {tuple(shapes[name])}")
            tensors[name] = t.to(dtype).contiguous()
            total += tensors[name].numel() * tensors[name].element_size()
            weight_map[name] = fname
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        progress(f"wrote {fname} ({len(names)} tensors)")
        del tensors
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
