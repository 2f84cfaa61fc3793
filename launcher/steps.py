"""Steps around training that need heavy libraries, run as subprocesses of the driver.

``python -m launcher.steps corpus|convert|publish|sample ...``: building the default corpus
(data_shards), converting the final checkpoint (fm_train.convert), uploading the verified Hugging Face
directory to ``run.storage`` and sampling from the converted model (transformers) import torch (or
fsspec's backends); running them in a child process keeps the driver free of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

def _corpus(args: argparse.Namespace) -> int:
    from data_shards import DEFAULT_CORPUS_VOCAB, build_default_corpus
    from fm_train.families import family_of

    # The model family's own special tokens (an encoder's [CLS], [SEP], [MASK], [PAD]) follow the tokenizer's.
    specials = len(family_of(args.family).objective.tokenizer_specials)
    vocab = DEFAULT_CORPUS_VOCAB if args.vocab_size == "auto" else int(args.vocab_size) - specials
    path = build_default_corpus(Path(args.out), vocab_size=vocab, seq_len=args.seq_len, workers=args.workers)
    print(f"default corpus written to {path}")
    return 0


def _vocab_arg(text: str) -> str:
    """``--vocab-size``: a positive number or auto (argparse type)."""
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number nor auto")
    return text


def _convert(args: argparse.Namespace) -> int:
    import contextlib

    from fm_train.convert import convert_checkpoint
    from fm_train.convert.remote import checkpoint_in_storage, is_uri

    with contextlib.ExitStack() as stack:
        checkpoint, tokenizer, in_storage = Path(args.checkpoint), None, None
        if is_uri(args.checkpoint):  # run.storage: the committed step, read in place
            checkpoint, in_storage, tokenizer = stack.enter_context(checkpoint_in_storage(args.checkpoint, print))
        out = convert_checkpoint(checkpoint, Path(args.out), dtype=args.dtype, verify=True, overwrite=True,
                                 tokenizer=tokenizer, in_storage=in_storage)
    print(f"converted {args.checkpoint} to {out or args.out}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from fm_train.storage.log_copies import publish_hf_dir

    try:
        publish_hf_dir(Path(args.hf_dir), args.storage, retries=args.retries, progress=print)
    except Exception as exc:  # the stores raise their own types (botocore, aiohttp, OSError)
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"uploading {args.hf_dir} to {args.storage} failed ({type(exc).__name__}: {first}); the verified"
              f" model is in {args.hf_dir} only; run.storage holds no complete copy (no marker)", file=sys.stderr)
        return 1
    return 0


def _sample(args: argparse.Namespace) -> int:
    import json

    from fm_train.families import family_of_hf

    model_type = json.loads((Path(args.model) / "config.json").read_text()).get("model_type")
    family = family_of_hf(model_type)
    if family is None:
        print(f"{args.model}: model_type {model_type!r} is not one of fm-train's families", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar would sit among the sample's lines
    print(family.hf.sample(Path(args.model), prompt=args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch one step; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m launcher.steps", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("corpus", help="build the default corpus shards")
    p.add_argument("out", help="shard directory to create")
    p.add_argument("--vocab-size", type=_vocab_arg, required=True,
                   help="the model's vocabulary (model.vocab_size: a number, or auto for the default corpus's)")
    p.add_argument("--family", required=True, help="model.family (its special tokens come after the tokenizer's)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sample (data.seq_len)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.set_defaults(fn=_corpus)
    p = sub.add_parser("convert", help="convert a checkpoint to a Hugging Face directory")
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory")
    p.add_argument("out", help="output directory (replaced)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    p.set_defaults(fn=_convert)
    p = sub.add_parser("publish", help="upload a verified Hugging Face directory to <run.storage>/hf/")
    p.add_argument("hf_dir", help="the converted, verified directory (RUN/hf)")
    p.add_argument("storage", help="run.storage (an fsspec URI or a mounted directory)")
    p.add_argument("--retries", type=int, default=5, help="retries per file (checkpoint.upload_retries)")
    p.set_defaults(fn=_publish)
    p = sub.add_parser("sample", help="show what a Hugging Face directory computes (the family's sample)")
    p.add_argument("model", help="directory with config.json, weights and tokenizer")
    p.add_argument("--prompt", default="def ", help="text to continue (an encoder fills a [MASK] after it)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(fn=_sample)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
