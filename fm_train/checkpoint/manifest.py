"""``manifest.json``: what a checkpoint is, written last as its commit marker.

Schema (version 1)::

    format: "fm-train-checkpoint", version: 1
    step: int, tag: "step_XXXXXXXX", created_unix: float
    config: the resolved FmConfig as a dict (FmConfig.model_dump(mode="json"))
    topology: {world, dp, tp, pp, ep, zero_stage, precision}
    param_prefix: "model."        # wrapper prefix of DeepSpeed's names for a non-pipeline module
    layers: [{index, module, tp_split_dims: {param: dim | null}}]
                                  # pipeline layer index -> pure-model module name ("model.layers.3")
                                  # and, per parameter of that module, the dim tp shards split (null:
                                  # replicated); the converter merges tp shards and renames pipeline
                                  # names with it
    tied: {pipeline tied key: module name}   # DeepSpeed TiedLayerSpec keys (pp > 1), else {}
    experts: {ep, params: [name, ...], ranks: [[global expert, ...] per ep rank]}
                                  # only with expert parallelism (ep > 1): the stacked expert
                                  # parameters, whose row i on ep rank r is expert ranks[r][i]
    data: {state: <data stream state>, tokenizer_hash: str | null}
    tokens_seen: int
    rng: {scheme: "per-rank", files: ["rng/rank_00000.pt", ...]}
    files: {relative path: size in bytes}    # DeepSpeed's files as written; a missing one is named
    checksums: {algorithm: "sha256", files: {relative path: hex digest}}
                                  # every file of the step dir (rng/ too), hashed by the rank that
                                  # wrote it; checked by resume and convert (fm_train.checkpoint.integrity).
                                  # Absent in manifests written before checksums: sizes only then
    writers: [[relative path, ...] per rank]
                                  # which rank wrote each file (rank 0 also lists the files no rank
                                  # wrote itself): a node without a shared run.dir fetches only the
                                  # files its ranks read (fm_train.checkpoint.node_files). Absent in
                                  # older manifests: a fetch then takes every file
    probe: {file, input_shape, positions, precision}
                                  # the live engine's logits on a fixed batch at save time
                                  # (fm_train.checkpoint.probe); the converter checks its export
                                  # against them. Absent in older checkpoints
    versions: {python, torch, deepspeed, transformers, fm_train}
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from data_shards.safe_paths import UnsafePathError, relative_name
from fm_train.checkpoint.layout import MANIFEST, CheckpointError, atomic_write_text
from fm_train.checkpoint.node_files import read_held
from fm_train.config import FmConfig
from fm_train.dist import Topology

FORMAT = "fm-train-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "step", "tag", "config", "topology", "layers", "data", "tokens_seen", "files",
            "versions")


def dense_layers(n_layers: int, tp_split_dims: Mapping[str, int | None] | None = None) -> list[dict]:
    """The layer table of the Llama model in pipeline order: embedding, blocks, final norm, head.

    ``tp_split_dims`` maps pure-model parameter names (``model.layers.0.self_attn.q_proj.weight``) to
    their tp split dim or None, as ``fm_train.families.spec.split_dims(family, args)`` returns
    them; each layer records its own parameters by local name. Omitted: no split (right for tp = 1).
    """
    modules = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(n_layers)), "model.norm", "lm_head"]
    dims = tp_split_dims or {}
    table = []
    for i, m in enumerate(modules):
        local = {n[len(m) + 1:]: d for n, d in dims.items() if n.startswith(m + ".")}
        table.append({"index": i, "module": m, "tp_split_dims": local})
    return table


def package_versions() -> dict[str, str]:
    """Versions of the packages that wrote a checkpoint (for a reader's error messages)."""
    out = {"python": platform.python_version()}
    for dist_name, key in (("torch", "torch"), ("deepspeed", "deepspeed"), ("transformers", "transformers"),
                           ("fm-train", "fm_train")):
        try:
            out[key] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[key] = "unknown"
    return out


def build_manifest(config: FmConfig, topology: Topology, *, data_state: Any, tokens_seen: int,
                   tokenizer_hash: str | None = None, layers: list[dict] | None = None,
                   tied: Mapping[str, str] | None = None, param_prefix: str = "model.",
                   experts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The caller's part of a manifest; :func:`fm_train.checkpoint.save_checkpoint` adds step, files,
    RNG and versions. ``layers`` defaults to the dense table (:func:`dense_layers`); ``experts``: the
    placement of expert-parallel experts (:func:`fm_train.families.spec.manifest_experts`)."""
    if topology.tp > 1 and layers is None:
        raise CheckpointError(f"tp={topology.tp}: pass layers with the tp split dims (the converter needs them)")
    if (experts is None) != (topology.ep == 1):
        raise CheckpointError(f"ep={topology.ep}: pass experts (where each expert lives) exactly when ep > 1")
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config.model_dump(mode="json"),
        "topology": {"world": topology.world, "dp": topology.dp, "tp": topology.tp, "pp": topology.pp,
                     "ep": topology.ep, "sp": topology.sp, "zero_stage": config.parallel.zero_stage,
                     "precision": config.precision},
        "param_prefix": param_prefix,
        "layers": layers if layers is not None else dense_layers(config.model.n_layers),
        "tied": dict(tied or {}),
        **({"experts": dict(experts)} if experts is not None else {}),
        "data": {"state": data_state, "tokenizer_hash": tokenizer_hash},
        "tokens_seen": int(tokens_seen),
    }


def complete_manifest(partial: Mapping[str, Any], *, step: int, tag: str, files: Mapping[str, int],
                      rng_files: list[str], checksums: Mapping[str, Any] | None = None,
                      probe: Mapping[str, Any] | None = None,
                      writers: list[list[str]] | None = None) -> dict[str, Any]:
    """Add what only the saver knows, and check the whole thing before it becomes the commit marker.

    ``checksums`` is :func:`fm_train.checkpoint.integrity.checksum_record` of every file; None leaves
    the field out (a manifest then vouches for sizes only). ``probe`` is
    :func:`fm_train.checkpoint.probe.manifest_entry` of the probe file; None leaves it out.
    ``writers[rank]``: the files that rank wrote; None leaves the field out."""
    out = dict(partial)
    out.update(step=int(step), tag=tag, created_unix=time.time(), files=dict(files),
               rng={"scheme": "per-rank", "files": list(rng_files)}, versions=package_versions())
    if checksums is not None:
        out["checksums"] = dict(checksums)
    if probe is not None:
        out["probe"] = dict(probe)
    if writers is not None:
        out["writers"] = [sorted(part) for part in writers]
    out.setdefault("format", FORMAT)
    out.setdefault("version", VERSION)
    check_manifest(out, where=f"manifest of {tag}")
    json.dumps(out)  # fail here, before anything is committed, if the caller passed something non-JSON
    return out


def check_manifest(manifest: Mapping[str, Any], *, where: str) -> None:
    """Raise :class:`CheckpointError` naming every missing field or a wrong format/version."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"{where}: format {manifest['format']!r} is not {FORMAT!r}")
    if manifest["version"] > VERSION:
        raise CheckpointError(f"{where}: manifest version {manifest['version']} is newer than this fm-train "
                              f"reads ({VERSION}); upgrade fm-train")
    check_file_names(manifest, where=where)
    check_experts(manifest, where=where)


def check_experts(manifest: Mapping[str, Any], *, where: str) -> None:
    """The ``experts`` record, when the step has one, is what fm-train writes: ``topology.ep`` ranks of equally
    many experts each, numbered 0.. in rank order, and parameter names; a reader indexes files and rows by it."""
    topology = manifest.get("topology")
    ep = topology.get("ep", 1) if isinstance(topology, Mapping) else 1
    record = manifest.get("experts")
    if record is None:
        if ep != 1:
            raise CheckpointError(f"{where}: topology.ep={ep!r} but no experts record (where each expert lives)")
        return
    ok = (isinstance(record, Mapping) and record.get("ep") == ep and isinstance(ep, int) and ep > 1
          and isinstance(record.get("params"), list) and record["params"]
          and all(isinstance(n, str) for n in record["params"]) and isinstance(record.get("ranks"), list)
          and len(record["ranks"]) == ep and all(isinstance(r, list) for r in record["ranks"]))
    if ok:
        per_rank = len(record["ranks"][0])
        ok = per_rank > 0 and record["ranks"] == [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep)]
    if not ok:
        raise CheckpointError(f"{where}: field experts is not the record fm-train writes ({{ep: topology.ep, params:"
                              " [names], ranks: equal runs of global experts per ep rank}): this manifest was"
                              " altered, do not resume or convert this step")


def check_file_names(manifest: Mapping[str, Any], *, where: str) -> None:
    """Every file name the manifest records is a plain name inside its step directory, of the kind fm-train
    writes (:mod:`data_shards.safe_paths`): resume, fetch and convert open or create files by these names."""
    checksums = manifest.get("checksums") or {}
    rng = manifest.get("rng") or {}
    for field, names in (("files", manifest.get("files", {})), ("checksums.files", checksums.get("files", {})),
                         ("rng.files", rng.get("files", []) if isinstance(rng, Mapping) else None)):
        if not isinstance(names, (Mapping, list)):
            raise CheckpointError(f"{where}: field {field} is not a list of file names")
        for name in names:
            try:
                relative_name(name, what=f"{where}: {field}", strict=True)
            except UnsafePathError as exc:
                raise CheckpointError(f"{exc}; fm-train does not write such names: this manifest was altered, "
                                      "do not resume or convert this step") from None


def write_manifest(step_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (the commit marker: call after every other file is durable)."""
    path = Path(step_dir) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(step_dir: Path) -> dict[str, Any]:
    """The manifest of a complete step directory; a clear error for anything else."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not step_dir.is_dir():
        raise CheckpointError(f"{step_dir} does not exist or is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{step_dir} has no {MANIFEST}: it is not a complete checkpoint "
                              "(the save did not finish, or this is not a step directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a flipped byte can break the UTF-8 too
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    check_manifest(manifest, where=str(path))
    # Written before the vocabulary was padded: its tensors have vocab_size rows (the config's default would pad).
    manifest["config"]["model"].setdefault("vocab_multiple", 1)
    return manifest


def saved_padded_vocab(model_fields: Mapping[str, Any]) -> int:
    """Embedding rows of a checkpoint's model: ``vocab_size`` rounded up to ``vocab_multiple``.

    Manifests written before fm-train padded the vocabulary have no ``vocab_multiple``: no padding.
    """
    multiple = int(model_fields.get("vocab_multiple", 1))
    return -(-int(model_fields["vocab_size"]) // multiple) * multiple


def missing_files(step_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Files the manifest lists that are absent or of another size (a copied-in-part checkpoint); of a
    directory holding part of the files for its node's ranks, those it holds."""
    held = read_held(step_dir)
    bad = []
    for rel, size in manifest.get("files", {}).items():
        if held is not None and rel not in held["files"]:
            continue
        p = Path(step_dir) / rel
        if not p.is_file():
            bad.append(f"{rel} (missing)")
        elif p.stat().st_size != size:
            bad.append(f"{rel} ({p.stat().st_size} bytes, manifest says {size})")
    return bad
