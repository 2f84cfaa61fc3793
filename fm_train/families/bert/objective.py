"""The encoder's objective on the data side: BERT's special tokens, and the masked windows the loader makes."""

from __future__ import annotations

from typing import Any

#: Special tokens appended after the shards' tokenizer vocabulary, in id order. [PAD] never occurs in a
#: pretraining window (they are full) but gets its row, so that the export pads as every BERT does.
SPECIALS: dict[str, str] = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]"}


def _tokenizer_special_ids(tokenizer_dir: Any) -> tuple[int, int, int, int] | None:
    """The ids of [CLS], [SEP], [MASK] and [PAD] in the shards' tokenizer; None when it has none of them."""
    from tokenizers import Tokenizer

    from data_shards import DataError

    tokenizer = Tokenizer.from_str((tokenizer_dir / "tokenizer.json").read_text())
    ids = [tokenizer.token_to_id(token) for token in SPECIALS.values()]
    if all(i is None for i in ids):
        return None
    if any(i is None for i in ids):
        missing = [t for t, i in zip(SPECIALS.values(), ids) if i is None]
        raise DataError(f"the tokenizer in {tokenizer_dir} has some of BERT's special tokens but not {missing}: an"
                        " encoder needs all of [CLS], [SEP], [MASK] and [PAD] or none (then they are appended); add"
                        " the missing ones to the tokenizer and rebuild the shards with it (--tokenizer)")
    return ids[0], ids[1], ids[2], ids[3]


def data_objective(info: Any, model_vocab_size: int, seed: int) -> Any:
    """The loader's ``MaskedLM`` for the sources' ``SourcesInfo`` ``info``.

    A tokenizer that has [CLS], [SEP], [MASK] and [PAD] (a BERT WordPiece one) keeps its ids; otherwise they
    follow its vocabulary (``SPECIALS``): a tokenizer trained by ``fm-train shard`` serves both
    families, and the export's tokenizer gets them at the same ids.
    """
    from data_shards import DataError, MaskedLM

    own = _tokenizer_special_ids(info.tokenizer_dir)
    if own is not None:
        cls_id, sep_id, mask_id, pad_id = own
        return MaskedLM(cls_id=cls_id, sep_id=sep_id, mask_id=mask_id, pad_id=pad_id, vocab_size=int(info.vocab_size),
                        seed=seed, eos_id=int(info.eos_id) if int(info.eos_id) not in own else None)
    base = int(info.vocab_size)
    if model_vocab_size < base + len(SPECIALS) - 1:
        raise DataError(f"model.vocab_size={model_vocab_size} leaves no room for the encoder's [CLS], [SEP], [MASK]"
                        f" and [PAD] after the {base} tokens of {info.tokenizer_dir}; set model.vocab_size to at"
                        f" least {base + len(SPECIALS)}, or to auto")
    # Exactly base + 3 rows: an encoder from before [PAD] (resumed, or evaluated); it keeps training without one.
    pad_id = base + 3 if model_vocab_size >= base + len(SPECIALS) else None
    return MaskedLM(cls_id=base, sep_id=base + 1, mask_id=base + 2, pad_id=pad_id,
                    vocab_size=base + len(SPECIALS) - (pad_id is None), seed=seed, eos_id=int(info.eos_id))
