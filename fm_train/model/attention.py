"""Attention's inner product, the one seam sequence parallelism wraps, and what document masking needs.

Every family's attention projects q, k and v, applies its position encoding, and calls a
:class:`CoreAttention`: softmax(q k^T) v over the tokens a token may see. The module has no parameters,
so it never appears in a state dict; Ulysses sequence parallelism replaces it from outside
(:mod:`fm_train.parallel.sequence_parallel`) with one that exchanges sequence for heads around it.

Document masking: ``document_ids`` ``[batch, seq]`` gives each token of a packed sample its document
(a document ends at its EOS token), and a token attends only to tokens of its own document. On CPU the
mask goes to ``scaled_dot_product_attention`` as an additive ``seq x seq`` matrix; on a GPU FlexAttention runs it as a
block mask, skipping the blocks that are masked whole (compiled once per process). Positions are not
restarted per document: RoPE scores depend only on the distance between query and key, which is the
same either way once attention stays within a document.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def rope_slice(cos: torch.Tensor, sin: torch.Tensor, seq: int,
               position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of RoPE tables ``[max_seq, head_dim]`` for a forward: the first ``seq`` positions
    (``[seq, head_dim]``), or those of ``position_ids`` ``[batch, seq]`` (``[batch, seq, head_dim]``)."""
    if position_ids is None:
        return cos[:seq], sin[:seq]
    return cos[position_ids], sin[position_ids]


def document_mask(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean ``[batch, 1, seq, seq]``: query i may attend to key j (same document, and j <= i if causal)."""
    mask = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        seq = document_ids.shape[-1]
        mask &= torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return mask[:, None]


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with the family's mask: causal (decoders) or full (encoders), and with
    ``document_ids`` only within a document.

    ``forward(q, k, v, document_ids)``: q ``[batch, seq, heads, head_dim]``, k and v ``[batch, seq,
    kv_heads, head_dim]`` (grouped-query: each kv head serves ``heads / kv_heads`` consecutive query heads),
    ``document_ids`` ``[batch, seq]`` or None; returns ``[batch, seq, heads, head_dim]``. Head counts are
    read from the tensors, so tensor and sequence parallelism, which hand it a subset of the heads, need
    no change here.
    """

    def __init__(self, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if document_ids is not None and q.is_cuda:
            return flex_document_attention(q, k, v, document_ids, self.causal).transpose(1, 2)
        # Grouped-query heads through SDPA itself (no repeated k/v copies kept for backward).
        gqa = q.shape[1] != k.shape[1]
        if document_ids is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)
        else:
            mask = _MASKS.get(document_ids, (self.causal, q.dtype), lambda: additive_mask(document_ids, self.causal,
                                                                                          q.dtype))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)


def additive_mask(document_ids: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """:func:`document_mask` as 0 (attend) or -inf (not), ``[batch, 1, seq, seq]`` in ``dtype``: SDPA turns a
    boolean mask into this on every call, and keeps each copy for backward."""
    allowed = document_mask(document_ids, causal)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class _LastMask:
    """The mask made for the last ``document_ids`` seen (an additive matrix on CPU, a block mask on a GPU).

    Every block of a forward (and its recomputation under activation checkpointing) gets the same
    tensor, so the mask is made once per forward, not once per block. The entry is dropped when its
    ``document_ids`` tensor is freed (the batch is done), so a mask never outlives its batch nor meets
    the next one's.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.mask: Any = None

    def get(self, document_ids: torch.Tensor, kind: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        key = (id(document_ids), document_ids._version, *kind)
        if self.key != key or self.mask is None:
            self.key, self.mask = None, None  # the previous batch's mask goes before the new one is made
            self.mask, self.key = make(), key
            weakref.finalize(document_ids, self._forget, key[0])
        return self.mask

    def _forget(self, ident: int) -> None:
        if self.key is not None and self.key[0] == ident:
            self.key, self.mask = None, None


_MASKS = _LastMask()


def document_block_mask(document_ids: torch.Tensor, causal: bool, *, compiled: bool) -> Any:
    """FlexAttention's ``BlockMask`` of :func:`document_mask` (``compiled``: built by a compiled kernel
    without materialising ``seq x seq``, as a GPU needs at long sequences)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq = document_ids.shape
    ids = document_ids.clone()  # the mask keeps its own copy, so the batch's tensor can go (and the cache entry)

    def same_document(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = ids[b, q_idx] == ids[b, kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    return create_block_mask(same_document, batch, None, seq, seq, device=document_ids.device, _compile=compiled)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor,
                            causal: bool, *, compiled: bool = True) -> torch.Tensor:
    """Document-masked attention through FlexAttention (q, k, v ``[batch, heads, seq, head_dim]``): blocks
    where no query sees a key are skipped; the block mask is made once per forward. ``compiled=False``
    runs FlexAttention's unfused reference (any device; what the CPU tests check the mask with)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _MASKS.get(document_ids, ("block", causal, compiled),
                            lambda: document_block_mask(document_ids, causal, compiled=compiled))
    attend: Callable[..., torch.Tensor] = _compiled_flex() if compiled else flex_attention
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """FlexAttention compiled once per process (its fused kernel; uncompiled it materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
