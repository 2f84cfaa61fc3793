"""Held-out loss of a Hugging Face model on shard data (``fm-train eval HF_DIR --data SHARDS``).

The model is loaded by its family's ``transformers`` auto class (from ``config.json``'s
``model_type``) and run over the held-out tail of the shards, the same split training evaluates
on (``--val-fraction``, as ``data.val_fraction``), with the batches the family trains on: a decoder
reports next-token loss and perplexity, an encoder masked-token loss and accuracy over the positions
BERT's masking chose (decided by sample id and ``--seed``, as in training). A progress bar shows
the batches (``fm_train.cli.eval``); the result is one JSON line on stdout.

Token ids mean something only under the tokenizer that made them, so the model's tokenizer (its
``tokenizer.json``) must be the one the shards were built with (``index.json``'s ``tokenizer_hash``);
a model evaluated on another tokenizer's ids would report a loss that measures nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

# The parts of a tokenizer.json that decide what an id means. Conversion rewrites the others
# (save_pretrained renders the post_processor anew) and appends a family's special tokens after the
# shards' vocabulary, so the shards' whole-file hash cannot be compared with a converted tokenizer's.
_ID_FIELDS = ("model", "normalizer", "pre_tokenizer", "decoder")


def evaluate_hf(hf_dir: Path, data: str, *, val_fraction: float = 0.01, batches: int = 50, micro_batch: int = 8,
                seed: int = 1234, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """``{"family", "tokens", "loss", ...}``: the model's loss over the held-out batches of ``data``
    (``perplexity`` for a decoder, ``accuracy`` of the masked tokens for an encoder). ``progress(done,
    total)`` is called after each batch."""
    import torch
    import transformers

    import data_shards
    from fm_train.families import FAMILIES, family_of_hf

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    family = family_of_hf(config.get("model_type"))
    if family is None:
        raise ValueError(f"{hf_dir}/config.json: model_type {config.get('model_type')!r} is not one of fm-train's"
                         f" families ({', '.join(f.hf.model_type for f in FAMILIES.values())})")
    info = data_shards.check_sources([data], config["vocab_size"])
    checked = check_tokenizer(Path(hf_dir), data, info)
    objective = family.objective.data(info, config["vocab_size"], seed)
    stream = data_shards.make_val_loader([(data, 1.0)], seq_len=info.seq_len, micro_batch=micro_batch, dp_rank=0,
                                         dp_size=1, seed=seed, val_fraction=val_fraction, max_batches=batches,
                                         objective=objective)
    model = getattr(transformers, family.hf.auto_class).from_pretrained(
        str(hf_dir), local_files_only=True, dtype=torch.float32).eval()
    total_loss, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, batch in enumerate(stream, 1):
            logits = model(input_ids=batch["input_ids"]).logits.float()
            labels = batch["labels"]
            scored = labels != -100  # every position for a decoder, the masked ones for an encoder
            total_loss += float(torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum"))
            correct += int((logits[scored].argmax(-1) == labels[scored]).sum())
            tokens += int(scored.sum())
            if progress is not None:
                progress(i, len(stream))
    loss = total_loss / max(tokens, 1)
    result: dict[str, Any] = {"family": family.name, "model": str(hf_dir), "data": str(data), "batches": len(stream),
                              "tokens": tokens, "loss": loss, "tokenizer": checked}
    if objective is None:
        result["perplexity"] = math.exp(min(loss, 50.0))
    else:
        result["masked_accuracy"] = correct / max(tokens, 1)
    return result


def token_ids_hash(tokenizer_json: str, vocab_size: int) -> str:
    """sha256 of what a tokenizer's ids below ``vocab_size`` mean (:data:`_ID_FIELDS` and its added
    tokens below ``vocab_size``, canonical JSON): equal for a tokenizer and its converted copy."""
    obj = json.loads(tokenizer_json)
    core = {k: obj.get(k) for k in _ID_FIELDS}
    core["added_tokens"] = [t for t in obj.get("added_tokens") or [] if t.get("id", vocab_size) < vocab_size]
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def check_tokenizer(hf_dir: Path, data: str, info: Any) -> str:
    """ValueError unless ``hf_dir``'s tokenizer.json gives the ids of the shards ``data`` (``info``: their
    ``SourcesInfo``) the same meaning; returns what was checked, for the result line."""
    from data_shards.tokenizer import tokenizer_hash

    model_file, shards_file = hf_dir / "tokenizer.json", info.tokenizer_dir / "tokenizer.json"
    if not model_file.is_file():
        return f"not checked: {model_file} does not exist"
    try:
        model_text, shards_text = model_file.read_text(encoding="utf-8"), shards_file.read_text(encoding="utf-8")
        shards_hash = tokenizer_hash(shards_text)
        model_ids, shard_ids = token_ids_hash(model_text, info.vocab_size), token_ids_hash(shards_text, info.vocab_size)
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: JSON that is not a tokenizer object
        raise ValueError(f"cannot compare the tokenizers of {hf_dir} and {data}: {exc}") from exc
    if shards_hash != info.tokenizer_hash:
        raise ValueError(f"{shards_file} is not the tokenizer index.json names (tokenizer_hash "
                         f"{info.tokenizer_hash[:12]}, the file's {shards_hash[:12]}); rebuild {data} with "
                         "`fm-train shard ... --overwrite`")
    if model_ids != shard_ids:
        raise ValueError(f"{hf_dir} was trained with another tokenizer than the shards in {data}: {model_file} has "
                         f"token-id hash {model_ids[:12]}, the shards' tokenizer (index.json tokenizer_hash "
                         f"{info.tokenizer_hash[:12]}) has {shard_ids[:12]}; evaluate on shards built with "
                         f"`fm-train shard ... --tokenizer {hf_dir}`")
    return f"matches the shards' (index.json tokenizer_hash {info.tokenizer_hash[:12]})"
