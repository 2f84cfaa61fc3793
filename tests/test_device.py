"""The GPU path's decisions, checked on a CPU: device and backend choice, precision rules, SDPA
backends, fused AdamW in the DeepSpeed config, peak table, MFU, the meter's clock, the bench's rules."""

from __future__ import annotations

import json
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
                                                  "weight_decay": 0.1, "torch_adam": True, "fused": True}},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False, "checkpoint": {"load_universal": False},
    }
    assert deepspeed_config(cfg, accelerator="cpu") == want
    assert deepspeed_config(cfg) == want  # this machine has no GPU: detection says cpu


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gpu_config_overlaps_zero1_2_reduction_and_both_fuse_adamw(tiny_config_dict, stage):
    cfg = _cfg(tiny_config_dict, f"parallel.zero_stage={stage}", "precision=bf16")
    gpu, cpu = deepspeed_config(cfg, accelerator="cuda"), deepspeed_config(cfg, accelerator="cpu")
    assert gpu["optimizer"] == cpu["optimizer"] and cpu["optimizer"]["params"]["fused"] is True
    assert gpu["zero_optimization"].get("overlap_comm") is (True if stage in (1, 2) else None)
    assert {k: v for k, v in gpu.items() if k not in ("optimizer", "zero_optimization")} == \
        {k: v for k, v in cpu.items() if k not in ("optimizer", "zero_optimization")}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32_where_deepspeed_can(tiny_config_dict, stage):
    cfg = _cfg(tiny_config_dict, f"parallel.zero_stage={stage}", "precision=bf16")
    assert deepspeed_config(cfg, accelerator="cpu").get("data_types") == (
        None if stage == 0 else {"grad_accum_dtype": "fp32"})
    chosen = _cfg(tiny_config_dict, f"parallel.zero_stage={stage}", "precision=bf16", "train.grad_accum_dtype=bf16")
    assert deepspeed_config(chosen, accelerator="cpu").get("data_types") == (
        None if stage == 0 else {"grad_accum_dtype": "bf16"})
    assert "data_types" not in deepspeed_config(_cfg(tiny_config_dict, f"parallel.zero_stage={stage}"),
                                                accelerator="cpu")


def test_offloaded_optimizer_states_step_fused_on_the_cpu(tiny_config_dict):
    cfg = _cfg(tiny_config_dict, "parallel.offload_optimizer=true")
    zero = deepspeed_config(cfg, accelerator="cuda")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert deepspeed_config(cfg, accelerator="cuda")["optimizer"]["params"]["fused"] is True


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


# ---- the bench's pure rules (bench/gpu_mfu_common.py) and its harness on CPU ---------------------

def test_bench_measures_pairs_eager_first():
    names = [c.name for c in gpu_mfu_common.contenders()]
    assert names == ["reference eager", "fm-train eager", "reference compiled", "fm-train compiled"]
    assert [c.name for c in gpu_mfu_common.contenders([True])] == ["reference compiled", "fm-train compiled"]


def test_step_down_keeps_the_tokens_per_step():
    Split = gpu_mfu_common.Split
    assert gpu_mfu_common.step_down(Split(8, 8)) == Split(4, 16)
    assert gpu_mfu_common.step_down(Split(4, 16)) == Split(2, 32)
    assert gpu_mfu_common.step_down(Split(6, 1)) == Split(3, 2)  # the largest divisor below, not half
    assert gpu_mfu_common.step_down(Split(3, 1)) == Split(1, 3)
    assert gpu_mfu_common.step_down(Split(1, 64)) is None


