"""What every pure model shares: its shape arguments' contract, the padded vocabulary, seeded init.

A family's shape arguments (``LlamaArgs``, ``BertArgs``) subclass :class:`ModelArgs`, so code that
handles any pure model (the sharded init of :mod:`fm_train.parallel.sharded_init`, the converter's
meta builds) asks the arguments for their module, their per-parameter seeded init and their
vocabulary-row and tied parameters, and never which family it has.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
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
    def init_parameter(self, name: str, param: torch.Tensor, seed: int) -> None:
        """Fill ``param`` (the pure model's ``name``, full shape) with its seeded initial value in place."""


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """The generator of parameter ``name``'s initial value: seeded by ``seed`` and the name only, so one
    parameter's value can be made alone (a rank materialising only its shard)."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def real_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``logits`` without the vocabulary padding columns (``vocab_size`` None: unchanged)."""
    return logits if vocab_size is None or logits.shape[-1] == vocab_size else logits[..., :vocab_size]
