"""A pure BERT encoder with its masked-language-model head: learned absolute positions, token-type
embeddings, post-LayerNorm blocks, GELU MLP, bidirectional attention, the MLM decoder tied to the
word embeddings.

No distributed code lives here; parallelism is applied from outside. Module names map one to one
onto ``transformers``' ``BertForMaskedLM`` state-dict keys (``bert.encoder.layer.0.attention.self.query.weight``
...), so conversion is a rename-free copy.

Given labels, the head runs on the masked positions only (about 15 % of them): the prediction transform
and the decoder, fused with the cross-entropy (:class:`~fm_train.model.loss.LMHead`), see only the rows
that carry a label, and the full ``tokens x vocab`` logits never exist.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fm_train.families.bert import TIED_PARAMS, VOCAB_ROW_PARAMS
from fm_train.model.base import Init, ModelArgs, real_logits
from fm_train.model.loss import IGNORE_INDEX, LMHead


@dataclass(frozen=True)
class BertArgs(ModelArgs):
    """Shape of the encoder; built from ``fm_train.config.ModelConfig`` by :func:`bert_args_from_config`."""

    n_layers: int
    hidden: int
    n_heads: int
    ffn_hidden: int
    vocab_size: int  # the tokenizer's: ids and predictions lie in [0, vocab_size)
    max_seq_len: int  # learned position embeddings: the longest sequence the model reads
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    init_std: float = 0.02
    vocab_multiple: int = 1

    VOCAB_ROW_PARAMS: ClassVar[tuple[str, ...]] = VOCAB_ROW_PARAMS
    TIED_PARAMS: ClassVar[Mapping[str, str]] = TIED_PARAMS

    def build(self) -> BertForMaskedLM:
        return BertForMaskedLM(self)

    def init_of(self, name: str) -> Init:
        """BERT's recipe: LayerNorms ones (weights) and zeros (biases), zero biases, normal(0, ``init_std``)
        for matrices and embeddings."""
        if "LayerNorm" in name and name.endswith(".weight"):
            return Init(fill=1.0)
        if name.endswith(".bias"):
            return Init()
        return Init(std=self.init_std)


def bert_args_from_config(model_cfg: Any) -> BertArgs:
    """Encoder arguments from the ``model`` section of a run config (a ``fm_train.config.ModelConfig``)."""
    return BertArgs(**{f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(BertArgs)})


class BertEmbeddings(nn.Module):
    """Word + learned position + token-type embeddings, then LayerNorm."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(args.padded_vocab_size, args.hidden)
        self.position_embeddings = nn.Embedding(args.max_seq_len, args.hidden)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden)
        self.LayerNorm = nn.LayerNorm(args.hidden, eps=args.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention (SDPA, no mask: every position sees every other)."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.query = nn.Linear(args.hidden, args.hidden)
        self.key = nn.Linear(args.hidden, args.hidden)
        self.value = nn.Linear(args.hidden, args.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds n_heads / tp of them.
        q, k, v = (proj(x).view(b, s, -1, self.head_dim).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, s, -1)


class BertSelfOutput(nn.Module):
    """Attention output projection, residual, LayerNorm (post-LN)."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(args.hidden, args.hidden)
        self.LayerNorm = nn.LayerNorm(args.hidden, eps=args.norm_eps)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(attended) + residual)


class BertAttention(nn.Module):
    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.self = BertSelfAttention(args)
        self.output = BertSelfOutput(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    """The MLP's up projection and GELU (erf form, ``transformers``' ``"gelu"``)."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(args.hidden, args.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    """The MLP's down projection, residual, LayerNorm (post-LN)."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(args.ffn_hidden, args.hidden)
        self.LayerNorm = nn.LayerNorm(args.hidden, eps=args.norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    """One post-LN encoder block: attention, then the GELU MLP."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.attention = BertAttention(args)
        self.intermediate = BertIntermediate(args)
        self.output = BertOutput(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(args) for _ in range(args.n_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            h = block(h)
        return h


class BertModel(nn.Module):
    """Embeddings and encoder (no pooler: ``BertForMaskedLM`` has none)."""

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(args)
        self.encoder = BertEncoder(args)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, token_type_ids))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(args.hidden, args.hidden)
        self.LayerNorm = nn.LayerNorm(args.hidden, eps=args.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """Transform, then the decoder (tied to the word embeddings) plus its own bias.

    The decoder is an :class:`~fm_train.model.loss.LMHead` (an ``nn.Linear``: the same key; the tp plan
    makes it a :class:`~fm_train.parallel.tensor_parallel.VocabParallelHead`) given this module's bias, so
    ``cls.predictions.bias`` stays where ``transformers`` keeps it and the logits are one addmm with it.
    """

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(args)
        self.decoder = LMHead(args.hidden, args.padded_vocab_size, real_vocab=args.vocab_size)
        self.bias = nn.Parameter(torch.zeros(args.padded_vocab_size))

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``h`` ``[..., hidden]``; with ``labels`` (``h``'s token shape), each token's fp32 loss,
        0 where the label is :data:`IGNORE_INDEX`.

        The labelled rows are picked first and only they go through the transform and the decoder fused
        with the cross-entropy: the head costs the ~15 % of the tokens the loss counts, not all of them.
        The transform (dense, GELU, LayerNorm) acts on each row alone, so the values are those over all rows.
        """
        if labels is None:
            return self.decoder(self.transform(h), bias=self.bias)
        flat = labels.reshape(-1)
        keep = flat != IGNORE_INDEX
        rows = h.reshape(-1, h.shape[-1])[keep]
        picked = self.decoder(self.transform(rows), flat[keep], bias=self.bias)
        losses = torch.zeros(flat.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)
        return losses.view(labels.shape)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(args)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.predictions(h, labels)


class BertForMaskedLM(nn.Module):
    """Encoder plus MLM head; ``forward(input_ids) -> logits`` over ``args.padded_vocab_size`` columns
    (those from ``args.vocab_size`` on belong to no token; :func:`masked_lm_loss` leaves them out).

    ``forward(input_ids, labels=labels)`` returns each token's fp32 loss instead (0 where nothing was
    masked; :func:`~fm_train.model.loss.token_mean` makes it :func:`masked_lm_loss`'s value): the head
    runs on the masked positions only, fused with the cross-entropy (:class:`BertLMPredictionHead`).
    """

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.args = args
        self.bert = BertModel(args)
        self.cls = BertOnlyMLMHead(args)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.cls(self.bert(input_ids, token_type_ids), labels)

    def tie_weights(self) -> None:
        """Tie the decoder to the word embeddings again (after ``to_empty``, which gives each its own storage)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded init, identical in every layout: normal(0, std) for matrices and embeddings, ones and
        zeros for LayerNorms, zero biases (BERT's recipe). Each parameter draws from generators seeded by
        ``seed``, its name and the tile (:meth:`~fm_train.model.base.ModelArgs.init_parameter`); the
        vocabulary padding rows are zero."""
        for name, param in self.named_parameters():
            if param.device.type == "meta":
                raise RuntimeError(f"init_weights: {name} is on the meta device; call to_empty() first")
            self.args.init_parameter(name, param, seed)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (``labels`` is the original token there and
    :data:`IGNORE_INDEX` elsewhere); with ``vocab_size`` the padding columns are left out. NaN when no
    position is masked (0 / 0, as ``F.cross_entropy``; the fused head's ``token_mean`` gives the same).

    The loss over logits: training takes the fused head's (``forward(..., labels=)``, the same value);
    this one serves a pipeline's probe, which wants the logits, and the tests."""
    logits = real_logits(logits, vocab_size)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
