"""What every pure model shares: its shape arguments' contract, the padded vocabulary, seeded init.

A family's shape arguments (``LlamaArgs``, ``BertArgs``) subclass :class:`ModelArgs`, so code that
handles any pure model (the sharded init of :mod:`fm_train.parallel.sharded_init`, the converter's
meta builds) asks the arguments for their module, their per-parameter seeded init and their
vocabulary-row and tied parameters, and never which family it has.

Seeded init draws a parameter in tiles (:data:`INIT_TILE` of its 2-D view ``[elements / last dim,
last dim]``), each from its own generator seeded by the run seed, the parameter's name and the tile's
place: any slice (a tp shard of rows or of columns, an expert-parallel rank's experts, a ZeRO-3 flat
range) is drawn alone, touching only the tiles it overlaps, and equals the same slice of the whole
parameter in every layout. Tiles come from CPU generators (one tile in host memory at a time) and are
placed on the device that will hold them: a GPU's generators would give other numbers than a CPU's, and
other ones again on a GPU with another number of SMs, so the same seed would not start the same model.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``.

    The padding lets tensor parallelism split any tokenizer's vocabulary (50,257 or 32,001 tokens)
    and keeps the head's matmul on aligned widths. It depends on the model only, never on the
    layout, so every layout trains the same parameters and a checkpoint resumes on any tp size.
    Padded rows start at zero and stay there: no id selects them and the losses exclude their
    logits, so they get no gradient (and weight decay of zero is zero).
    """
    if not isinstance(vocab_size, int):  # model.vocab_size: auto reached a model: a bug, named as such
        raise ValueError(f"vocab_size {vocab_size!r} is not a number: resolve model.vocab_size: auto first"
                         " (fm_train.families.vocab.resolve_vocab)")
    return -(-vocab_size // multiple) * multiple


class ModelArgs(ABC):
    """Shape arguments of a pure model (mixed into a family's frozen dataclass, which holds ``hidden``,
    ``n_heads``, ``vocab_size`` and ``vocab_multiple``), and what is known about its parameters by name.
    A family's arguments must define :meth:`build` and :meth:`init_parameter` (abstract here)."""

    hidden: int
    n_heads: int
    vocab_size: int
    vocab_multiple: int
    #: Name suffixes of parameters with one row per (padded) vocabulary entry.
    VOCAB_ROW_PARAMS: ClassVar[tuple[str, ...]] = ()
    #: Tied parameter -> the parameter it shares, when :meth:`ties` holds.
    TIED_PARAMS: ClassVar[Mapping[str, str]] = {}

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output head: ``vocab_size`` rounded up to ``vocab_multiple``."""
        return padded_vocab_size(self.vocab_size, self.vocab_multiple)

    def ties(self) -> bool:
        """Whether :data:`TIED_PARAMS` are tied in a model of this shape."""
        return bool(self.TIED_PARAMS)

    def tied_source(self, name: str) -> str:
        """The parameter ``name`` shares its tensor with, or ``name`` itself when it is not tied."""
        tied = self.TIED_PARAMS.get(name)
        return tied if tied is not None and self.ties() else name

    @abstractmethod
    def build(self) -> nn.Module:
        """The pure module of this shape on the current default device (``torch.device("meta")`` works)."""

    @abstractmethod
    def init_of(self, name: str) -> Init:
        """The initial distribution of the pure model's parameter ``name``."""

    def init_parameter(self, name: str, param: torch.Tensor, seed: int) -> None:
        """Fill ``param`` (the pure model's ``name``, full shape) with its seeded initial value in place."""
        param.copy_(self.initial_block(name, param.shape, seed, device=param.device).to(param.dtype))

    def initial_block(self, name: str, shape: tuple[int, ...] | torch.Size, seed: int, *,
                      rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``[r0, r1)`` and columns ``[c0, c1)`` (None: all) of parameter ``name``'s seeded initial
        value (full shape ``shape``) in its 2-D view ``[elements / shape[-1], shape[-1]]``, fp32, drawn on
        ``device`` from the tiles they overlap only (drawn on CPU, see the module docstring); the whole
        parameter when both are None."""
        width = shape[-1] if len(shape) else 1
        height = math.prod(shape) // width if width else 0
        r0, r1 = rows or (0, height)
        c0, c1 = cols or (0, width)
        init = self.init_of(name)
        if init.std == 0:
            block = torch.full((r1 - r0, c1 - c0), init.fill, dtype=torch.float32, device=device)
        else:
            block = _draw_tiles(f"{seed}/{name}", init.std, (height, width), r0, r1, c0, c1, device)
        if name.endswith(self.VOCAB_ROW_PARAMS):  # vocabulary padding: zero rows (a vector: zero elements)
            if len(shape) == 1:
                block[:, max(0, self.vocab_size - c0):] = 0.0
            else:
                block[max(0, self.vocab_size * (height // shape[0]) - r0):] = 0.0
        return block.reshape(shape) if rows is None and cols is None else block


#: Rows x columns of one seeded tile (256 K elements, fewer at a parameter's border): a slice draws only
#: the tiles it overlaps.
INIT_TILE = (512, 512)


@dataclass(frozen=True)
class Init:
    """A parameter's initial distribution: normal(0, ``std``) when ``std`` > 0, else every element ``fill``."""

    std: float = 0.0
    fill: float = 0.0


def _tile_generator(key: str, i: int, j: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{key}/{i}/{j}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def _draw_tiles(key: str, std: float, full: tuple[int, int], r0: int, r1: int, c0: int, c1: int,
                device: torch.device | str) -> torch.Tensor:
    """Rows ``[r0, r1)`` x columns ``[c0, c1)`` of the normal(0, ``std``) tiling seeded by ``key`` of a
    ``full`` (rows, columns) matrix; edge tiles stop at its border, so whole draws exactly its elements."""
    th, tw = INIT_TILE
    out = torch.empty((r1 - r0, c1 - c0), dtype=torch.float32, device=device)
    for i in range(r0 // th, -(-r1 // th)):
        for j in range(c0 // tw, -(-c1 // tw)):
            tile = torch.empty((min(th, full[0] - i * th), min(tw, full[1] - j * tw)), dtype=torch.float32)
            tile.normal_(0.0, std, generator=_tile_generator(key, i, j))
            top, left = max(r0, i * th), max(c0, j * tw)
            bottom, right = min(r1, (i + 1) * th), min(c1, (j + 1) * tw)
            out[top - r0:bottom - r0, left - c0:right - c0] = tile[top - i * th:bottom - i * th,
                                                                   left - j * tw:right - j * tw]
    return out


def real_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``logits`` without the vocabulary padding columns (``vocab_size`` None: unchanged)."""
    return logits if vocab_size is None or logits.shape[-1] == vocab_size else logits[..., :vocab_size]