def test_out_of_memory_is_recognised_in_any_spelling():
    assert gpu_mfu_common.is_oom("oom")
    assert gpu_mfu_common.is_oom("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert gpu_mfu_common.is_oom("RuntimeError: CUDA error: out of memory")
    assert not gpu_mfu_common.is_oom("timeout: killed after 120 s")
    assert not gpu_mfu_common.is_oom("skipped: 30 s left of the --max-minutes budget")


def test_timed_steps_fit_the_time_left():
    assert gpu_mfu_common.timed_steps(3, step_s=2.0, left_s=100.0) == 3
    assert gpu_mfu_common.timed_steps(3, step_s=2.0, left_s=5.0) == 2
    assert gpu_mfu_common.timed_steps(3, step_s=2.0, left_s=1.5) == 0
    assert gpu_mfu_common.timed_steps(3, step_s=2.0, left_s=-4.0) == 0


def test_budget_grants_a_capped_share_and_refuses_without_the_need():
    now = [0.0]
    budget = gpu_mfu_common.Budget(420.0, clock=lambda: now[0])
    assert budget.grant(need_s=100, cap_s=210) == 210
    now[0] = 300.0
    assert budget.grant(need_s=100, cap_s=210) == 120  # never past the bench's own deadline
    assert budget.grant(need_s=45, cap_s=120) == 120
    now[0] = 350.0
    assert budget.grant(need_s=100, cap_s=210) is None and budget.grant(need_s=45, cap_s=120) == 70


def _fake_measure(oom_above: dict[str, int], calls: list[tuple[str, int, int]]):
    def measure(run, split):
        calls.append((run.name, split.micro_batch, split.grad_accum))
        if split.micro_batch > oom_above.get(run.name, 10**6):
            return {"error": "Traceback\ntorch.OutOfMemoryError: CUDA out of memory."}
        return {"name": run.name, "kind": run.kind, "compiled": run.compiled, "micro_batch": split.micro_batch,
                "grad_accum": split.grad_accum, "tokens_per_s_per_gpu": 1000.0 * (2 if run.kind == "fm_train" else 1)}
    return measure


def test_an_oom_steps_both_contenders_down_and_measures_the_earlier_one_again():
    calls: list[tuple[str, int, int]] = []
    results, notes = gpu_mfu_common.measure_all(gpu_mfu_common.contenders(), gpu_mfu_common.Split(8, 8),
                                                _fake_measure({"fm-train eager": 4}, calls))
    assert calls == [("reference eager", 8, 8), ("fm-train eager", 8, 8), ("fm-train eager", 4, 16),
                     ("reference eager", 4, 16), ("reference compiled", 4, 16), ("fm-train compiled", 4, 16)]
    assert [(r["name"], r["micro_batch"], r["grad_accum"]) for r in results] == [
        ("reference eager", 4, 16), ("fm-train eager", 4, 16), ("reference compiled", 4, 16), ("fm-train compiled", 4, 16)]
    assert len(notes) == 1 and "fm-train eager ran out of memory at micro-batch 8" in notes[0]
    assert gpu_mfu_common.ratios(results) == {"eager": 2.0, "compiled": 2.0}


def test_an_oom_at_micro_batch_one_is_an_error_and_the_rest_still_run():
    calls: list[tuple[str, int, int]] = []
    results, _ = gpu_mfu_common.measure_all(gpu_mfu_common.contenders([False]), gpu_mfu_common.Split(2, 1),
                                            _fake_measure({"reference eager": 0}, calls))
    assert calls == [("reference eager", 2, 1), ("reference eager", 1, 2), ("fm-train eager", 1, 2)]
    assert "out of memory even at micro-batch 1" in results[0]["error"] and results[1]["micro_batch"] == 1
    assert gpu_mfu_common.ratios(results) == {"eager": None, "compiled": None}


def test_ratios_only_between_runs_at_the_same_split():
    ref = {"kind": "reference", "compiled": False, "micro_batch": 8, "grad_accum": 8, "tokens_per_s_per_gpu": 100.0}
    fm = {**ref, "kind": "fm_train", "tokens_per_s_per_gpu": 90.0}
    assert gpu_mfu_common.ratios([ref, fm])["eager"] == pytest.approx(0.9)
    assert gpu_mfu_common.ratios([ref, {**fm, "micro_batch": 4, "grad_accum": 16}])["eager"] is None


def test_bench_throughput_figures():
    got = gpu_mfu_common.throughput(tokens_per_step=8 * 2048, steps=10, seconds=2.0, gpus=2, flops_per_token=7e9,
                                    measured_peak=700e12, table_peak=989e12)
    assert got["tokens_per_s_per_gpu"] == pytest.approx(8 * 2048 * 10 / 2.0 / 2)
    assert got["tflops_per_gpu"] == pytest.approx(got["tokens_per_s_per_gpu"] * 7e9 / 1e12)
    assert got["mfu_measured"] == pytest.approx(got["tflops_per_gpu"] * 1e12 / 700e12)
    assert got["mfu_table"] == pytest.approx(got["tflops_per_gpu"] * 1e12 / 989e12)
    assert gpu_mfu_common.throughput(tokens_per_step=1, steps=1, seconds=1.0, gpus=1, flops_per_token=1.0,
                                     measured_peak=1.0, table_peak=None)["mfu_table"] is None


def test_summary_names_figures_ratios_goals_and_failures():
    ok = {"name": "fm-train eager", "kind": "fm_train", "compiled": False, "micro_batch": 8, "grad_accum": 8,
          "tokens_per_s_per_gpu": 50_000.0, "mfu_table": 0.37, "mfu_measured": 0.5, "peak_mem_gib": 41.0}
    skipped = {"name": "fm-train compiled", "error": "skipped: 20 s left of the --max-minutes budget, this run"
                                                     " needs about 100 s"}
    text = gpu_mfu_common.summary("NVIDIA H100 80GB HBM3", [ok, skipped], {"eager": 1.05, "compiled": None},
                                  ["a step-down note"])
    assert "\n" not in text and text.startswith("summary: NVIDIA H100 80GB HBM3:")
    assert "50,000 tokens/s/GPU, MFU 37.0% of the data sheet (50.0% of measured matmul peak)" in text
    assert "eager/eager = 1.050 (goal >= 1.0)" in text and "compiled/compiled = n/a" in text
    assert "fm-train compiled: skipped: 20 s left" in text and "best fm-train MFU 37.0% (goal >= 45%)" in text
    assert text.endswith("a step-down note")


def test_bench_skips_cleanly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the skip path is for machines without one")
    assert gpu_mfu.main(["--max-minutes", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu_mfu: skipped: no CUDA GPU visible")


@pytest.mark.multiproc
def test_bench_cpu_smoke_runs_the_whole_harness(tmp_path, capsys):
    """``--cpu-smoke``: the recipe's config path, the probe, the transformers reference and fm-train's engine,
    each eager and compiled (``aot_eager``), each in a fresh process, the report, ratios, summary and JSON.

    What only a GPU can run, and this test therefore does not: bf16 on the 1.1B shape, Inductor/Triton
    kernels (here the compile stops at tracing), torch's fused AdamW on CUDA, NCCL, the CUDA-event matmul
    probe and the data-sheet peak of a real card, CUDA peak memory, and a real out-of-memory (the step-down
    is covered by the fake-measure tests above)."""
    out_json = tmp_path / "smoke.json"
    assert gpu_mfu.main(["--cpu-smoke", "--warmup", "1", "--steps", "1", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out_json.read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["reference eager", "fm-train eager", "reference compiled", "fm-train compiled"]
    for run in runs.values():
        assert "error" not in run, run.get("error")
        assert run["steps"] == 1 and run["tokens_per_step"] == 2 * 2 * 64 and run["tokens_per_s_per_gpu"] > 0
        assert run["mfu_measured"] > 0 and run["mfu_table"] is None  # no data-sheet peak for a CPU
        assert 8.0 < run["loss"] < 10.0  # ln(8192) = 9.01 at the start: both train the same tiny shape
    # The reference is the same shape as fm-train's model, parameter for parameter.
    assert runs["reference eager"]["parameters"] == runs["fm-train eager"]["parameters"]
    assert runs["fm-train compiled"]["compile"] and runs["reference compiled"]["compile"] == "each LlamaDecoderLayer"
    assert runs["reference compiled"]["compiled_graphs"] >= 1 and runs["fm-train compiled"]["compiled_graphs"] >= 1
    assert runs["fm-train eager"]["ops_built_during_run"] == []
    assert set(report["ratios"]) == {"eager", "compiled"} and all(v > 0 for v in report["ratios"].values())
    assert lines[-1] == report["summary"] and lines[-1].startswith("summary: cpu: reference eager")
