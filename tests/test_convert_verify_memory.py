"""Verification holds one module's weights at a time, not the model: the export is loaded with every
weight-holding module offloaded to its own files, and a forward reads each weight when its module
runs, then drops it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.unit


def _export(tmp_path: Path) -> tuple[Path, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fm_train.convert import import_hf
    from fm_train.families import family_of

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    out = tmp_path / "hf"
    model.save_pretrained(str(out))
    fields, _ = import_hf(out, family_of("llama"))
    return out, fields


def test_a_forward_holds_one_weight_at_a_time_and_gives_the_whole_models_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from fm_train.convert.verify import open_export
    from fm_train.families import family_of

    out, fields = _export(tmp_path)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        whole = reference(input_ids=ids).logits

    with open_export(family_of(fields), out, fields) as (tensors, model):
        assert tensors == len(list(reference.parameters()))

        def resident() -> int:
            return sum(p.numel() for p in model.parameters() if p.device.type != "meta")

        assert resident() == 0  # nothing held after loading
        held: list[int] = []

        class Watch(TorchFunctionMode):
            """Counts the weights held whenever a projection or the embedding computes."""

            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (F.linear, F.embedding):
                    held.append(resident())
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Watch():
            got = model(input_ids=ids).logits
        assert resident() == 0  # and nothing after the forward
    largest = max(p.numel() for p in reference.parameters())
    total = sum(p.numel() for p in reference.parameters())
    assert len(held) == 1 + 3 * 7 + 1  # embedding, 7 projections per block, head
    assert max(held) == largest < total / 5  # one weight matrix at a time, never the model
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)


def test_a_missing_tensor_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from fm_train.convert import ConvertError
    from fm_train.convert.verify import open_export
    from fm_train.families import family_of

    out, fields = _export(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="missing tensors.*model.layers.1.mlp.up_proj.weight"):
        with open_export(family_of(fields), out, fields):
            pass
