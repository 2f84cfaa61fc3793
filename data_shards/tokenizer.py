"""Tokenizers for shard building: train a byte-level BPE, or load an existing Hugging Face tokenizer dir.

Either way the result is saved as a ``PreTrainedTokenizerFast`` directory (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) that ``transformers.AutoTokenizer.from_pretrained``
loads offline. The config files are written by hand so that building shards never imports transformers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"  # GPT-2's convention: one special token that ends (and may begin) documents
# Files of a Hugging Face tokenizer directory worth shipping; never weights, which may sit beside them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")


@dataclass
class TokenizerInfo:
    """A loaded tokenizer and the facts the index records about it."""

    tokenizer: Tokenizer
    eos_token: str
    eos_id: int
    vocab_size: int  # one more than the largest id: the embedding rows a model needs
    bos_token: str

    def to_str(self) -> str:
        """Serialized tokenizer.json, for sending to worker processes."""
        return self.tokenizer.to_str()


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TokenizerInfo:
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenization) with ``<|endoftext|>`` as id 0."""
    if vocab_size < 256 + 1:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 257 "
                        "(256 bytes + <|endoftext|>)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _info(tok, EOS_TOKEN, EOS_TOKEN)


def load_tokenizer_dir(directory: str | Path, eos_token: str | None = None) -> TokenizerInfo:
    """Load ``directory/tokenizer.json`` and find its end-of-sequence token (config or ``eos_token``)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"--tokenizer {directory} has no tokenizer.json (a fast tokenizer is needed); convert it "
                        f"with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses from Rust
        raise DataError(f"{path} cannot be loaded by tokenizers: {exc}") from exc
    config = _read_json(directory / "tokenizer_config.json") | _read_json(directory / "special_tokens_map.json")
    eos = eos_token or _token_text(config.get("eos_token"))
    if not eos:
        raise DataError(f"--tokenizer {directory} names no eos_token in tokenizer_config.json; pass --eos-token")
    bos = _token_text(config.get("bos_token")) or eos
    return _info(tok, eos, bos)


def save_tokenizer_dir(info: TokenizerInfo, directory: Path, *, source_dir: Path | None = None,
                       model_max_length: int | None = None) -> None:
    """Write a PreTrainedTokenizerFast directory; copy a loaded tokenizer's own config files unchanged."""
    directory.mkdir(parents=True, exist_ok=True)
    if source_dir is not None:
        for name in _TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, directory / name)
        if (directory / "tokenizer_config.json").is_file():
            return
    else:
        info.tokenizer.save(str(directory / "tokenizer.json"))
    special = {"eos_token": info.eos_token, "bos_token": info.bos_token}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = model_max_length
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")


def tokenizer_hash(tokenizer_json: str) -> str:
    """sha256 of the canonical (sorted-key) tokenizer.json: equal for equal tokenizers, however formatted."""
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_file_hash(path: str | Path) -> str:
    """:func:`tokenizer_hash` of the tokenizer in ``path`` (a ``tokenizer.json``) as the tokenizers library
    serializes it: what ``fm-train shard`` records, whichever spelling the file uses (hub files often
    write merges in an older form)."""
    return tokenizer_hash(Tokenizer.from_file(str(path)).to_str())


def sample_texts(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The first documents of ``texts`` up to about ``max_bytes`` of UTF-8: enough to train a BPE on."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= max_bytes:
            return


def _info(tok: Tokenizer, eos: str, bos: str) -> TokenizerInfo:
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise DataError(f"eos token {eos!r} is not in the tokenizer's vocabulary; pass an --eos-token it has")
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    return TokenizerInfo(tokenizer=tok, eos_token=eos, eos_id=eos_id, vocab_size=vocab_size, bos_token=bos)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


def _token_text(value: object) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
