"""Convert real DeepSpeed checkpoints (ZeRO 0-3, dp2 and one process) and check what transformers loads.

The reference weights come from DeepSpeed's own consolidation (``get_fp32_state_dict_from_zero_checkpoint``,
or the ZeRO-0 module), an implementation independent of the converter's streaming reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import test_checkpoint_support as S
from distributed import run_distributed

pytestmark = pytest.mark.multiproc


def _reference_state(step_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fm_train-named fp32 weights as DeepSpeed itself consolidates them."""
    if zero_stage == 0:
        module = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        state = {k: v.float() for k, v in module.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {k.removeprefix("model."): v for k, v in state.items()}


def _fm_logits(manifest: dict, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    from fm_train.config import ModelConfig
    from fm_train.families.llama.model import LlamaForCausalLM, args_from_config

    model = LlamaForCausalLM(args_from_config(ModelConfig(**manifest["config"]["model"])))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("zero_stage,world,precision", [
    (0, 2, "fp32"), (1, 2, "bf16"), (2, 2, "bf16"), (3, 2, "fp32"), (2, 1, "fp32"),
])
def test_convert_matches_fm_model(tmp_path: Path, zero_stage: int, world: int, precision: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fm_train.convert import convert_checkpoint

    S.write_tokenizer(tmp_path / "data")
    raw = S.tiny_raw(zero_stage, world, precision=precision, tokenizer_root=str(tmp_path / "data"))
    run_distributed(S.run_and_save, world, args=(raw, str(tmp_path / "run"), 3))
    step_dir = tmp_path / "run/checkpoints/step_00000003"
    manifest = json.loads((step_dir / "manifest.json").read_text())

    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    assert out == (tmp_path / "hf").absolute()
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no temp dir left behind

    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    tokens = torch.randint(0, S.VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = hf(input_ids=tokens).logits
    want = _fm_logits(manifest, _reference_state(step_dir, zero_stage), tokens)
    assert (got - want).abs().max().item() <= 1e-5
    assert want.abs().max().item() > 0.1  # the comparison is between non-trivial logits

    generated = hf.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.decode(tok("def f(x)")["input_ids"]) == "def f(x)"
    readme = (out / "README.md").read_text()
    # Verified against the live engine's logits at save time, which the manifest names and checksums.
    assert manifest["probe"]["file"] == "probe.safetensors" and manifest["probe"]["precision"] == precision
    assert "probe.safetensors" in manifest["checksums"]["files"]
    assert "match the training engine's own logits" in readme, readme
    from fm_train.convert.probe import read_probe

    record = read_probe(step_dir, manifest)
    with torch.no_grad():
        hf_logits = hf(input_ids=record["input_ids"]).logits[:, record["positions"], :]
    engine_diff = (hf_logits - record["logits"]).abs().max().item()
    assert engine_diff <= (1e-5 if precision == "fp32" else 5e-2) * max(1.0, record["logits"].abs().max().item()), engine_diff
    assert "| steps | 3 |" in readme and f"| tokens seen | {3 * S.GLOBAL_BATCH * S.SEQ:,} |" in readme

    # bf16 export of the same step: stored weights are DeepSpeed's fp32 masters rounded once.
    out16 = convert_checkpoint(step_dir, tmp_path / "hf16", dtype="bf16")
    from safetensors.torch import load_file

    stored = load_file(str(out16 / "model.safetensors"))
    ref = _reference_state(step_dir, zero_stage)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert torch.equal(stored["model.layers.1.mlp.down_proj.weight"],
                       ref["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
