"""Materialise only this rank's part of each parameter, equal to slicing the full initial weights.

A pure model's seeded init draws every parameter in tiles, each from a generator seeded by the run
seed, the parameter's name and the tile's place (``ModelArgs.initial_block``, :mod:`fm_train.model.base`),
so a rank draws its own slice alone, on its device, from the tiles it overlaps: its rows or columns of a
tp shard (:func:`materialize_`), its experts, or the flat range a ZeRO-3 rank owns
(:func:`materialize_zero3_`). Every layout starts from exactly the weights of one process, and no rank
draws the whole model (nor, from the seed, a whole parameter it does not hold whole).

The initial weights are an :data:`InitSource`: the run seed, full tensors by name, or a
:class:`SliceReader` (a Hugging Face checkpoint imported for continued pretraining,
:class:`fm_train.convert.hf_weights.HFWeights`), which is asked for this rank's slice only, so a rank
never reads another rank's shard, another stage's layers or another ZeRO-3 partition from disk.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Protocol, Union, runtime_checkable

import torch
from torch import nn

from fm_train.model.base import ModelArgs
from fm_train.parallel.tensor_parallel import (
    TPGroup,
    mark_tensor_parallel,
    retie,
    shard,
    tied_parameters,
)
from fm_train.parallel.tp_plan import TPPlan


@functools.lru_cache(maxsize=8)
def full_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Unsharded shape of every parameter of the pure model, by name (built on meta: no memory)."""
    with torch.device("meta"):
        model = args.build()
    return {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}


def _seeded_shape(args: ModelArgs, name: str) -> tuple[str, torch.Size]:
    name = args.tied_source(name)  # a tied parameter is the one it shares, and draws under that name
    shapes = full_shapes(args)
    if name not in shapes:
        raise KeyError(f"{name!r} is not a parameter of the model (known: {sorted(shapes)[:4]} ...)")
    return name, shapes[name]


