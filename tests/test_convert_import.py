"""Hugging Face -> fm_train -> Hugging Face round trips, tp-shard merging and pipeline names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_checkpoint_support as S

pytestmark = pytest.mark.unit


def _hf_model(tmp_path: Path, *, tie: bool, bias: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rms_norm_eps=1e-6,
                  attention_bias=bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # make norms and biases non-trivial, so a dropped one would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
    out = tmp_path / "src"
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("tie,bias", [(True, False), (False, False), (False, True)])
def test_round_trip_hf_fm_hf_is_identical(tmp_path: Path, tie: bool, bias: bool) -> None:
    from fm_train.config import ModelConfig
    from fm_train.convert import import_hf, write_hf_dir
    from fm_train.families import family_of
    from fm_train.families.llama.model import LlamaForCausalLM, args_from_config

    llama = family_of("llama")
    src = _hf_model(tmp_path, tie=tie, bias=bias)
    fields, state = import_hf(src, llama)
    assert fields["rope_theta"] == 5e5 and fields["norm_eps"] == 1e-6 and fields["qkv_bias"] == bias
    model = LlamaForCausalLM(args_from_config(ModelConfig(**fields)))
    model.load_state_dict(state, strict=True)  # every fm_train parameter came from the HF dir
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    fields = {**fields, "init_std": 0.02}
    out = write_hf_dir(tmp_path / "out", llama, fields, lambda n: weights[n].float(), dtype="fp32")
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    if tie:
        before.pop("lm_head.weight", None)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["attention_bias"] == bias


def test_import_refuses_what_fm_train_cannot_compute(tmp_path: Path) -> None:
    from fm_train.convert import ConvertError, import_hf
    from fm_train.families import family_of

    src = _hf_model(tmp_path, tie=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="hidden_act='gelu'"):
        import_hf(src, family_of("llama"))


def test_sharded_output_with_index(tmp_path: Path) -> None:
    from fm_train.convert import import_hf, write_hf_dir
    from fm_train.families import family_of

    llama = family_of("llama")
    fields, state = import_hf(_hf_model(tmp_path, tie=False), llama)
    out = write_hf_dir(tmp_path / "out", llama, fields, lambda n: state[n].float(), dtype="bf16", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    fields2, state2 = import_hf(out, llama)  # reads the index back
    assert torch.equal(state2["lm_head.weight"], state["lm_head.weight"].to(torch.bfloat16))


def test_tp_shards_merge_along_recorded_dims(tmp_path: Path) -> None:
    """A tp2 ZeRO-0 checkpoint written by hand (column-parallel q, row-parallel o, replicated norm)."""
    from fm_train.checkpoint.manifest import dense_layers
    from fm_train.config import build_config
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
    from fm_train.families import family_of

    cfg = build_config(S.tiny_raw(0, 2))
    full = {"model.model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64),
            "model.model.layers.0.self_attn.o_proj.weight": torch.randn(64, 64),
            "model.model.layers.0.input_layernorm.weight": torch.randn(64)}
    dims = {"model.layers.0.self_attn.q_proj.weight": 0, "model.layers.0.self_attn.o_proj.weight": 1,
            "model.layers.0.input_layernorm.weight": None}
    for tp in (0, 1):
        module = {k: (v if v.dim() == 1 else v.chunk(2, dim=0 if "q_proj" in k else 1)[tp]).clone()
                  for k, v in full.items()}
        torch.save({"module": module}, tmp_path / f"mp_rank_{tp:02d}_model_states.pt")
    manifest = {"topology": {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "fp32", "world": 2},
                "param_prefix": "model.", "layers": dense_layers(2, dims),
                "config": {"model": cfg.model.model_dump()}}
    model_fields = manifest["config"]["model"]
    weights = DeepSpeedWeights(tmp_path, manifest, tied=family_of(model_fields).tied_params(model_fields))
    assert weights.shapes()["model.layers.0.self_attn.o_proj.weight"] == (64, 64)
    for k, v in full.items():
        assert torch.equal(weights.get(k.removeprefix("model.")), v)


def test_pipeline_names_map_through_the_layer_table() -> None:
    from fm_train.checkpoint import CheckpointError
    from fm_train.deepspeed_adapter.ckpt_names import ds_to_fm
    from fm_train.checkpoint.manifest import dense_layers
    from fm_train.convert import ConvertError
    from fm_train.convert.keymap import fm_to_hf
    from fm_train.families import family_of

    manifest = {"topology": {"pp": 2}, "layers": dense_layers(2), "tied": {"embed": "model.embed_tokens"}}
    assert ds_to_fm("2.mlp.up_proj.weight", manifest) == "model.layers.1.mlp.up_proj.weight"
    assert ds_to_fm("3.weight", manifest) == "model.norm.weight"
    assert ds_to_fm("tied_modules.embed.weight", manifest) == "model.embed_tokens.weight"
    with pytest.raises(CheckpointError, match="layer 9"):
        ds_to_fm("9.weight", manifest)
    with pytest.raises(ConvertError, match="not in the key map"):
        fm_to_hf(family_of("llama"), "model.layers.0.attn.wq.weight")
