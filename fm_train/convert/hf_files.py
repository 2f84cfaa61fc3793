"""The non-weight files of a Hugging Face export: config.json, generation_config.json, tokenizer,
README.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from fm_train.convert.errors import ConvertError


def find_tokenizer(config: Mapping[str, Any], run_dir: Path) -> tuple[Path | None, list[Path]]:
    """``data.sources[0].path/tokenizer``: as written, else relative to the run dir's parent and run dir."""
    sources = config.get("data", {}).get("sources") or []
    if not sources:
        return None, []
    rel = Path(sources[0]["path"]) / "tokenizer"
    candidates = [rel] if rel.is_absolute() else [rel, run_dir.parent / rel, run_dir / rel]
    for c in candidates:
        if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file():
            return c, candidates
    return None, candidates


def _hash_of(directory: Path) -> str | None:
    """The tokenizer hash ``fm-train shard`` records for ``directory``: of ``tokenizer.json`` as the
    tokenizers library serializes it (a hub file in another spelling of the same tokenizer hashes alike);
    None without a loadable one."""
    from data_shards.tokenizer import tokenizer_file_hash

    path = directory / "tokenizer.json"
    try:
        return tokenizer_file_hash(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exceptions from Rust for any bad file
        return None


def matching_tokenizer(manifest: Mapping[str, Any], run_dir: Path | None, given: Path | None,
                       progress: Callable[[str], None]) -> tuple[Path, str]:
    """The tokenizer the checkpoint was trained with, and a line for the README saying how that is known:
    ``given`` (``--tokenizer``) or the first of :func:`find_tokenizer`'s candidates, accepted only when its
    hash equals the manifest's ``data.tokenizer_hash`` (a data directory rebuilt from other text must not
    ship its tokenizer)."""
    want = (manifest.get("data") or {}).get("tokenizer_hash")
    if given is not None:
        candidates = [Path(given)]
    else:
        found, candidates = find_tokenizer(manifest["config"], run_dir if run_dir is not None else Path.cwd())
        candidates = [c for c in candidates if (c / "tokenizer.json").is_file() or c == found]
    seen = []
    for candidate in candidates:
        have = _hash_of(candidate)
        if want is None or have == want:
            if want is None:
                line = (f"the manifest records no tokenizer hash (written by an older fm-train): {candidate} is "
                        "not checked against the shards the run trained on")
                progress(line)
                return candidate, f"Tokenizer: NOT checked ({line})."
            return candidate, (f"Tokenizer: its hash {want[:12]} equals the one the checkpoint's manifest records "
                               "for the shards the run trained on.")
        seen.append(f"{candidate} (hash {have[:12] if have else 'none: no tokenizer.json'})")
    if not seen:
        raise ConvertError("no tokenizer found (looked in " + ", ".join(str(p) for p in candidates)
                           + "); pass --tokenizer DIR, or --no-tokenizer to export weights without one")
    raise ConvertError(f"the checkpoint was trained with tokenizer hash {want[:12]} (manifest data.tokenizer_hash) "
                       f"but {', '.join(seen)} differ: its shards were rebuilt or another tokenizer was given; pass "
                       "--tokenizer DIR with the tokenizer the run trained on, or --no-tokenizer")


@dataclass(frozen=True)
class TokenizerIds:
    """What :func:`copy_tokenizer` wrote: special ids, the tokenizer's size and how it pads."""

    bos: int | None
    eos: int | None
    #: The padding token's id (an encoder's [PAD], a decoder's EOS); None: the export cannot pad.
    pad: int | None
    size: int
    #: How padding works with this export, for the README (one paragraph).
    padding: str


#: What a user does to fine-tune an encoder exported without a [PAD] row (trained before it had one).
ADD_PAD = ("tokenizer.add_special_tokens({'pad_token': '[PAD]'}); model.resize_token_embeddings(len(tokenizer))")


def copy_tokenizer(src: Path, out_dir: Path, specials: Mapping[str, str] | None = None, *, rows: int | None = None,
                   pad_with_eos: bool = False) -> TokenizerIds:
    """Copy the tokenizer files via AutoTokenizer (which proves they load), padding on the right.

    ``specials`` (the family's ``tokenizer_specials``: ``{"mask_token": "[MASK]", ...}``) are appended
    in order, so they get the ids training gave them: right after the shards' vocabulary. ``rows``: the
    model's ``vocab_size``; a model trained before its family's ``pad_token`` existed (an encoder without
    a [PAD] row) gets the others only, and the README says how to add one. ``pad_with_eos`` (decoders):
    a tokenizer without a padding token pads with its EOS token.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure means an unusable tokenizer dir
        raise ConvertError(f"tokenizer at {src} does not load with AutoTokenizer: {exc}") from None
    padding = ""
    if specials:
        base, vocab = len(tok), tok.get_vocab()
        held = [token in vocab for token in specials.values()]
        if any(held) and not all(held):
            raise ConvertError(f"tokenizer at {src} holds some of {list(specials.values())} but not all; training used"
                               " either all of its own or none (appended)")
        if not any(held) and "pad_token" in specials and rows is not None and base + len(specials) == rows + 1:
            specials = {k: v for k, v in specials.items() if k != "pad_token"}  # no row for it: not exported
            padding = ("Padding: none. This model was trained without a row for [PAD] (by an"
                       " fm-train older than the encoder's [PAD]), so its tokenizer has no padding token. To"
                       f" fine-tune on padded batches add one and a row for it first: `{ADD_PAD}`.")
        tok.add_special_tokens(dict(specials))  # held ones keep their ids (as in training), new ones follow
        got = [tok.convert_tokens_to_ids(token) for token in specials.values()]
        if not all(held) and got != list(range(base, base + len(specials))):
            raise ConvertError(f"tokenizer at {src}: {list(specials.values())} got ids {got}; the model was trained"
                               f" with them at {base}-{base + len(specials) - 1}")
    if tok.pad_token is None and pad_with_eos and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        padding = (f"Padding: with the EOS token {tok.eos_token!r} (id {tok.eos_token_id}), on the right: the"
                   " attention mask leaves padded positions out; give them label -100 when training (as"
                   " DataCollatorForLanguageModeling does). config.json leaves pad_token_id unset, so the"
                   " embedding row of EOS keeps training; a sequence-classification head needs"
                   " `model.config.pad_token_id = tokenizer.pad_token_id`.")
    elif tok.pad_token is not None and not padding:
        padding = (f"Padding: with {tok.pad_token!r} (id {tok.pad_token_id}), on the right; the attention mask"
                   " leaves padded positions out.")
    tok.padding_side = tok.init_kwargs["padding_side"] = "right"  # init_kwargs: written to tokenizer_config.json
    tok.save_pretrained(str(out_dir))
    return TokenizerIds(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id, size=len(tok),
                        padding=padding)


def write_generation_config(out_dir: Path, bos: int | None, eos: int | None, pad: int | None = None) -> None:
    """generation_config.json with the tokenizer's special ids (sampling defaults left to the user)."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(str(out_dir))


def write_readme(out_dir: Path, manifest: Mapping[str, Any], *, architecture: str, dtype: str, source: str,
                 note: str, verified: str, tokenizer: str = "Tokenizer: none exported (--no-tokenizer).") -> None:
    """README.md: what was trained (an ``architecture`` model), how far, from which checkpoint, and how the
    export was checked."""
    cfg = manifest["config"]
    m = cfg["model"]
    arch = architecture
    lines = [
        f"# {cfg.get('run', {}).get('name', 'fm-train model')}",
        "",
        f"A {arch} pretrained from scratch with fm-train and exported from `{source}`.",
        "",
        "| fact | value |", "|---|---|",
        f"| steps | {manifest['step']} |",
        f"| tokens seen | {manifest['tokens_seen']:,} |",
        f"| layers / hidden / heads / kv heads | {m['n_layers']} / {m['hidden']} / {m['n_heads']} / {m['n_kv_heads']} |",
        f"| ffn hidden / vocab / max seq len | {m['ffn_hidden']} / {m['vocab_size']} / {m['max_seq_len']} |",
        f"| training precision / export dtype | {cfg.get('precision')} / {dtype} |",
        f"| layout at save | {json.dumps(manifest['topology'])} |",
        f"| packages at save | {json.dumps(manifest['versions'])} |",
        "",
        f"Weights: {note}." if note else "",
        f"Verification: {verified}",
        "",
        tokenizer,
        "",
        "## Training config", "", "```json", json.dumps(cfg, indent=2), "```", "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))

