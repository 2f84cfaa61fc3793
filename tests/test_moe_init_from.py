"""``model.init_from`` a Hugging Face ``Qwen3MoeForCausalLM`` directory at ep2: each rank reads only the
rows of its own experts (and the dense weights), and holds exactly the stored values; a directory of
another Mixture-of-Experts architecture is refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

HF_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                mlp_only_layers=[0], max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("hf-moe") / "qwen3-moe"
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**HF_SHAPE)).save_pretrained(out)
    return out


def raw_config(hf_dir: Path, **parallel: Any) -> dict[str, Any]:
    return {"run": {"name": "moe-init", "dir": "runs/unused", "seed": 1},
            "model": {"family": "qwen3_moe", "init_from": str(hf_dir), "vocab_multiple": 1},
            "parallel": {"tp": 1, "pp": 1, "zero_stage": 2, **parallel}, "precision": "fp32",
            "data": {"seq_len": 32}, "convert": {"at_end": False}, "cluster": {"workers": 2}}


def _build(raw: dict[str, Any]) -> dict[str, Any]:
    """Per rank: the module built from ``model.init_from`` as the worker builds it; what it read, what it
    holds, and the parameters whose values differ from their rows of the stored model."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import Qwen3MoeForCausalLM

    from fm_train.config import build_config
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.worker import _initial_weights

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = build_config(raw, require_paths=True)
    family, ep = family_of(cfg.model), cfg.parallel.ep
    topology = Topology(world=cfg.world_size, ep=ep)
    init = _initial_weights(cfg, family, resuming=False)
    module = build_train_module(cfg, family, ParallelGroups(topology), init=init)
    local = {n.removeprefix("model."): p.detach() for n, p in module.named_parameters()}
    rank = dist.get_rank()
    stored = {n: p.detach() for n, p in Qwen3MoeForCausalLM.from_pretrained(cfg.model.init_from).named_parameters()}
    wrong = []
    for name, value in local.items():
        want = stored[name]
        if ".mlp.experts." in name:  # Hugging Face's stacked expert tensors: this rank's rows
            want = want.chunk(ep, 0)[topology.ep_rank(rank)]
        if not torch.equal(value, want):
            wrong.append(name)
    return {"wrong": wrong, "read": init.elements_read, "held": sum(v.numel() for v in local.values())}


def test_each_expert_parallel_rank_reads_only_its_experts(hf_dir: Path) -> None:
    ranks = run_distributed(_build, world_size=2, args=(raw_config(hf_dir, ep=2),))
    whole = run_distributed(_build, world_size=2, args=(raw_config(hf_dir, ep=1),))
    for r in ranks + whole:
        assert r["wrong"] == [] and r["read"] == r["held"], r
    experts = 2 * 3 * 64 * 32 * 4  # two routed blocks of 4 experts (gate, up, down: 64 x 32 each)
    assert [r["held"] for r in ranks] == [whole[0]["held"] - experts // 2] * 2


def test_a_directory_of_another_moe_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from fm_train.config import ConfigError, build_config

    out = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     max_position_embeddings=64)).save_pretrained(out)
    with pytest.raises(ConfigError) as caught:
        build_config(raw_config(out), require_paths=True)
    message = str(caught.value)
    assert "model.init_from" in message and "model_type 'mixtral' is not one fm-train trains" in message, message
    assert "model.init_from: null" in message and "model.moe section" not in message, message  # the fix, no noise
