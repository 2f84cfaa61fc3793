"""``model.vocab_size: auto``: the model's vocabulary taken from its data, resolved once per entry point.

auto is the first source's tokenizer (``index.json`` ``vocab_size``: one more than its largest id) plus
the family's special tokens that tokenizer lacks (an encoder's [CLS], [SEP], [MASK], [PAD]), which
training appends right after it; ``model.vocab_multiple`` then pads the rows as for any number. The
worker resolves it before the model is built, ``fm-train plan`` and ``launch --dry-run`` when the
shards are readable (or will be the default corpus). What it resolves to is what
``config.resolved.yaml`` and every checkpoint manifest record, so resume and convert read a number and
never resolve again. Torch-free; ``data_shards`` and ``tokenizers`` are imported when needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fm_train.config import ConfigError, FmConfig, build_config
from fm_train.families.spec import FamilySpec

AUTO = "auto"


class DataUnreadable(ConfigError):
    """``auto`` needs the sources' ``index.json``, which cannot be read from this machine."""


def corpus_vocab(cfg: FmConfig, family: FamilySpec) -> int:
    """The tokenizer vocabulary a missing ``default_corpus`` source is built with: for ``auto``,
    ``data_shards.DEFAULT_CORPUS_VOCAB``; for a number, that number less the family's special tokens
    (which come after the tokenizer's)."""
    if cfg.model.vocab_size == AUTO:
        from data_shards.corpus import DEFAULT_CORPUS_VOCAB

        return DEFAULT_CORPUS_VOCAB
    return int(cfg.model.vocab_size) - len(family.objective.tokenizer_specials)


def missing_specials(family: FamilySpec, tokenizer_dir: Any) -> list[str]:
    """The family's special tokens the tokenizer in ``tokenizer_dir`` lacks (training appends them)."""
    specials = list(family.objective.tokenizer_specials.values())
    if not specials:
        return []
    from tokenizers import Tokenizer

    from data_shards import DataError

    path = tokenizer_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_str(path.read_text())
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions from Rust for any bad file
        raise DataError(f"{path} does not load as a tokenizer ({str(exc)[:200]}); rebuild its shard directory with"
                        " `fm-train shard ... --overwrite`") from None
    return [token for token in specials if tokenizer.token_to_id(token) is None]


def vocab_of(info: Any, family: FamilySpec) -> int:
    """``auto``'s number for sources whose ``data_shards.SourcesInfo`` is ``info``."""
    return int(info.vocab_size) + len(missing_specials(family, info.tokenizer_dir))


def with_vocab(cfg: FmConfig, vocab: int) -> FmConfig:
    """``cfg`` with ``model.vocab_size`` set to ``vocab``, every config rule checked again on the number
    (``parallel.tp`` must divide the padded rows); ``ConfigError`` otherwise."""
    raw = cfg.model_dump(mode="json")
    raw["model"]["vocab_size"] = vocab
    try:
        return build_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"model.vocab_size: auto resolved to {vocab}, and then: {exc}") from None


def resolve_vocab(cfg: FmConfig, family: FamilySpec, info: Any) -> FmConfig:
    """``cfg`` with ``model.vocab_size: auto`` replaced by the number for the checked sources ``info``
    (``data_shards.SourcesInfo``); a config with a number is returned as it is."""
    if cfg.model.vocab_size != AUTO:
        return cfg
    return with_vocab(cfg, vocab_of(info, family))


def plan_vocab(cfg: FmConfig, family: FamilySpec) -> tuple[FmConfig, str | None]:
    """``(cfg with a number, a line saying where auto's number comes from)`` for ``plan`` and ``--dry-run``
    (the line is None for a number). A first source that is a ``default_corpus`` not built yet counts as
    the tokenizer it will be built with; otherwise the sources' ``index.json`` files are read, and one that
    cannot be is a :class:`DataUnreadable` (a ``ConfigError``) naming it and the fix."""
    if cfg.model.vocab_size != AUTO:
        return cfg, None
    import data_shards
    from data_shards.corpus import DEFAULT_CORPUS_VOCAB
    from data_shards.storage import as_location

    specials = list(family.objective.tokenizer_specials.values())
    first = cfg.data.sources[0]
    plus = f" plus {len(specials)} {family.name} special tokens ({', '.join(specials)})" if specials else ""
    if first.default_corpus and uri_free(first.path) and not (Path(first.path) / "index.json").is_file():
        vocab = DEFAULT_CORPUS_VOCAB + len(specials)
        return with_vocab(cfg, vocab), (f"model.vocab_size: auto = {vocab}: the default corpus {first.path} is built at"
                                        f" launch with a {DEFAULT_CORPUS_VOCAB}-token tokenizer{plus}")
    try:
        info = data_shards.check_sources([s.path for s in cfg.data.sources])
        vocab = vocab_of(info, family)
    except data_shards.DataError as exc:
        raise DataUnreadable(f"model.vocab_size: auto reads the vocabulary from the data sources' index.json: {exc}"
                             " (or set model.vocab_size to a number)") from None
    held = len(specials) - (vocab - int(info.vocab_size))
    kept = f" (its own {', '.join(specials)} kept)" if specials and held == len(specials) else ""
    where = as_location(first.path, what="data source")
    return with_vocab(cfg, vocab), (f"model.vocab_size: auto = {vocab}: the tokenizer of {where} ({info.vocab_size}"
                                    f" tokens, index.json){plus if vocab > info.vocab_size else ''}{kept}")


def uri_free(path: str) -> bool:
    """Whether ``path`` is a plain local path (not ``s3://...``)."""
    return "://" not in path
