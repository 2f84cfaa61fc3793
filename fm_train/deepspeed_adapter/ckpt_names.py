"""DeepSpeed parameter names -> fm_train names, from a step's manifest.

DeepSpeed names are the pure model's names under the engine's wrapper (``model.`` + fm name), or,
for a pipeline (pp > 1), ``{layer index}.{param}`` and ``tied_modules.{key}.{param}``; the manifest's
layer table (``layers``, ``tied``, ``param_prefix``) says which module each index is and along which
dim tensor-parallel shards were split. Used by the checkpoint reader (resharding, conversion).
"""

from __future__ import annotations

from typing import Any, Mapping

from fm_train.storage.errors import CheckpointError


def ds_to_fm(name: str, manifest: Mapping[str, Any]) -> str:
    """fm_train name of a DeepSpeed parameter name, using the manifest's prefix and layer table."""
    if manifest["topology"]["pp"] > 1:
        head, _, rest = name.partition(".")
        if head == "tied_modules":
            key, _, rest = rest.partition(".")
            tied = manifest.get("tied", {})
            if key not in tied:
                raise CheckpointError(f"pipeline tied module {key!r} (param {name!r}) is not in the manifest's tied table")
            return f"{tied[key]}.{rest}"
        if not head.isdigit():
            raise CheckpointError(f"pipeline parameter {name!r} does not start with a layer index")
        layers = {int(e["index"]): e["module"] for e in manifest["layers"]}
        if int(head) not in layers:
            raise CheckpointError(f"pipeline layer {head} (param {name!r}) is not in the manifest's layer table")
        return f"{layers[int(head)]}.{rest}"
    prefix = manifest.get("param_prefix", "model.")
    if not name.startswith(prefix):
        raise CheckpointError(f"DeepSpeed parameter {name!r} lacks the wrapper prefix {prefix!r} the manifest names")
    return name[len(prefix):]


def tp_split_dim(fm_name: str, manifest: Mapping[str, Any]) -> int | None:
    """The dim along which tp shards of ``fm_name`` are concatenated (None: replicated). A parameter
    belongs to the layer with the longest module prefix (BERT's ``bert.embeddings.word_embeddings`` is
    a layer of its own inside ``bert.embeddings``)."""
    owners = [e for e in manifest["layers"] if fm_name.startswith(e["module"] + ".")]
    if not owners:
        return None
    entry = max(owners, key=lambda e: len(e["module"]))
    return entry.get("tp_split_dims", {}).get(fm_name[len(entry["module"]) + 1:])
