"""The pure model of a set of shape arguments: its class, its per-parameter seeded init, its
vocabulary-sized parameters and its tied ones. What code that handles any pure model needs (the
sharded init of :mod:`fm_train.parallel.sharded_init`, the converter's meta builds) without knowing
which model it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fm_train.model import bert, llama


@dataclass(frozen=True)
class PureModel:
    """One pure model class and what is known about its parameters by name."""

    cls: type[nn.Module]
    #: ``init_parameter(args, name, tensor, seed)``: fill a full-shape tensor with its seeded initial value.
    init_parameter: Callable[[Any, str, torch.Tensor, int], None]
    #: Name suffixes of parameters with one row per (padded) vocabulary entry.
    vocab_row_params: tuple[str, ...]
    #: Tied parameter -> the parameter it shares (Llama only when ``tie_embeddings``).
    tied: dict[str, str]


_BY_ARGS: dict[type, PureModel] = {
    llama.LlamaArgs: PureModel(llama.LlamaForCausalLM, llama.init_llama_parameter, llama.VOCAB_ROW_PARAMS,
                               llama.TIED_PARAMS),
    bert.BertArgs: PureModel(bert.BertForMaskedLM, bert.init_bert_parameter, bert.VOCAB_ROW_PARAMS, bert.TIED_PARAMS),
}


def pure_model(args: Any) -> PureModel:
    """The pure model that ``args`` (``LlamaArgs``, ``BertArgs``) describe."""
    try:
        return _BY_ARGS[type(args)]
    except KeyError:
        raise TypeError(f"no pure model takes {type(args).__name__} (known: {[t.__name__ for t in _BY_ARGS]})") from None


def tied_source(args: Any, name: str) -> str:
    """The parameter ``name`` shares its tensor with, or ``name`` itself when it is not tied."""
    tied = pure_model(args).tied.get(name)
    return tied if tied is not None and getattr(args, "tie_embeddings", True) else name
