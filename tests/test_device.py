"""The GPU path's decisions, checked on a CPU: device and backend choice, precision rules, SDPA
backends, fused AdamW in the DeepSpeed config, peak table, MFU, the meter's clock, the bench's rules."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from fm_train.config import build_config
from fm_train.dist.device import (
    DeviceError,
    attention_context,
    choose_device,
    precision_warning,
    sdpa_backends,
    use_fused_adamw,
)
from fm_train.engine.flops import mfu, table_peak_flops
from fm_train.engine.meter import WallClock, interval_clock
from fm_train.families import family_of
from fm_train.parallel.deepspeed_config import deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_mfu  # noqa: E402
import gpu_mfu_common  # noqa: E402

pytestmark = pytest.mark.unit


# ---- device and backend ------------------------------------------------------------------------

def test_no_gpu_means_cpu_and_gloo():
    for available, count in ((False, 0), (True, 0)):
        choice = choose_device(cuda_available=available, device_count=count, local_rank=3)
        assert (choice.accelerator, choice.backend, choice.index) == ("cpu", "gloo", None)
        assert choice.device == torch.device("cpu")


def test_each_local_rank_takes_its_own_gpu_with_nccl():
    choices = [choose_device(cuda_available=True, device_count=8, local_rank=r) for r in range(8)]
    assert [c.device for c in choices] == [torch.device("cuda", r) for r in range(8)]
    assert {c.backend for c in choices} == {"nccl"} and {c.accelerator for c in choices} == {"cuda"}


def test_one_visible_gpu_is_cuda0_whatever_the_local_rank():
    assert choose_device(cuda_available=True, device_count=1, local_rank=5).index == 0


def test_more_ranks_than_visible_gpus_is_an_error_not_a_shared_gpu():
    with pytest.raises(DeviceError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
        choose_device(cuda_available=True, device_count=2, local_rank=3)


# ---- precision ---------------------------------------------------------------------------------

def test_bf16_on_a_gpu_without_it_is_refused_with_the_fix():
    with pytest.raises(DeviceError, match=r"precision=bf16 but Tesla V100.*precision=fp16"):
        precision_warning("bf16", "cuda", bf16_native=False, device_name="Tesla V100-SXM2-16GB")
    assert precision_warning("bf16", "cuda", bf16_native=True) is None
    assert precision_warning("fp16", "cuda", bf16_native=False) is None


def test_bf16_on_a_cpu_runs_but_warns_without_native_support():
    assert "slow" in precision_warning("bf16", "cpu", bf16_native=False)
    assert precision_warning("bf16", "cpu", bf16_native=True) is None
    assert precision_warning("fp32", "cpu", bf16_native=False) is None


# ---- attention kernels -------------------------------------------------------------------------

def test_gpu_prefers_flash_and_keeps_math_as_fallback_cpu_keeps_torch_default():
    gpu = sdpa_backends("cuda")
    assert gpu[0] == SDPBackend.FLASH_ATTENTION and gpu[-1] == SDPBackend.MATH
    assert {SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION} <= set(gpu)
    assert sdpa_backends("cpu") is None


def test_attention_context_sets_and_restores_torch_sdpa_flags():
    before = torch._C._get_sdp_priority_order()
    with attention_context("cuda"):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[:4] == [int(b) for b in sdpa_backends("cuda")]
    assert torch._C._get_sdp_priority_order() == before
    with attention_context("cpu"):  # nothing changes on a CPU: its numerics stay what they were
        assert torch._C._get_sdp_priority_order() == before


# ---- DeepSpeed config --------------------------------------------------------------------------

def _cfg(base: dict, *overrides: str):
    return build_config(base, list(overrides))


def test_cpu_config_is_unchanged(tiny_config_dict):
    cfg = _cfg(tiny_config_dict)
    want = {
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 2, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1, "torch_adam": True}},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False, "checkpoint": {"load_universal": False},
    }
    assert deepspeed_config(cfg, accelerator="cpu") == want
    assert deepspeed_config(cfg) == want  # this machine has no GPU: detection says cpu


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gpu_config_fuses_adamw_and_overlaps_zero2_reduction(tiny_config_dict, stage):
    cfg = _cfg(tiny_config_dict, f"parallel.zero_stage={stage}", "precision=bf16")
    gpu, cpu = deepspeed_config(cfg, accelerator="cuda"), deepspeed_config(cfg, accelerator="cpu")
    assert gpu["optimizer"]["params"] == {**cpu["optimizer"]["params"], "fused": True}
    assert gpu["zero_optimization"].get("overlap_comm") is (True if stage == 2 else None)
    assert {k: v for k, v in gpu.items() if k not in ("optimizer", "zero_optimization")} == \
        {k: v for k, v in cpu.items() if k not in ("optimizer", "zero_optimization")}


def test_offloaded_optimizer_states_are_never_fused(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, "parallel.offload_optimizer=true")
    assert "fused" not in deepspeed_config(cfg, accelerator="cuda")["optimizer"]["params"]
    assert use_fused_adamw("cuda", offload_optimizer=False) and not use_fused_adamw("cpu", offload_optimizer=False)


def test_compile_switch_defaults_off_and_validates(tiny_config_dict):
    assert _cfg(tiny_config_dict).parallel.compile is False
    assert _cfg(tiny_config_dict, "parallel.compile=true").parallel.compile is True


# ---- peak table and MFU ------------------------------------------------------------------------

@pytest.mark.parametrize("name,bf16,fp32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 67e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12, 51e12),
    ("NVIDIA H100 NVL", 835e12, 60e12),
    ("NVIDIA H200", 989e12, 67e12),
    ("NVIDIA H200 NVL", 835e12, 60e12),
    ("NVIDIA GH200 480GB", 989e12, 67e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 19.5e12),
    ("NVIDIA A10", 125e12, 31.2e12),
    ("NVIDIA L40S", 362e12, 91.6e12),
])
def test_peak_table_lookup(name, bf16, fp32):
    assert table_peak_flops(name, "bf16") == bf16 and table_peak_flops(name, "fp16") == bf16
    assert table_peak_flops(name, "fp32") == fp32


def test_unknown_device_has_no_table_peak():
    assert table_peak_flops("Some Future Accelerator", "bf16") is None


def test_mfu_of_the_1b_preset_by_hand():
    shape = build_config({"model": {"preset": "1.1b"}}).model
    h, f, kv, layers, vocab, seq = 2048, 5632, 256, 22, 32000, 2048
    n_matmul = layers * (2 * h * h + 2 * h * kv + 3 * h * f) + h * vocab  # q,o + k,v + gate,up,down; head
    want = 6 * n_matmul + 12 * layers * h * seq
    assert family_of(shape).sizes.flops_per_token(shape, seq) == want
    # 30k tokens/s on one H100 SXM: 30e3 * 7.31e9 / 989e12 = 22.2 %.
    assert mfu(30_000, want, 989e12) == pytest.approx(30_000 * want / 989e12)
    assert 0.21 < mfu(30_000, want, 989e12) < 0.23
    assert mfu(30_000, want, 0.0) == 0.0


# ---- the meter's clock -------------------------------------------------------------------------

def test_wall_clock_leaves_paused_time_out():
    clock = interval_clock(torch.device("cpu"))
    assert isinstance(clock, WallClock)
    time.sleep(0.05)
    with clock.paused():
        time.sleep(0.3)
    assert 0.04 < clock.elapsed_s() < 0.25


# ---- the bench's pure rules --------------------------------------------------------------------

def test_micro_batch_search_takes_the_largest_before_the_first_oom():
    tried: list[int] = []

    def fits(limit: int):
        def check(mb: int) -> bool:
            tried.append(mb)
            return mb <= limit
        return check

    assert gpu_mfu_common.pick_micro_batch([8, 1, 4, 2], fits(4)) == 4
    assert tried == [1, 2, 4, 8]  # ascending, and 8 is the one that failed
    tried.clear()
    assert gpu_mfu_common.pick_micro_batch([1, 2, 4, 8], fits(100)) == 8
    assert gpu_mfu_common.pick_micro_batch([1, 2, 4, 8], fits(0)) is None
    tried.clear()
    # Stops at the first failure: a larger size is not tried after an out-of-memory.
    assert gpu_mfu_common.pick_micro_batch([1, 2, 4, 8], lambda mb: tried.append(mb) or mb != 2) == 1
    assert tried == [1, 2]


def test_next_smaller_micro_batch():
    assert gpu_mfu_common.next_smaller([1, 2, 4, 8], 8) == 4
    assert gpu_mfu_common.next_smaller([1, 2, 4, 8], 1) is None


def test_bench_throughput_figures():
    got = gpu_mfu.throughput(tokens_per_step=8 * 2048, steps=10, seconds=2.0, gpus=2, flops_per_token=7e9,
                             measured_peak=700e12, table_peak=989e12)
    assert got["tokens_per_s_per_gpu"] == pytest.approx(8 * 2048 * 10 / 2.0 / 2)
    assert got["tflops_per_gpu"] == pytest.approx(got["tokens_per_s_per_gpu"] * 7e9 / 1e12)
    assert got["mfu_measured"] == pytest.approx(got["tflops_per_gpu"] * 1e12 / 700e12)
    assert got["mfu_table"] == pytest.approx(got["tflops_per_gpu"] * 1e12 / 989e12)
    assert gpu_mfu.throughput(tokens_per_step=1, steps=1, seconds=1.0, gpus=1, flops_per_token=1.0,
                              measured_peak=1.0, table_peak=None)["mfu_table"] is None


def test_bench_layouts_per_gpu_count():
    assert gpu_mfu.multi_gpu_runs(1, zero=2) == []
    runs = {r.name: r for r in gpu_mfu.multi_gpu_runs(8, zero=2)}
    assert runs["fm-train dp8"].world == 8 and runs["fm-train dp8"].zero == 2
    assert (runs["fm-train tp2"].world, runs["fm-train tp2"].tp) == (2, 2)
    pp = runs["fm-train pp2"]
    assert (pp.world, pp.pp, pp.zero, pp.grad_accum) == (2, 2, 1, 4)  # DeepSpeed: ZeRO <= 1 with a pipeline


def test_bench_skips_cleanly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the skip path is for machines without one")
    assert gpu_mfu.main(["--max-minutes", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu_mfu: skipped: no CUDA GPU visible")
