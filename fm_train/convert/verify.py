"""Check an export by what it computes, not only by its names: Hugging Face's model loaded from the
written files must give the logits of fm_train's own model on a fixed probe batch.

This self-comparison builds both sides from the same merged tensors, so it checks the key map and
the file writing, not the merge; checkpoints carrying the engine's probe are checked against that
instead (:mod:`fm_train.convert.verify_probe`). It stays for checkpoints saved before the probe and
for imports.

For a 16-bit export both sides see the same rounded weights: the reference model gets the fp32
weights rounded to the export dtype, and Hugging Face loads the 16-bit files upcast to fp32. Both then
compute in fp32, so the tolerance is the fp32 one whatever the export dtype: a swapped or misnamed
tensor moves logits by orders of magnitude more than 1e-4, arithmetic order by about 1e-6.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from fm_train.checkpoint.probe import probe_tokens
from fm_train.convert.errors import ConvertError
from fm_train.convert.keymap import fm_param_shapes, hf_layout
from fm_train.convert.writer import read_weight_names
from fm_train.families.spec import FamilySpec
from fm_train.model.base import real_logits

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class VerifyReport:
    """What the verification compared and found."""

    max_abs_diff: float
    probe_shape: tuple[int, int]
    tensors: int


def probe_batch(vocab_size: int, max_seq_len: int) -> torch.Tensor:
    """Fixed token ids (2 x up to 32) drawn from a seeded generator: the engine's probe batch."""
    return probe_tokens(vocab_size, max_seq_len)


def reference_model(family: FamilySpec, model_fields: Mapping[str, Any], fetch: Callable[[str], torch.Tensor],
                    dtype: torch.dtype) -> torch.nn.Module:
    """fm_train's own ``family`` model with ``fetch``'s fp32 weights rounded to ``dtype`` and computed in fp32."""
    from fm_train.config import ModelConfig

    modules = family.modules()
    args = modules.args(ModelConfig(**model_fields))
    # Built on meta and then given storage: a random init of every weight would only be overwritten.
    with torch.device("meta"):
        model = args.build()
    model.to_empty(device="cpu")
    modules.finish_materialize(model, args)
    params = dict(model.named_parameters())  # a tied head is the embedding parameter itself
    expected = fm_param_shapes(family, model_fields)
    if set(params) != set(expected):
        raise ConvertError(f"fm_train's model has parameters {sorted(set(params) ^ set(expected))[:5]} the key map lacks")
    with torch.no_grad():
        for name, param in params.items():
            # One tensor at a time: no second full copy of the weights next to the model. An imported
            # embedding or head has the tokenizer's rows only; the vocabulary padding rows are zero.
            value = fetch(name).to(dtype).float()
            param.zero_()
            param[:value.shape[0]].copy_(value)
    return model.eval()


def check_names(family: FamilySpec, out_dir: Path, model_fields: Mapping[str, Any]) -> int:
    """Every expected tensor is in the export and nothing else is; returns the count."""
    expected = set(hf_layout(family, model_fields))
    written = set(read_weight_names(out_dir))
    missing, unexpected = sorted(expected - written), sorted(written - expected)
    if missing or unexpected:
        raise ConvertError(f"export has missing tensors {missing[:5]} and unexpected tensors {unexpected[:5]}")
    return len(expected)


def _auto_class(family: FamilySpec) -> Any:
    """The ``transformers`` auto class that loads the family's exports."""
    import transformers

    return getattr(transformers, family.hf.auto_class)


def _offload_map(config: Any, auto_class: Any) -> dict[str, str]:
    """accelerate's device map for ``config``'s model: every module holding weights (each decoder block,
    the embeddings, the final norm, the head) on ``"disk"``, the rest (rotary tables) on ``"cpu"``."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = auto_class.from_config(config)

    def walk(module: torch.nn.Module, prefix: str) -> dict[str, str]:
        placed: dict[str, str] = {}
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, torch.nn.ModuleList):
                placed.update({f"{path}.{i}": "disk" for i in range(len(child))})
            elif any(True for _ in child.parameters(recurse=False)) or not any(True for _ in child.children()):
                placed[path] = "disk" if any(True for _ in child.parameters()) else "cpu"
            else:
                placed.update(walk(child, f"{path}."))
        return placed

    return walk(skeleton, "")


@contextlib.contextmanager
def open_export(family: FamilySpec, out_dir: Path, model_fields: Mapping[str, Any]) -> Iterator[tuple[int, Any]]:
    """``(tensor count, model)``: the export's names checked, then loaded by the family's auto class
    (``AutoModelForCausalLM`` for Llama; offline, fp32) with every block offloaded to the export's own files; a :class:`ConvertError` when
    transformers reports missing, unexpected or mismatched keys.

    Bounded memory: accelerate's hooks (one per module with weights: each projection, norm, the
    embedding, the head) read a module's weights from the safetensors files when it runs and drop
    them after, so a forward holds one weight matrix in fp32 (the largest: the embedding or the head)
    plus the activations, not the model: a 70B export verifies on one host. The offload folder stays
    empty (safetensors exports are read in place); it only has to exist while the model is used.
    """
    from transformers import AutoConfig

    auto_class = _auto_class(family)
    tensors = check_names(family, out_dir, model_fields)
    config = AutoConfig.from_pretrained(str(out_dir), local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="fm-train-verify-") as offload:
        # accelerate warns that "some parameters are on the meta device": offloading them is the point.
        quiet = logging.getLogger("accelerate.big_modeling")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            hf, info = auto_class.from_pretrained(
                str(out_dir), local_files_only=True, dtype=torch.float32, output_loading_info=True,
                device_map=_offload_map(config, auto_class), offload_folder=offload)
        finally:
            quiet.setLevel(level)
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            raise ConvertError(f"transformers reports {problems} loading {out_dir}")
        yield tensors, hf.eval()


@torch.no_grad()
def verify_export(family: FamilySpec, out_dir: Path, model_fields: Mapping[str, Any],
                  fetch: Callable[[str], torch.Tensor], dtype: torch.dtype, *,
                  tolerance: float = DEFAULT_TOLERANCE) -> VerifyReport:
    """Load ``out_dir`` with the family's auto class (offline, fp32) and compare probe logits with
    fm_train's model built from ``model_fields`` and ``fetch`` (fp32 weights by fm_train name)."""
    probe = probe_batch(model_fields["vocab_size"], model_fields["max_seq_len"])
    with open_export(family, out_dir, model_fields) as (tensors, hf):
        got = hf(input_ids=probe).logits.float()
    ref = reference_model(family, model_fields, fetch, dtype)
    want = real_logits(ref(probe).float(), int(model_fields["vocab_size"]))
    diff = (got - want).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise ConvertError(f"verification failed: Hugging Face logits differ from fm_train's by {diff:.3g} "
                           f"(tolerance {tolerance:g}); a tensor is misplaced or misshaped in the export")
    return VerifyReport(max_abs_diff=diff, probe_shape=tuple(probe.shape), tensors=tensors)
