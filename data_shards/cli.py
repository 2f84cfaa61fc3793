"""``fm-train shard``: arguments and entry point (wired into fm_train/cli/__init__.py; also ``python -m data_shards``)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from .errors import DataError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``64MB`` / ``500k`` / ``1GiB`` / ``1000000`` (KB, MB, GB are powers of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 64MB, 500KB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``fm-train shard`` option to ``parser``."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="input files or globs (.txt, .jsonl[.gz], .parquet, .arrow), directories written "
                             "by datasets' save_to_disk, or hf:NAME[:CONFIG] for a dataset in the local Hugging Face "
                             "cache (read offline); none: the Python standard library source of this interpreter "
                             "(the offline demo corpus)")
    parser.add_argument("--out", required=True, metavar="DIR_OR_URI",
                        help="output shard directory: a local or shared path, or an object-store URI such as "
                             "s3://bucket/prefix (built locally, then uploaded, index.json last)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, metavar="DIR",
                     help="existing Hugging Face tokenizer directory (with tokenizer.json) to use")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a byte-level BPE tokenizer with N tokens on the input (default 8192)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="training tokens per sample; samples store seq-len + 1 tokens (default 256)")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("64MB"),
                        help="target bytes per .tar shard, e.g. 64MB, 500KB, 1GiB (default 64MB)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1; 0 tokenizes in the main process)")
    parser.add_argument("--text-field", default="text",
                        help="field of each .jsonl object / column of .parquet, .arrow and Hugging Face datasets "
                             "holding the text (default text)")
    parser.add_argument("--split", default="train",
                        help="split of a saved DatasetDict directory or an hf: dataset to read (default train)")
    parser.add_argument("--txt-unit", choices=("document", "line"), default="document",
                        help="a .txt file is one document, or each non-empty line is one (default document)")
    parser.add_argument("--on-bad-utf8", choices=("skip", "fail"), default="fail",
                        help="a line that is not valid UTF-8: skip and count it, or stop with an error (default fail)")
    parser.add_argument("--eos-token", help="end-of-document token of --tokenizer, if its config names none")
    parser.add_argument("--tokenizer-train-bytes", type=parse_size, default=parse_size("200MB"),
                        help="text to train the tokenizer on, sampled from the input (default 200MB)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sample the tokenizer trains on when the input is larger (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards, index.json and tokenizer/ already in --out (other files are kept)")
    parser.add_argument("--verify", action="store_true",
                        help="do not build: check the shards in --out against index.json (sizes, headers, sha256)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_shard(args: argparse.Namespace) -> int:
    """Run ``fm-train shard``; return the exit code (2 on bad input, with a one-line error on stderr)."""
    try:
        if args.verify:
            return _verify(args.out)
        summary = _build(args)
    except DataError as exc:
        print(f"fm-train shard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fm-train shard: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


def _build(args: argparse.Namespace):
    from .build import BuildOptions, build_shards
    from .corpus import stdlib_files

    files = None if args.inputs else stdlib_files()
    opts = BuildOptions(
        inputs=list(args.inputs), out=args.out, seq_len=args.seq_len, tokenizer_dir=args.tokenizer,
        vocab_size=None if args.tokenizer is not None else (args.vocab_size or 8192), shard_size=args.shard_size, workers=args.workers,
        text_field=args.text_field, txt_unit=args.txt_unit, split=args.split,
        on_bad_utf8="skip" if files is not None else args.on_bad_utf8, overwrite=args.overwrite,
        eos_token=args.eos_token, tokenizer_train_bytes=args.tokenizer_train_bytes, seed=args.seed,
        progress=not args.no_progress, created_by=_command_line(args))
    return build_shards(opts, files)


def _command_line(args: argparse.Namespace) -> str:
    """The command that rebuilds this directory, recorded in index.json for bad-shard errors."""
    tok = ["--tokenizer", str(args.tokenizer)] if args.tokenizer else ["--vocab-size", str(args.vocab_size or 8192)]
    text = shlex.join(["fm-train", "shard", *args.inputs, "--out", str(args.out), *tok, "--seq-len",
                       str(args.seq_len), "--shard-size", str(args.shard_size), "--text-field", args.text_field,
                       "--txt-unit", args.txt_unit, "--split", args.split, "--on-bad-utf8", args.on_bad_utf8,
                       "--seed", str(args.seed)])
    # index.json readers refuse control characters here (the text is printed in one-line errors)
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def _verify(out: str) -> int:
    from .verify import verify_shards

    problems = verify_shards(out)  # sizes, headers, declared shape and sha256, each shard read once
    for name, problem in problems:
        print(f"{out.rstrip('/')}/{name}: {problem}")
    if problems:
        print(f"fm-train shard: error: {len(problems)} bad shards in {out}; rebuild with --overwrite", file=sys.stderr)
        return 1
    print(f"{out}: all shards match index.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m data_shards``: the same command outside fm-train."""
    parser = argparse.ArgumentParser(prog="python -m data_shards", description="Build webdataset token shards.")
    add_shard_arguments(parser)
    return run_shard(parser.parse_args(argv))
