"""``convert_checkpoint``: a step directory (or a run/checkpoints dir) -> a verified Hugging Face dir.

Everything is written into a temp dir next to ``out`` and renamed into place at the end; on any
failure, verification included, the temp dir is removed and ``out`` is untouched.

Verification compares the export's logits with the training engine's own on the probe batch stored
with the checkpoint (:mod:`fm_train.convert.verify_probe`); checkpoints saved before the probe existed
fall back to fm_train's model rebuilt from the same tensors (:mod:`fm_train.convert.verify`), and
the progress output and README say which one ran.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fm_train.checkpoint import CheckpointError, read_manifest, resolve_checkpoint
from fm_train.checkpoint.layout import refuse_symlinks
from fm_train.checkpoint.integrity import damage_message, find_damage, find_damage_in_storage
from fm_train.storage.ranged_reads import bytes_fetched
from fm_train.checkpoint.node_files import HELD, read_held
from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
from fm_train.convert.probe import read_probe
from fm_train.convert.errors import ConvertError
from fm_train.convert.hf_files import (
    copy_tokenizer,
    matching_tokenizer,
    write_generation_config,
    write_readme,
)
from fm_train.families import family_of
from fm_train.families.spec import FamilySpec
from data_shards.staging import OWNER_NAME, make_staging, remove_stale_staging
from fm_train.convert.out_dir import check_disjoint, publish, run_dir_of, staging_prefix, write_record
from fm_train.convert.keymap import fm_param_shapes, hf_layout, without_padding
from fm_train.convert.verify import DEFAULT_TOLERANCE, verify_export
from fm_train.convert.verify_probe import verify_against_probe
from fm_train.convert.writer import DEFAULT_MAX_SHARD_BYTES, DTYPES, write_safetensors

log = logging.getLogger("fm_train.convert")
Progress = Callable[[str], None]


def _check_shapes(family: FamilySpec, have: Mapping[str, torch.Size], model_fields: Mapping[str, Any],
                  where: Path) -> None:
    want = fm_param_shapes(family, model_fields)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{n} {tuple(have[n])} != {tuple(want[n])}" for n in want if n in have and have[n] != want[n]]
    if missing or extra or wrong:
        raise ConvertError(f"{where} does not match the model its manifest describes: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")


def write_hf_dir(out: Path, family: FamilySpec, model_fields: Mapping[str, Any],
                 fetch: Callable[[str], torch.Tensor], *,
                 dtype: str = "bf16", verify: bool = True, overwrite: bool = False, tokenizer: Path | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tolerance: float = DEFAULT_TOLERANCE,
                 readme: Callable[[Path, str], None] | None = None, progress: Progress = lambda _m: None,
                 reference: Mapping[str, torch.Tensor] | None = None, reference_precision: str = "fp32") -> Path:
    """Write a ``family`` model's weights (``fetch``: fm_train name -> fp32 tensor), config, tokenizer and README into
    ``out`` atomically, verifying logits first unless ``verify`` is False.

    ``reference``: the training engine's probe record (``reference_precision``: the precision of the
    forward that produced it); the export is checked against it. None: against fm_train's own model
    built from ``fetch`` (``tolerance`` applies to that comparison only)."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for line in remove_stale_staging(out.parent, staging_prefix(out)):
        progress(line)
    tmp = make_staging(out.parent, staging_prefix(out))
    try:
        bos = eos = pad = None
        padding = ""
        if tokenizer is not None:
            ids = copy_tokenizer(tokenizer, tmp, specials=family.objective.tokenizer_specials,
                                 rows=int(model_fields["vocab_size"]), pad_with_eos=family.hf.pads_with_eos)
            bos, eos, pad, padding = ids.bos, ids.eos, ids.pad, ids.padding
            if ids.size > model_fields["vocab_size"]:
                raise ConvertError(f"tokenizer at {tokenizer} has {ids.size} tokens, more than model.vocab_size="
                                   f"{model_fields['vocab_size']}")
            progress(f"copied tokenizer from {tokenizer}")
            if padding.startswith("Padding: none"):
                progress(padding)
        # config.json's pad_token_id is the embedding's padding_idx in transformers (its row gets no gradient):
        # set for a dedicated [PAD], never for a decoder's EOS, which pads but is a token the model must learn.
        family.hf.config(model_fields, dtype=dtype, bos=bos, eos=eos,
                         pad=None if pad == eos else pad).save_pretrained(str(tmp))
        write_generation_config(tmp, bos, eos, pad)
        layout = hf_layout(family, model_fields)
        shapes = {hf_name: shape for hf_name, (_piece, shape) in layout.items()}
        last: dict[str, torch.Tensor] = {}  # a fused expert tensor, fetched once for its consecutive pieces

        def exported(hf_name: str) -> torch.Tensor:
            piece = layout[hf_name][0]
            if piece.name not in last:
                last.clear()
                last[piece.name] = fetch(piece.name)
            tensor = last[piece.name] if piece.row is not None else last.pop(piece.name)
            return without_padding(family, piece.name, piece.cut(tensor), int(model_fields["vocab_size"]))

        write_safetensors(tmp, shapes, exported, DTYPES[dtype],
                          max_shard_bytes=max_shard_bytes, progress=progress)
        verified = "skipped (--no-verify)"
        auto_class = family.hf.auto_class
        if verify and reference is not None:
            progress("verifying: Hugging Face logits vs the training engine's probe logits saved with the checkpoint")
            probe = verify_against_probe(family, tmp, model_fields, reference, precision=reference_precision,
                                         export_dtype=dtype)
            verified = (f"transformers {auto_class} logits match the training engine's own logits on the "
                        f"{probe.probe_shape} probe batch saved with the checkpoint (max abs diff "
                        f"{probe.worst.max_abs_diff:.2e} in {probe.worst.field}, allowed {probe.worst.bound:.2e}: "
                        f"{probe.rel_tol:g} x max(1, max |logit|) for {reference_precision} training, {dtype} "
                        f"weights); {probe.tensors} tensors, none missing or unexpected")
            progress(f"verified against the engine's probe: max abs diff {probe.worst.max_abs_diff:.2e} "
                     f"({probe.worst.field}, allowed {probe.worst.bound:.2e})")
        elif verify:
            progress("verifying: Hugging Face logits vs fm_train's model on a probe batch")
            report = verify_export(family, tmp, model_fields, fetch, DTYPES[dtype], tolerance=tolerance)
            verified = (f"transformers {auto_class} logits match fm_train's model on a {report.probe_shape} "
                        f"probe batch (max abs diff {report.max_abs_diff:.2e}, tolerance {tolerance:g}); "
                        f"{report.tensors} tensors, none missing or unexpected")
            progress(f"verified: max abs logit diff {report.max_abs_diff:.2e}")
        if readme is not None:
            readme(tmp, verified)
            if padding and (tmp / "README.md").is_file():
                with open(tmp / "README.md", "a") as f:
                    f.write(f"\n## Padding\n\n{padding}\n")
        (tmp / OWNER_NAME).unlink()  # the staging record is not part of the export
        write_record(tmp)
        publish(tmp, out, overwrite, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_checkpoint(checkpoint: Path, out: Path, *, dtype: str = "bf16", verify: bool = True,
                       overwrite: bool = False, trust_checkpoint: bool = False, tokenizer: Path | None = None,
                       no_tokenizer: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       tolerance: float = DEFAULT_TOLERANCE, in_storage: Any = None,
                       progress: Progress = lambda _m: None, source_label: str | None = None) -> Path:
    """Export ``checkpoint`` (run dir, checkpoints dir via ``latest``, or step dir) to ``out``.
    ``source_label``: what the model card says it was exported from (default: the step directory read).

    The tokenizer comes from ``tokenizer`` or else ``data.sources[0].path/tokenizer`` of the manifest's
    config; when neither exists the conversion stops unless ``no_tokenizer``. ``in_storage``: the
    step directory in object storage (a ``UPath``) whose DeepSpeed files are read in place, ``checkpoint``
    then holding its other files (:func:`fm_train.convert.remote.checkpoint_in_storage`). Returns ``out``.
    """
    try:
        step_dir = resolve_checkpoint(Path(checkpoint))
        refuse_symlinks(step_dir)
        manifest = read_manifest(step_dir)
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None
    held = read_held(step_dir)
    if held is not None:
        raise ConvertError(f"{step_dir} holds only the files ranks {held['ranks']} read ({HELD}: fetched from "
                           f"run.storage for a resume on this node); convert the step from run.storage "
                           f"({manifest['config']['run'].get('storage')}) instead")
    # Sizes and checksums of every file, before any is unpickled (in storage: see find_damage_in_storage).
    if in_storage is None:
        bad = find_damage(step_dir, manifest)
        if bad:
            raise ConvertError(damage_message(step_dir, bad) + "; copy the files again from where the run wrote them")
    else:
        bad = find_damage_in_storage(in_storage, step_dir, manifest)
        if bad:
            raise ConvertError(damage_message(in_storage, bad) + "; convert another committed step")
    if Path(out).exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    run_dir = run_dir_of(step_dir)
    provenance = "Tokenizer: none exported (--no-tokenizer)."
    if not no_tokenizer:
        tokenizer, provenance = matching_tokenizer(manifest, run_dir, tokenizer, progress)
    check_disjoint(Path(out), {"checkpoint": step_dir, "tokenizer": tokenizer,
                               "checkpoints directory": None if run_dir is None else step_dir.parent}, run_dir=run_dir)
    where = step_dir if in_storage is None else in_storage
    progress(f"reading {where} (step {manifest['step']}, ZeRO-{manifest['topology']['zero_stage']}, "
             f"dp={manifest['topology']['dp']} tp={manifest['topology']['tp']} pp={manifest['topology']['pp']})")
    fetched_before = bytes_fetched()
    model_fields = manifest["config"]["model"]
    try:  # the conversion's entry point: the one place it resolves the checkpoint's family
        family = family_of(model_fields)
    except ValueError as exc:
        raise ConvertError(f"{step_dir / 'manifest.json'}: config.{exc}; a manifest written before fm-train had model"
                           " families lacks it: add the family the run trained as config.model.family") from None
    source = DeepSpeedWeights(where, manifest, tied=family.tied_params(model_fields), trust=trust_checkpoint)
    _check_shapes(family, source.shapes(), model_fields, where)
    if source.note:
        progress(source.note)
    reference = read_probe(step_dir, manifest)
    if verify and reference is None:
        progress("this checkpoint has no probe (saved before fm-train stored the engine's logits): verifying "
                 "against fm_train's own model built from the same merged tensors instead, which cannot catch "
                 "a wrong tp/pp/ZeRO merge")

    def readme(tmp: Path, verified: str) -> None:
        write_readme(tmp, manifest, architecture=family.hf.architecture, dtype=dtype, source=source_label or str(where),
                     note=source.note, verified=verified, tokenizer=provenance)

    written = write_hf_dir(out, family, model_fields, source.get, dtype=dtype, verify=verify, overwrite=overwrite,
                           tokenizer=None if no_tokenizer else tokenizer, max_shard_bytes=max_shard_bytes,
                           tolerance=tolerance, readme=readme, progress=progress, reference=reference,
                           reference_precision=str(manifest["config"]["precision"]))
    if in_storage is not None:
        held = sum(size for rel, size in manifest.get("files", {}).items() if rel.endswith(".pt"))
        progress(f"read {(bytes_fetched() - fetched_before) / 2**20:.1f} MiB of tensors from storage, of the {held / 2**20:.1f} MiB "
                 "its .pt files hold (no local copy)")
    return written
