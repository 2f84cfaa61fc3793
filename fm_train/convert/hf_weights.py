"""A Hugging Face dir's weights by fm_train name, read lazily and only in the slices asked for.

``model.init_from`` used to read every tensor of the checkpoint on every rank: 140 GB per rank for a
70B model in bf16, 8 times per node. safetensors stores each tensor contiguously in row-major order,
and ``safe_open(...).get_slice(key)[...]`` reads only the requested index range from the
memory-mapped file. So a tensor-parallel rank reads its chunk along the split dim, a pipeline stage
only the tensors of its own layers (nobody asks it for the others), and a ZeRO-3 rank the rows that
cover its flat partition. The header is all that is read up front (names, shapes, dtypes). With
safetensors' default mmap backend a slice is a view whose pages are read when it is copied into the
parameter, and the mapping goes as soon as the copy is done; the whole-file import kept every
tensor mapped, and resident once touched, until the build ended (tests/test_init_from_slices.py
measures both).

:class:`HFWeights` implements :class:`fm_train.parallel.sharded_init.SliceReader`; it counts what it
read (``elements_read``, ``bytes_read``), which the worker reports and the tests check per rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from data_shards.safe_paths import UnsafePathError, resolve_under
from fm_train.convert.errors import ConvertError
from fm_train.convert.keymap import hf_piece
from fm_train.families.spec import FamilySpec


def safetensors_files(hf_dir: Path) -> list[str]:
    """The weight files of ``hf_dir``: those its ``model.safetensors.index.json`` names, else ``model.safetensors``."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ConvertError(f"{index}: not a safetensors index (no readable weight_map): {exc}") from None
        for name in names:  # names from an untrusted directory: files inside it only
            try:
                resolve_under(hf_dir, name, what=f"{index}: weight_map")
            except UnsafePathError as exc:
                raise ConvertError(str(exc)) from None
        return names
    return ["model.safetensors"]


