"""The encoder's objective on the data side: BERT's special tokens, and the masked windows the loader makes."""

from __future__ import annotations

from typing import Any

#: Special tokens appended after the shards' tokenizer vocabulary, in id order.
SPECIALS: dict[str, str] = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _tokenizer_special_ids(tokenizer_dir: Any) -> tuple[int, int, int] | None:
    """The ids of [CLS], [SEP] and [MASK] in the shards' tokenizer; None when it has none of them."""
    from tokenizers import Tokenizer

    from data_shards import DataError

    tokenizer = Tokenizer.from_str((tokenizer_dir / "tokenizer.json").read_text())
    ids = [tokenizer.token_to_id(token) for token in SPECIALS.values()]
    if all(i is None for i in ids):
        return None
    if any(i is None for i in ids):
        missing = [t for t, i in zip(SPECIALS.values(), ids) if i is None]
        raise DataError(f"the tokenizer in {tokenizer_dir} has some of BERT's special tokens but not {missing}: an"
                        " encoder needs all of [CLS], [SEP] and [MASK] or none (then they are appended)")
    return ids[0], ids[1], ids[2]


def data_objective(info: Any, model_vocab_size: int, seed: int) -> Any:
    """The loader's ``MaskedLM`` for the sources' ``SourcesInfo`` ``info``.

    A tokenizer that has [CLS], [SEP] and [MASK] (a BERT WordPiece one) keeps its ids; otherwise they
    follow its vocabulary (``SPECIALS``): a tokenizer trained by ``fm-train shard`` serves both
    families, and the export's tokenizer gets them at the same ids.
    """
    from data_shards import DataError, MaskedLM

    own = _tokenizer_special_ids(info.tokenizer_dir)
    if own is not None:
        cls_id, sep_id, mask_id = own
        return MaskedLM(cls_id=cls_id, sep_id=sep_id, mask_id=mask_id, vocab_size=int(info.vocab_size),
                        seed=seed, eos_id=int(info.eos_id) if int(info.eos_id) not in own else None)
    base = int(info.vocab_size)
    if model_vocab_size < base + len(SPECIALS):
        raise DataError(f"model.vocab_size={model_vocab_size} leaves no room for the encoder's [CLS], [SEP] and"
                        f" [MASK] after the {base} tokens of {info.tokenizer_dir}; set model.vocab_size to at"
                        f" least {base + len(SPECIALS)}")
    return MaskedLM(cls_id=base, sep_id=base + 1, mask_id=base + 2, vocab_size=base + len(SPECIALS),
                    seed=seed, eos_id=int(info.eos_id))
