"""``fm-train convert`` arguments and entry: parse, call :func:`convert_checkpoint`, report.

Errors are one line on stderr (``fm-train convert: error: ...``) with exit status 2; progress goes
to stderr too, so stdout carries only the output path for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from fm_train.convert.errors import ConvertError

_MIB = 1024**2


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` arguments to ``parser`` (the CLI owns the sub-command)."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="run dir, its checkpoints/ dir (uses latest) or a step_XXXXXXXX dir; also in object"
                             " storage (s3://bucket/run, as run.storage wrote it: read in place, only its manifest"
                             " and probe fetched)")
    parser.add_argument("--out", default=None,
                        help="Hugging Face output dir, must not exist unless --overwrite (default: RUN/hf of the"
                             " checkpoint's run, STEP-hf beside a step dir outside a run);"
                             " an object-store URI gets the verified directory uploaded")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight dtype (bf16)")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check (against the training engine's probe saved with the "
                        "checkpoint, or fm_train's own model for checkpoints without one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that fm-train convert wrote: only the files it recorded"
                             " are deleted; anything else in it is kept in a *.kept-* sibling")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load DeepSpeed files with full unpickling (only for checkpoints you trust)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer dir (default: data.sources[0].path/tokenizer from the manifest)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    parser.add_argument("--max-shard-mb", type=int, default=2048, help="largest safetensors file (2048 MiB)")


def _say(msg: str) -> None:
    print(f"fm-train convert: {msg}", file=sys.stderr, flush=True)


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; 0 on success, 2 on any error (one line on stderr)."""
    from fm_train.checkpoint import CheckpointError
    from fm_train.convert.export import convert_checkpoint
    from fm_train.convert.remote import checkpoint_in_storage, is_uri, remote_output

    if args.tokenizer is not None and args.no_tokenizer:
        _say("error: --tokenizer and --no-tokenizer exclude each other")
        return 2
    if args.max_shard_mb <= 0:
        _say("error: --max-shard-mb must be positive")
        return 2
    try:
        with contextlib.ExitStack() as stack:
            checkpoint, tokenizer, in_storage = Path(args.checkpoint), args.tokenizer, None
            if is_uri(args.checkpoint):
                if args.out is None:
                    raise ConvertError("a checkpoint in object storage needs --out (a local dir or a URI)")
                checkpoint, in_storage, fetched_tokenizer = stack.enter_context(
                    checkpoint_in_storage(args.checkpoint, _say))
                tokenizer = tokenizer if tokenizer is not None else fetched_tokenizer
            out_dir, publish = args.out, None
            if out_dir is not None and is_uri(out_dir):
                out_dir, publish = stack.enter_context(remote_output(args.out, overwrite=args.overwrite,
                                                                     progress=_say))
            if out_dir is None:
                from fm_train.checkpoint import resolve_checkpoint
                from fm_train.convert.out_dir import run_dir_of

                step_dir = resolve_checkpoint(checkpoint)
                run_dir = run_dir_of(step_dir)  # RUN/checkpoints/step_X -> RUN/hf; a lone step_X -> step_X-hf
                out_dir = run_dir / "hf" if run_dir is not None else step_dir.with_name(f"{step_dir.name}-hf")
            out = convert_checkpoint(checkpoint, Path(out_dir), dtype=args.dtype, verify=not args.no_verify,
                                     overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint,
                                     tokenizer=tokenizer, no_tokenizer=args.no_tokenizer,
                                     max_shard_bytes=args.max_shard_mb * _MIB, in_storage=in_storage,
                                     progress=_say)
            if publish is not None:
                out = publish()
    except (ConvertError, CheckpointError, OSError) as exc:
        _say("error: " + " ".join(str(exc).split()))
        return 2
    _say(f"wrote {out}")
    print(out)
    return 0
