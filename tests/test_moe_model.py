"""The MoE family's pure model: Hugging Face ``Qwen3MoeForCausalLM``'s logits, its routing options and
router losses, and expert parallelism's dispatch computing exactly what one process computes."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed

VOCAB = 500


def moe_config(**moe):
    import fm_train  # noqa: F401  (registers the families with the config loader)
    from fm_train.config import build_config

    return build_config({"model": {"preset": "moe-tiny", "vocab_size": VOCAB, "vocab_multiple": 64, "moe": moe}})


def built(cfg):
    from fm_train.engine.train_module import build_dense_model
    from fm_train.families import family_of

    return build_dense_model(cfg, family_of(cfg.model))


@pytest.mark.unit
def test_logits_equal_transformers_qwen3_moe_loaded_from_per_expert_keys(tmp_path):
    import safetensors.torch as st
    from transformers import Qwen3MoeForCausalLM

    from fm_train.families import family_of

    cfg = moe_config(top_k=3, norm_topk_prob=False)
    family, model = family_of(cfg.model), built(cfg).eval()
    f = cfg.model.moe.expert_ffn_hidden
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            for e in range(p.shape[0]):
                tensors[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = p[e, :f].clone()
                tensors[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = p[e, f:].clone()
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                tensors[name.replace("down_proj", f"{e}.down_proj.weight")] = p[e].clone()
        elif name != "lm_head.weight":  # tied: Hugging Face stores the embedding once
            tensors[name] = p[:VOCAB].clone() if name.endswith("embed_tokens.weight") else p.clone()
    st.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    family.hf.config(cfg.model.model_dump(), dtype="fp32", bos=None, eos=None).save_pretrained(tmp_path)
    hf = Qwen3MoeForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens)[..., :VOCAB], hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)
    assert family.sizes.parameter_count(cfg.model) == sum(p.numel() for p in model.parameters())


@pytest.mark.unit
def test_router_losses_reach_the_router_scaled_like_the_loss_and_are_reported():
    from fm_train.families.qwen3_moe.model import set_router_loss_scale, take_router_metrics

    cfg = moe_config(aux_loss_coef=0.5, z_loss_coef=0.25)
    model = built(cfg)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    router = model.model.layers[1].mlp.gate.weight

    def router_grad(scale: float, *, with_lm: bool) -> torch.Tensor:
        model.zero_grad()
        set_router_loss_scale(scale)
        logits = model(tokens)
        (logits.sum() * 0.0 if not with_lm else logits.float().logsumexp(-1).mean()).mul(scale).backward()
        return router.grad.clone()

    try:
        only_router = router_grad(1.0, with_lm=False)
        assert only_router.abs().sum() > 0  # the router losses alone move the router
        torch.testing.assert_close(router_grad(0.5, with_lm=False), only_router * 0.5)
        metrics = take_router_metrics(model)
    finally:
        set_router_loss_scale(1.0)
    per_layer = {f"moe_load_max_mean/layer_{i}" for i in (1, 2, 3)}  # the routed blocks, each on its own
    assert set(metrics) == {"moe_aux_loss", "moe_z_loss", "moe_load_max_mean", "moe_dropped", *per_layer}
    mean = {name: total / count for name, (total, count) in metrics.items()}
    assert mean["moe_dropped"] == 0.0 and mean["moe_load_max_mean"] >= 1.0
    assert sum(mean[k] for k in per_layer) / 3 == pytest.approx(mean["moe_load_max_mean"])
    assert metrics["moe_aux_loss"][1] == 2 * 3  # two forwards through each of the 3 routed blocks
    assert 1.0 < mean["moe_aux_loss"] < 2 * cfg.model.moe.top_k  # k under perfect balance
    assert all(count == 0 for _total, count in take_router_metrics(model).values())  # taken: reset
    with torch.no_grad():  # evaluation (and the checkpoint's probe) is not the training step's routing
        model.eval()(tokens)
    assert all(count == 0 for _total, count in take_router_metrics(model.train()).values())


@pytest.mark.unit
def test_capacity_factor_drops_the_copies_over_capacity_in_token_order_and_counts_them():
    from fm_train.families.qwen3_moe.model import _within_capacity, take_router_metrics

    flat = torch.tensor([0, 1, 0, 0, 2, 0, 1])
    assert _within_capacity(flat, 3, 2).tolist() == [True, True, True, False, True, False, True]
    model = built(moe_config(capacity_factor=1.0, top_k=2))
    model(torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(2)))
    dropped, routed = take_router_metrics(model)["moe_dropped"]
    assert 0.0 < dropped / routed < 0.5  # an untrained router is never balanced


def _ep_check(seed: int) -> list[float]:
    import torch.distributed as dist

    from fm_train.families.qwen3_moe.model import Experts, SparseMoeBlock
    from fm_train.parallel.expert_parallel import EPGroup, apply_expert_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = moe_config(experts=8, top_k=3)
    model = built(cfg)
    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    x = torch.randn(world, 24, cfg.model.hidden, generator=torch.Generator().manual_seed(seed))
    # One process: both ranks' rows through the whole block, each row's output with its own gradient.
    full = block(x.clone().requires_grad_())
    (full * torch.arange(full.numel()).view_as(full).sin()).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in block.experts.named_parameters()}
    block.zero_grad()
    apply_expert_parallel(model, EPGroup(dist.group.WORLD, rank, world), (Experts,))
    mine = x[rank].clone().requires_grad_()
    out = block(mine)
    weight = torch.arange(full.numel()).view_as(full).sin()[rank]
    (out * weight).sum().backward()
    torch.testing.assert_close(out, full[rank].detach(), rtol=1e-5, atol=1e-6)
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for name, p in block.experts.named_parameters():
        assert p.shape[0] == 8 // world
        torch.testing.assert_close(p.grad, want_grads[name][local], rtol=1e-5, atol=1e-6)
    return [float(out.abs().sum())]


@pytest.mark.multiproc
def test_expert_parallel_dispatch_computes_what_one_process_computes_forward_and_backward():
    run_distributed(_ep_check, 2, args=(3,))