def full_init(args: ModelArgs, seed: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The full fp32 initial value of the pure model's parameter ``name`` (a Hugging Face key)."""
    name, shape = _seeded_shape(args, name)
    return args.initial_block(name, shape, seed, device=device)


def _seeded_chunk(args: ModelArgs, seed: int, name: str, dim: int, index: int, parts: int,
                  device: torch.device | str) -> torch.Tensor:
    """Chunk ``index`` of ``parts`` along ``dim`` (as ``torch.chunk`` cuts) of the seeded value, drawn alone:
    along the last dim a range of columns, along dim 0 a range of rows of the 2-D view; any other dim
    (no plan splits one) from the whole."""
    name, shape = _seeded_shape(args, name)
    dim = dim % len(shape)
    size = -(-shape[dim] // parts)
    start, stop = min(shape[dim], index * size), min(shape[dim], (index + 1) * size)
    if dim == len(shape) - 1:
        block = args.initial_block(name, shape, seed, cols=(start, stop), device=device)
    elif dim == 0:
        per_row = math.prod(shape[1:-1])  # rows of the 2-D view per index of dim 0
        block = args.initial_block(name, shape, seed, rows=(start * per_row, stop * per_row), device=device)
    else:
        return args.initial_block(name, shape, seed, device=device).chunk(parts, dim)[index]
    return block.reshape(*shape[:dim], stop - start, *shape[dim + 1:])


def _seeded_flat(args: ModelArgs, seed: int, name: str, start: int, count: int,
                 device: torch.device | str) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the flattened seeded value: the rows of the 2-D view covering them."""
    name, shape = _seeded_shape(args, name)
    width = shape[-1]
    first, last = start // width, -(-(start + count) // width)
    rows = args.initial_block(name, shape, seed, rows=(first, last), device=device).reshape(-1)
    return rows.narrow(0, start - first * width, count)


@runtime_checkable
class SliceReader(Protocol):
    """Initial weights read on demand, a slice at a time (pure-model names; a tied head may alias the
    embedding). The values keep their stored dtype; the caller copies them into its parameters."""

    def shape(self, name: str) -> torch.Size:
        """Full shape of ``name``."""

    def read(self, name: str, dim: int | None = None, index: int = 0, parts: int = 1) -> torch.Tensor:
        """Chunk ``index`` of ``parts`` of ``name`` along ``dim`` as ``torch.chunk`` cuts it (all when ``dim`` is None)."""

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of ``name`` flattened."""


InitSource = Union[int, Mapping[str, torch.Tensor], SliceReader]
"""Initial weights: a seed (the seeded init), full tensors by pure-model name (``import_hf``'s state
dict), or a :class:`SliceReader` (``open_hf``'s lazy weights: each rank reads only its slices)."""


class _PaddedVocab:
    """A :class:`SliceReader` over one whose vocabulary rows stop at ``args.vocab_size`` (a Hugging Face
    checkpoint of the tokenizer's vocabulary): the embedding and head read ``args.padded_vocab_size``
    rows, the padding ones zero, and only the real rows a slice covers are read from the source."""

    def __init__(self, args: ModelArgs, source: SliceReader) -> None:
        self.args, self.source = args, source

    def _pads(self, name: str) -> bool:
        return name.endswith(self.args.VOCAB_ROW_PARAMS) and self.source.shape(name)[0] == self.args.vocab_size

    def shape(self, name: str) -> torch.Size:
        stored = self.source.shape(name)
        return torch.Size((self.args.padded_vocab_size, *stored[1:])) if self._pads(name) else stored

    def read(self, name: str, dim: int | None = None, index: int = 0, parts: int = 1) -> torch.Tensor:
        if not self._pads(name):
            return self.source.read(name, dim, index, parts)
        # Elements per vocabulary row: a matrix's columns, 1 for a vector (the MLM decoder's bias).
        row_shape = tuple(self.source.shape(name)[1:])
        rows, cols = self.args.padded_vocab_size, math.prod(row_shape)
        start, stop = 0, rows
        if dim is not None and parts > 1:
            if dim != 0:  # no plan splits a vocabulary matrix by columns: cut the whole
                return self.read(name).chunk(parts, dim)[index]
            size = -(-rows // parts)  # where torch.chunk cuts
            start, stop = min(rows, index * size), min(rows, (index + 1) * size)
        return self.read_flat(name, start * cols, (stop - start) * cols).reshape(stop - start, *row_shape)

    def read_flat(self, name: str, start: int, count: int) -> torch.Tensor:
        if not self._pads(name):
            return self.source.read_flat(name, start, count)
        real = self.args.vocab_size * math.prod(self.source.shape(name)[1:])
        have = max(0, min(count, real - start))
        if have == count:
            return self.source.read_flat(name, start, count)
        stored = self.source.read_flat(name, start, have) if have else torch.zeros(0)
        return torch.cat([stored, stored.new_zeros(count - have)])


def _pad_vocab_rows(args: ModelArgs, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A full embedding or head of ``args.vocab_size`` rows with zero padding rows appended."""
    if not name.endswith(args.VOCAB_ROW_PARAMS) or tensor.shape[0] != args.vocab_size or args.padded_vocab_size == args.vocab_size:
        return tensor
    pad = tensor.new_zeros((args.padded_vocab_size - args.vocab_size, *tensor.shape[1:]))
    return torch.cat([tensor, pad])


def _own_name(args: ModelArgs, name: str) -> str:
    """The name the initial weights hold ``name`` under: a tied head is the embedding."""
    return args.tied_source(name)


def _check_shape(args: ModelArgs, name: str, shape: torch.Size) -> None:
    want = full_shapes(args)[name]
    if shape != want:
        raise ValueError(f"initial weight {name!r} has shape {tuple(shape)}, the model needs {tuple(want)}")


def initial_value(args: ModelArgs, init: InitSource, name: str) -> torch.Tensor:
    """The full initial value of parameter ``name``: seeded, or looked up (and shape-checked) in ``init``."""
    if isinstance(init, int):
        return full_init(args, init, name)
    name = _own_name(args, name)
    if isinstance(init, SliceReader):
        init = _PaddedVocab(args, init)
        _check_shape(args, name, init.shape(name))
        return init.read(name)
    if name not in init:
        raise KeyError(f"initial weights lack {name!r} (have {len(init)} tensors, e.g. {sorted(init)[:3]})")
    value = _pad_vocab_rows(args, name, init[name])
    _check_shape(args, name, value.shape)
    return value


def initial_shard(args: ModelArgs, init: InitSource, name: str, dim: int | None, tp: TPGroup, *,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """This tp rank's slice of parameter ``name``'s initial value along ``dim`` (all of it when replicated).

    From the seed only the slice is drawn (on ``device``), from a :class:`SliceReader` only the slice is
    read; full tensors are cut.
    """
    if isinstance(init, int):
        if dim is None or tp.size == 1:
            return full_init(args, init, name, device)
        return _seeded_chunk(args, init, name, dim, tp.rank, tp.size, device)
    if not isinstance(init, SliceReader):
        return shard(initial_value(args, init, name), dim, tp)
    name, init = _own_name(args, name), _PaddedVocab(args, init)
    _check_shape(args, name, init.shape(name))
    if dim is None or tp.size == 1:
        return init.read(name)
    return init.read(name, dim, tp.rank, tp.size)


def initial_rows(args: ModelArgs, init: InitSource, name: str, index: int, parts: int, *,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Chunk ``index`` of ``parts`` of parameter ``name``'s initial value along dim 0: an expert-parallel
    rank's experts of a stacked expert parameter. From the seed or a :class:`SliceReader` only those rows
    are drawn or read."""
    if isinstance(init, int):
        return _seeded_chunk(args, init, name, 0, index, parts, device)
    if not isinstance(init, SliceReader):
        return initial_value(args, init, name).chunk(parts, 0)[index]
    name, init = _own_name(args, name), _PaddedVocab(args, init)
    _check_shape(args, name, init.shape(name))
    return init.read(name, 0, index, parts)


def initial_flat(args: ModelArgs, init: InitSource, name: str, start: int, count: int, *,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements ``[start, start + count)`` of parameter ``name``'s flattened initial value (a ZeRO-3
    partition); from the seed or a :class:`SliceReader` only the rows covering them are drawn or read."""
    if isinstance(init, int):
        return _seeded_flat(args, init, name, start, count, device)
    if not isinstance(init, SliceReader):
        return initial_value(args, init, name).reshape(-1).narrow(0, start, count)
    name, init = _own_name(args, name), _PaddedVocab(args, init)
    _check_shape(args, name, init.shape(name))
    return init.read_flat(name, start, count)


@torch.no_grad()
def materialize_(module: nn.Module, args: ModelArgs, init: InitSource, tp: TPGroup, plan: TPPlan, *, prefix: str = "",
                 device: torch.device | str | None = None, rows: Mapping[str, tuple[int, int]] | None = None) -> nn.Module:
    """Give ``module``'s parameters real storage holding this rank's tp shard (split by ``plan``) of the
    initial weights.

    ``prefix + local name`` must be the pure model's parameter name (``model.layers.3.`` for a
    pipeline block, empty for the whole model). ``device``: where meta parameters get their storage and
    the seeded values are drawn (None: torch's default device). ``rows``: pure-model name -> ``(index, parts)`` for
    parameters split by rows instead (an expert-parallel rank's experts: :func:`initial_rows`).
    Buffers become uninitialised storage: the caller recomputes them (RoPE tables are derived from
    ``args``, never stored).
    """
    rows = rows or {}
    ties = tied_parameters(module)
    if any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()]):
        module.to_empty(device=device if device is not None else torch.get_default_device())
        retie(module, ties)  # to_empty replaces each module's parameters separately, breaking ties
    for name, param in module.named_parameters():
        full_name = prefix + name
        if full_name in rows:  # expert rows: whole on every tp rank
            param.copy_(initial_rows(args, init, full_name, *rows[full_name], device=param.device))
            mark_tensor_parallel(param, None, tp)
            continue
        dim = plan.split_dim_of(full_name)
        param.copy_(initial_shard(args, init, full_name, dim, tp, device=param.device))
        mark_tensor_parallel(param, dim, tp)  # to_empty made new Parameter objects: tag them again
    return module


@torch.no_grad()
def materialize_zero3_(module: nn.Module, args: ModelArgs, init: InitSource, *, prefix: str = "") -> nn.Module:
    """Overwrite each ZeRO-3 partition of ``module`` (built under ``deepspeed.zero.Init``) with the initial weights.

    DeepSpeed stores rank ``r``'s partition of a parameter as the flat range ``[r * n, (r + 1) * n)``
    of the flattened full tensor (``n`` elements per rank, the last rank's tail zero padding; where
    DeepSpeed keeps it: :func:`fm_train.deepspeed_adapter.zero3.zero3_partition`), so each rank computes
    one full value at a time and keeps its range: no collective, no gather.
    """
    from fm_train.deepspeed_adapter.zero3 import partition_elements, zero3_partition

    for name, param in module.named_parameters():
        part = zero3_partition(param)
        if part is None:
            raise ValueError(f"{prefix + name} is not a ZeRO-3 partitioned parameter (build it under deepspeed.zero.Init)")
        count = partition_elements(math.prod(full_shapes(args)[prefix + name]), part)
        part.flat.zero_()  # padding stays zero, as DeepSpeed's own partitioning leaves it
        if count:
            part.flat.narrow(0, 0, count).copy_(initial_flat(args, init, prefix + name, part.per_rank * part.index,
                                                             count, device=part.flat.device))
    return module
