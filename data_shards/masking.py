"""BERT's masked-language-model inputs from packed token windows, decided by sample id and seed.

A shard sample is ``seq_len + 1`` tokens of packed documents (the decoder reads it shifted by one).
For an encoder the window becomes ``[CLS] t_0 ... t_{seq_len-3} [SEP]`` with every end-of-document
token inside it turned into ``[SEP]`` (the document boundary), then BERT's recipe (Devlin et al. 2019):
``round(rate * (seq_len - 2))`` of the positions that hold no special token are chosen, at least one;
of those, 80 % become ``[MASK]``, 10 % a random ordinary token, 10 % stay; the labels hold the
original token at the chosen positions and ``ignore_index`` everywhere else.

Every choice comes from a generator seeded by ``(seed, sample id)``, so each sample is masked the same
way whatever the dp size, micro batch, loader workers or resume point: every layout and every resume
trains on the same inputs. A fixed count per sample (rather than a coin per token) gives every
micro-batch the same number of predicted tokens, so the mean loss of the dp ranks is the mean over the
global batch, as for the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Label of a position the loss leaves out: ``torch.nn.functional.cross_entropy``'s default ``ignore_index``.
IGNORE_INDEX = -100

#: Share of a window's ordinary positions chosen for prediction (Devlin et al. 2019).
MASK_RATE = 0.15


def masked_per_sample(seq_len: int, rate: float = MASK_RATE) -> int:
    """Positions of a ``seq_len`` window chosen for prediction (labelled): ``round(rate * (seq_len - 2))``, at
    least one; fewer only when the window holds fewer ordinary tokens. The planner sizes the encoder's loss by it."""
    return max(1, round(rate * (seq_len - 2)))


@dataclass(frozen=True)
class MaskedLM:
    """The masked-language-model objective: token ids of its special tokens and its rates."""

    cls_id: int
    sep_id: int
    mask_id: int
    #: Replacement tokens are drawn from ``[0, vocab_size)`` leaving out the special ones.
    vocab_size: int
    seed: int
    #: The shards' end-of-document token (becomes ``[SEP]``); None: the windows hold none.
    eos_id: int | None = None
    rate: float = MASK_RATE
    #: ``[PAD]``: never in a (full) window, and never drawn as a replacement; None: the model has none.
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"masking rate {self.rate} is not in (0, 1)")
        if len({self.cls_id, self.sep_id, self.mask_id}) != 3:
            raise ValueError(f"[CLS], [SEP] and [MASK] need three different ids, got {self.cls_id}, {self.sep_id},"
                             f" {self.mask_id}")

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that are never chosen and never drawn as replacements."""
        return (self.cls_id, self.sep_id, self.mask_id) + tuple(i for i in (self.eos_id, self.pad_id) if i is not None)

    def apply(self, tokens: np.ndarray, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, both int64 ``[rows, seq_len]``, from shard samples ``tokens``
        (``[rows, seq_len + 1]``) whose ids in the global order are ``sample_ids``."""
        rows, width = tokens.shape
        seq_len = width - 1
        if seq_len < 3:
            raise ValueError(f"seq_len={seq_len}: an encoder window needs [CLS], a token and [SEP]")
        inputs = np.empty((rows, seq_len), dtype=np.int64)
        inputs[:, 0], inputs[:, -1] = self.cls_id, self.sep_id
        inputs[:, 1:-1] = tokens[:, : seq_len - 2]
        if self.eos_id is not None:
            inner = inputs[:, 1:-1]
            inner[inner == self.eos_id] = self.sep_id
        labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        count = masked_per_sample(seq_len, self.rate)
        special = np.asarray(self.special_ids)
        for row, sample in enumerate(sample_ids):
            gen = np.random.Generator(np.random.PCG64([self.seed, int(sample)]))
            eligible = np.flatnonzero(~np.isin(inputs[row], special))
            chosen = np.sort(gen.choice(eligible, size=min(count, len(eligible)), replace=False))
            labels[row, chosen] = inputs[row, chosen]
            kind = gen.random(len(chosen))
            masked, randomised = chosen[kind < 0.8], chosen[(kind >= 0.8) & (kind < 0.9)]
            inputs[row, masked] = self.mask_id
            inputs[row, randomised] = self._ordinary_tokens(gen, len(randomised))
        return inputs, labels

    def _ordinary_tokens(self, gen: np.random.Generator, n: int) -> np.ndarray:
        """``n`` uniform draws from the non-special ids (a redraw for the few that hit a special id)."""
        out = gen.integers(0, self.vocab_size, size=n)
        special = np.asarray(self.special_ids)
        while n and np.isin(out, special).any():
            redo = np.isin(out, special)
            out[redo] = gen.integers(0, self.vocab_size, size=int(redo.sum()))
        return out