def chunk_bounds(n: int, index: int, parts: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``n`` is split into ``parts`` as ``torch.chunk`` splits it."""
    size = -(-n // parts)
    start = min(n, index * size)
    return start, min(n, start + size)


class HFWeights:
    """The safetensors weights of a Hugging Face dir, by fm_train parameter name, read on demand.

    Construction reads the headers only and checks that every parameter of ``want`` (name -> shape,
    from :func:`fm_train.convert.keymap.hf_param_shapes`) is there with its shape; a key outside the
    ``family``'s key map is an error naming it. ``tied``: tied parameter -> the one it shares (the
    family's ``tied_params``); a stored tied tensor is ignored and reading it reads the one it shares
    (fm_train's model shares the two).
    """

    def __init__(self, hf_dir: Path, family: FamilySpec, *, want: Mapping[str, torch.Size],
                 tied: Mapping[str, str]) -> None:
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        self.tied = dict(tied)
        self._where: dict[str, tuple[Path, str]] = {}  # fm name -> (file, Hugging Face key)
        self._shapes: dict[str, torch.Size] = {}
        # A fused expert parameter: (expert, part) -> (file, key, shape); its shape is derived from them.
        self._pieces: dict[str, dict[tuple[int, int], tuple[Path, str, torch.Size]]] = {}
        self._parts: dict[str, int] = {}
        self.total_bytes = 0
        for fname in safetensors_files(self.hf_dir):
            path = self.hf_dir / fname
            if not path.is_file():
                raise ConvertError(f"{self.hf_dir} lacks {fname} (only safetensors weights are imported)")
            self.total_bytes += path.stat().st_size
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    if key in self.tied:
                        continue  # some exports store a tied tensor too; fm_train's model shares the other one
                    piece = hf_piece(family, key)
                    shape = torch.Size(fh.get_slice(key).get_shape())
                    if piece.row is None:
                        self._where[piece.name] = (path, key)
                        self._shapes[piece.name] = shape
                    else:
                        self._pieces.setdefault(piece.name, {})[(piece.row, piece.part)] = (path, key, shape)
                        self._parts[piece.name] = piece.parts
        for name, pieces in self._pieces.items():
            self._shapes[name] = self._fused_shape(name, pieces)
        missing = sorted(set(want) - set(self._shapes))
        wrong = [f"{n} {tuple(self._shapes[n])} (want {tuple(want[n])})" for n in want
                 if n in self._shapes and self._shapes[n] != want[n]]
        if missing or wrong:
            raise ConvertError(f"{self.hf_dir}: missing tensors {missing[:5]}, wrong shapes {wrong[:5]}")
        self.elements_read = 0
        self.bytes_read = 0

    def _fused_shape(self, name: str, pieces: Mapping[tuple[int, int], tuple[Path, str, torch.Size]]) -> torch.Size:
        """The shape of fused expert parameter ``name`` from its per-expert keys; every expert's every part
        must be there, all of one shape."""
        experts, parts = 1 + max(row for row, _ in pieces), self._parts[name]
        absent = [(e, p) for e in range(experts) for p in range(parts) if (e, p) not in pieces]
        shapes = {shape for _path, _key, shape in pieces.values()}
        if absent or len(shapes) != 1:
            raise ConvertError(f"{self.hf_dir}: the expert tensors of {name} are incomplete or of different shapes"
                               f" (missing (expert, part) {absent[:5]}, shapes {sorted(tuple(s) for s in shapes)[:3]})")
        (shape,) = shapes
        return torch.Size((experts, parts * shape[0], *shape[1:]))

    def _resolve(self, name: str) -> str:
        if name in self.tied:
            return self.tied[name]
        if name not in self._shapes:
            raise KeyError(f"{self.hf_dir} holds no tensor for {name!r} (have {len(self._shapes)},"
                           f" e.g. {sorted(self._shapes)[:3]})")
        return name

    def names(self) -> list[str]:
        """Every fm_train parameter name the dir provides (tied ones included)."""
        return sorted({*self._shapes, *self.tied})

    def shape(self, name: str) -> torch.Size:
        """The full (unsharded) shape of parameter ``name``."""
        return self._shapes[self._resolve(name)]

    def _read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        from safetensors import safe_open

        name = self._resolve(name)
        if name in self._pieces:
            tensor = self._read_experts(name, index)
        else:
            path, key = self._where[name]
            with safe_open(str(path), framework="pt") as fh:
                tensor = fh.get_slice(key)[index]  # only these bytes leave the file
        self.elements_read += tensor.numel()
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _read_experts(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``index`` of a fused expert parameter, reading only the experts (rows) it covers."""
        from safetensors import safe_open

        rows = range(*index[0].indices(self._shapes[name][0])) if index else range(self._shapes[name][0])
        experts = []
        for row in rows:
            parts = []
            for part in range(self._parts[name]):
                path, key, _shape = self._pieces[name][(row, part)]
                with safe_open(str(path), framework="pt") as fh:
                    parts.append(fh.get_slice(key)[:])
            experts.append(torch.cat(parts))
        return torch.stack(experts)[(slice(None), *index[1:])]

    def read(self, name: str, dim: int | None = None, index: int = 0, parts: int = 1) -> torch.Tensor:
        """Chunk ``index`` of ``parts`` of ``name`` along ``dim`` (as ``torch.chunk``), or all of it
        when ``dim`` is None or ``parts`` is 1; in the stored dtype."""
        shape = self.shape(name)
        if dim is None or parts == 1:
            return self._read(name, (slice(None),) * len(shape))
        start, stop = chunk_bounds(shape[dim], index, parts)
        return self._read(name, (slice(None),) * dim + (slice(start, stop),))

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of ``name`` flattened (a ZeRO-3 partition), 1-D.

        Reads the whole rows (along dim 0) that cover the range, at most two rows more than asked.
        """
        shape = self.shape(name)
        row = math.prod(shape[1:])
        first, last = start // row, -(-(start + count) // row)
        rows = self._read(name, (slice(first, last),) + (slice(None),) * (len(shape) - 1))
        return rows.reshape(-1).narrow(0, start - first * row, count)
