"""Single-process checks of the engine's parts: schedule, decay groups, DeepSpeed JSON, MFU, metrics."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from fm_train.config import build_config
from fm_train.engine import MetricsSink, TrainState, apply_activation_checkpointing, build_lr_scheduler, format_line, lr_at
from fm_train.engine.flops import mfu, peak_flops, table_peak_flops
from fm_train.engine.param_groups import weight_decay_groups
from fm_train.engine.train_module import build_train_module
from fm_train.families import family_of
from fm_train.parallel.deepspeed_config import deepspeed_config

pytestmark = pytest.mark.unit


def _cfg(base: dict, *overrides: str):
    return build_config(base, list(overrides))


# ---- LR schedule ---------------------------------------------------------------------------------

def test_cosine_schedule_shape(tiny_config_dict):
    o = _cfg(tiny_config_dict, "optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4", "train.steps=104").optim
    lrs = [lr_at(s, o, 104) for s in range(110)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup, never 0
    assert lrs[4] == pytest.approx(1.0)  # decay starts from the peak
    assert lrs[54] == pytest.approx(0.55, abs=0.01)  # cosine midpoint = (lr + min_lr) / 2
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    assert lrs[103] == pytest.approx(0.1) and lrs[109] == pytest.approx(0.1)  # min_lr at the last step and after


def test_linear_and_constant_schedules(tiny_config_dict):
    lin = _cfg(tiny_config_dict, "optim.lr=1.0", "optim.min_lr=0.0", "optim.warmup_steps=0", "optim.schedule=linear",
               "train.steps=11").optim
    assert [lr_at(s, lin, 11) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = _cfg(tiny_config_dict, "optim.lr=1.0", "optim.warmup_steps=2", "optim.schedule=constant").optim
    assert [lr_at(s, const, 10) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_lambda_scheduler_follows_lr_at_and_resumes_from_train_state(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, "optim.lr=0.01", "optim.min_lr=0.001", "optim.warmup_steps=3", "train.steps=20")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optim.lr)
    sched = build_lr_scheduler(opt, cfg.optim, 20)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg.optim, 20) for s in range(7)])
    saved = TrainState(step=7, tokens_seen=123, data_state={"pos": 5}, data_receipt="ab", lr_scheduler=sched).state_dict()
    json.dumps({k: v for k, v in saved.items() if k != "lr_scheduler"})  # the plain part is JSON-friendly

    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optim.lr)
    restored = TrainState(lr_scheduler=build_lr_scheduler(opt2, cfg.optim, 20))
    restored.load_state_dict(saved)
    assert (restored.step, restored.tokens_seen, restored.data_state, restored.data_receipt) == (7, 123, {"pos": 5}, "ab")
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(7, cfg.optim, 20))


# ---- weight decay groups -------------------------------------------------------------------------

def test_no_decay_on_norms_and_biases(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, "model.qkv_bias=true")
    module = build_train_module(cfg, family_of(cfg.model))
    decay, no_decay = weight_decay_groups(module, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" not in n and not n.endswith(".bias") for n in decay["names"])
    assert any(n.endswith("q_proj.bias") for n in no_decay["names"])
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])
    # Every trainable parameter exactly once; the tied embedding/head is one tensor.
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters()) and len(ids) == len(set(ids))
    assert "model.model.embed_tokens.weight" in decay["names"]


# ---- DeepSpeed JSON ------------------------------------------------------------------------------

def test_deepspeed_config_batch_and_optimizer(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, "cluster.workers=2", "train.micro_batch=3", "train.grad_accum=4",
               "optim.grad_clip=0.5", "precision=bf16")
    ds = deepspeed_config(cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 3, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["steps_per_print"] > 10**9 and ds["wall_clock_breakdown"] is False


def test_zero3_keeps_as_much_gathered_as_the_memory_budget_holds(tiny_config_dict):
    from fm_train.deepspeed_adapter.settings import Zero3Gathered
    from fm_train.plan.memory import GIB, estimate_memory, zero3_gathered

    cfg = _cfg(tiny_config_dict, "parallel.zero_stage=3", "model.n_layers=6")
    family = family_of(cfg.model)
    block_params = family.sizes.block_params(cfg.model)
    two = Zero3Gathered.blocks(block_params, 2)
    base = estimate_memory(cfg, family, device="gpu", zero3=two).device_total / GIB
    assert estimate_memory(cfg, family, device="gpu") == estimate_memory(cfg, family, device="gpu", zero3=two)
    assert zero3_gathered(cfg, family, device="gpu", budget_gib=None) == two  # no budget known: the minimum
    assert zero3_gathered(cfg, family, device="gpu", budget_gib=base * 0.9) == two  # never below two blocks
    block = block_params * 4 / GIB  # fp32 bytes of one gathered block
    four = Zero3Gathered.blocks(block_params, 4)
    assert zero3_gathered(cfg, family, device="gpu", budget_gib=base + 2.5 * block) == four
    assert estimate_memory(cfg, family, device="gpu", zero3=four).device_total / GIB <= base + 2.5 * block
    # Room for all: the whole model, embedding and head included, each parameter gathered once per step.
    whole = zero3_gathered(cfg, family, device="gpu", budget_gib=base + 1)
    assert whole == Zero3Gathered.whole(family.sizes.stage_params(cfg))
    assert whole.max_live > 6 * block_params and whole.reuse_distance == 3 * whole.max_live
    assert whole.reduce_bucket is None  # a GPU overlaps the reduce-scatters with backward: hidden^2 buckets
    assert estimate_memory(cfg, family, device="gpu", zero3=whole).device_total / GIB <= base + 1
    assert zero3_gathered(_cfg(tiny_config_dict, "parallel.zero_stage=2"), family, device="gpu", budget_gib=99) == two
    # On a CPU (gloo: nothing to overlap) the stage's gradients go in one reduce-scatter (a small stage) or in
    # CPU_REDUCE_BUCKET-element ones; the planner counts the bucket's copies alive while it is reduced.
    from fm_train.deepspeed_adapter.settings import CPU_REDUCE_BUCKET, REDUCE_BUCKET_COPIES

    cpu_base = estimate_memory(cfg, family, device="cpu", zero3=two).device_total / GIB
    cpu = zero3_gathered(cfg, family, device="cpu", budget_gib=cpu_base + 1)
    assert cpu == Zero3Gathered.whole(whole.max_live, cpu=True) and cpu.reduce_bucket == whole.max_live
    bucket = REDUCE_BUCKET_COPIES * whole.max_live * 4 / GIB
    assert (estimate_memory(cfg, family, device="cpu", zero3=cpu).device_total
            - estimate_memory(cfg, family, device="cpu", zero3=whole).device_total) / GIB == pytest.approx(bucket)
    assert Zero3Gathered.whole(10 * CPU_REDUCE_BUCKET, cpu=True).reduce_bucket == CPU_REDUCE_BUCKET
    # The engine's rendering: this host's budget (its memory over LOCAL_WORLD_SIZE ranks) holds the whole model.
    from fm_train.engine.build import memory_budget_gib, rendered_deepspeed_config

    assert memory_budget_gib(cfg) > cpu_base + 1
    rendered = rendered_deepspeed_config(cfg, family)["zero_optimization"]
    assert rendered == deepspeed_config(cfg, zero3_gathered=cpu)["zero_optimization"]
    assert (rendered["stage3_max_live_parameters"], rendered["stage3_max_reuse_distance"],
            rendered["reduce_bucket_size"]) == cpu
    assert rendered_deepspeed_config(cfg)["zero_optimization"] == deepspeed_config(cfg)["zero_optimization"]  # no family: 2
    default = deepspeed_config(cfg)["zero_optimization"]
    assert (default["stage3_max_live_parameters"], default["stage3_max_reuse_distance"]) == two[:2]
    assert default["reduce_bucket_size"] == cfg.model.hidden ** 2
    assert two.reuse_distance == block_params  # across one block's recompute and backward
    assert (four.max_live, four.reuse_distance) == (4 * block_params, 3 * block_params)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_zero_sections(tiny_config_dict, stage):
    ds = deepspeed_config(_cfg(tiny_config_dict, f"parallel.zero_stage={stage}"))
    assert ds["zero_optimization"]["stage"] == stage and "offload_optimizer" not in ds["zero_optimization"]
    if stage:
        off = deepspeed_config(_cfg(tiny_config_dict, f"parallel.zero_stage={stage}", "parallel.offload_optimizer=true"))
        assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_deepspeed_config_precisions(tiny_config_dict):
    fp16 = deepspeed_config(_cfg(tiny_config_dict, "precision=fp16"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    fp32 = deepspeed_config(_cfg(tiny_config_dict, "precision=fp32"))
    assert "bf16" not in fp32 and "fp16" not in fp32


def test_deepspeed_parses_the_rendered_config(tiny_config_dict):
    from deepspeed.runtime.config import DeepSpeedConfig

    for overrides in (["cluster.workers=1", "precision=bf16", "parallel.zero_stage=3", "train.grad_accum=2"],
                      ["cluster.workers=1", "precision=fp16", "parallel.zero_stage=1", "parallel.offload_optimizer=true"]):
        parsed = DeepSpeedConfig(deepspeed_config(_cfg(tiny_config_dict, *overrides)))
        assert parsed.train_batch_size == parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps
        assert parsed.zero_optimization_stage == int(overrides[2].split("=")[1])


# ---- FLOPs and MFU -------------------------------------------------------------------------------

def test_peak_table_and_mfu(monkeypatch):
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak_flops("NVIDIA H200", "fp16") == 989e12
    assert table_peak_flops("NVIDIA A10", "bf16") == 125e12
    assert table_peak_flops("Some Future Chip", "bf16") is None
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    monkeypatch.setenv("FM_TRAIN_PEAK_FLOPS", "2.5e12")
    assert peak_flops(torch.device("cpu"), "fp32") == (2.5e12, "env")


def test_cpu_peak_is_measured(monkeypatch):
    monkeypatch.delenv("FM_TRAIN_PEAK_FLOPS", raising=False)
    peak, source = peak_flops(torch.device("cpu"), "fp32")
    assert source == "measured" and 1e8 < peak < 1e14


# ---- metrics sink --------------------------------------------------------------------------------

def test_metrics_sink_writes_line_jsonl_and_tensorboard(tmp_path):
    out = io.StringIO()
    sink = MetricsSink(tmp_path, enabled=True, stream=out)
    record = {"step": 3, "loss": 4.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 12345.0,
              "tokens_per_s_per_device": 6172.5, "mfu": 0.41, "step_time_s": 0.2, "peak_mem_gib": 1.5,
              "data_receipt": "0123456789abcdef"}
    sink.write(record)
    sink.write({"step": 3, "val_loss": 4.75})
    sink.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("step 3 | loss 4.5000 | lr 1.00e-03 | gnorm 0.700 | tok/s 12,345 | tok/s/dev 6,172 | mfu 41.00%"
                        " | step 0.200s | mem 1.50GiB | data 0123456789ab")
    assert lines[1] == "step 3 | val_loss 4.7500"
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [record, {"step": 3, "val_loss": 4.75}]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_metrics_sink_off_rank_writes_nothing(tmp_path):
    out = io.StringIO()
    sink = MetricsSink(tmp_path / "run", enabled=False, stream=out)
    sink.write({"step": 1, "loss": 1.0})
    sink.close()
    assert out.getvalue() == "" and not (tmp_path / "run").exists()
    assert format_line({"step": 2, "loss": 1.0, "grad_norm": None}) == "step 2 | loss 1.0000"


# ---- activation checkpointing --------------------------------------------------------------------

def test_activation_checkpointing_keeps_names_and_gradients(tiny_config_dict):
    cfg = _cfg(tiny_config_dict)
    family = family_of(cfg.model)
    plain, ckpt = build_train_module(cfg, family), build_train_module(cfg, family)
    blocks = family.modules().block_types
    assert apply_activation_checkpointing(ckpt, blocks) == cfg.model.n_layers
    assert apply_activation_checkpointing(ckpt, blocks) == 0  # idempotent
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    saved = {}
    for key, m in (("plain", plain), ("ckpt", ckpt)):
        count = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(tokens[:, :-1], tokens[:, 1:])
        saved[key] = count[0]
        loss.backward()
    # The blocks' activations are recomputed, not kept: far fewer tensors saved for backward.
    assert saved["ckpt"] < saved["plain"] / 2, saved
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    with torch.no_grad():  # eval path runs the block directly
        assert math.isfinite(ckpt(tokens[:, :-1], tokens[:, 1:]).item())


def test_recomputing_some_blocks_saves_in_between_with_the_same_gradients(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, "model.n_layers=4")
    family = family_of(cfg.model)
    blocks = family.modules().block_types
    models = {k: build_train_module(cfg, family) for k in ("plain", "first1", "first3", "all")}
    assert apply_activation_checkpointing(models["first1"], blocks, limit=1) == 1
    assert apply_activation_checkpointing(models["first3"], blocks, limit=3) == 3
    assert apply_activation_checkpointing(models["first3"], blocks, limit=3) == 0  # idempotent with a limit too
    assert apply_activation_checkpointing(models["all"], blocks) == 4
    wrapped = [i for i, b in enumerate(m for m in models["first3"].modules() if isinstance(m, blocks))
               if "forward" in vars(b)]
    assert wrapped == [0, 1, 2]  # the first blocks, in order
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    saved = {}
    for key, m in models.items():
        size = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            size[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(tokens[:, :-1], tokens[:, 1:])
        saved[key] = size[0]
        loss.backward()
    assert saved["plain"] > saved["first1"] > saved["first3"] > saved["all"], saved
    for key in ("first1", "first3", "all"):
        for (name, a), b in zip(models["plain"].named_parameters(), models[key].parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), (key, name)


def test_recompute_blocks_is_checked_and_planned_between_none_and_all(tiny_config_dict):
    from fm_train.config import ConfigError
    from fm_train.plan.memory import estimate_memory

    base = ("model.n_layers=4", "parallel.activation_checkpointing=true")
    acts = {n: estimate_memory(_cfg(tiny_config_dict, *base, f"parallel.recompute_blocks={n}"), family_of(
        _cfg(tiny_config_dict).model)).activations for n in (1, 2, 4)}
    none = estimate_memory(_cfg(tiny_config_dict, "model.n_layers=4"), family_of(_cfg(tiny_config_dict).model))
    every = estimate_memory(_cfg(tiny_config_dict, *base), family_of(_cfg(tiny_config_dict).model))
    assert none.activations > acts[1] > acts[2] > acts[4] == every.activations
    with pytest.raises(ConfigError, match=r"parallel.recompute_blocks=2 needs parallel.activation_checkpointing=true"):
        _cfg(tiny_config_dict, "parallel.recompute_blocks=2")
    with pytest.raises(ConfigError, match=r"parallel.recompute_blocks=3 exceeds the 2 blocks of a pipeline stage"):
        _cfg(tiny_config_dict, *base, "parallel.pp=2", "cluster.workers=2", "parallel.zero_stage=1",
             "parallel.recompute_blocks=3")


def test_wandb_without_the_package_is_a_config_error_on_every_rank(tmp_path, monkeypatch):
    import sys

    from fm_train.config import ConfigError
    from fm_train.engine.metrics import MetricsSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as without the package
    with pytest.raises(ConfigError, match=r"logging\.wandb=true, but the wandb package is not installed: pip install"
                                          r" 'fm-train\[wandb\]'"):
        MetricsSink(tmp_path, enabled=False, wandb={"project": "p", "name": "n", "config": {}})


def _stop_flags() -> tuple[bool, bool, bool]:
    import torch.distributed as dist

    from fm_train.engine.loop import any_rank

    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")  # what ParallelGroups.control is on an NCCL world
    cpu = torch.device("cpu")
    return any_rank(rank == 1, cpu, control), any_rank(False, cpu, control), any_rank(rank == 0, cpu)


@pytest.mark.multiproc
def test_a_stop_flag_on_one_rank_stops_every_rank() -> None:
    from distributed import run_distributed

    assert run_distributed(_stop_flags, 2) == [(True, False, True), (True, False, True)]


def test_goodput_counts_from_the_launch_across_attempts(tmp_path, monkeypatch):
    from fm_train.engine.goodput import Goodput

    monkeypatch.delenv("FM_TRAIN_LAUNCH_START_S", raising=False)
    alone = Goodput.for_run(tmp_path, 500, write=True)  # no launcher: from this worker's start, nothing written
    assert alone.tokens_at_start == 500 and not (tmp_path / "goodput.json").exists()

    monkeypatch.setenv("FM_TRAIN_LAUNCH_START_S", "1000.000")
    first = Goodput.for_run(tmp_path, 200, write=True)  # the launch's first attempt resumed at 200 tokens
    assert json.loads((tmp_path / "goodput.json").read_text()) == {"launch_start_s": 1000.0, "tokens_seen": 200}
    # A restart of the same launch resumed at 600 tokens: it still counts from the launch's 200.
    again = Goodput.for_run(tmp_path, 600, write=True)
    assert (again.started_s, again.tokens_at_start) == (first.started_s, 200) == (1000.0, 200)
    again._clock = lambda: 1100.0
    assert again.record(1200, tokens_per_s=20.0) == {"goodput_tokens_per_s": 10.0, "goodput": 0.5}
    # A new launch, or a damaged record: counts from itself.
    monkeypatch.setenv("FM_TRAIN_LAUNCH_START_S", "5000")
    assert Goodput.for_run(tmp_path, 1200, write=False).tokens_at_start == 1200
    (tmp_path / "goodput.json").write_text("[not a record")
    assert Goodput.for_run(tmp_path, 1300, write=True).tokens_at_start == 1300
