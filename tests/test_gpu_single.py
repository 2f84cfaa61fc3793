"""On one NVIDIA GPU: the automatic choices hold, and the worker trains over NCCL like on a CPU.

What a one-GPU machine can check of the GPU path: the device and backend choice, native bf16, the
flash kernel on the 1.1B preset's attention shape, fused AdamW inside the DeepSpeed engine, the
meter's CUDA-event clock, and a world-1 NCCL run of the real worker whose losses match the same run
on the CPU (gloo), fp32 and bf16. Skipped without a GPU (conftest).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.gpu

VOCAB, SEQ, STEPS = 512, 32, 6


def test_device_choice_on_this_machine():
    from fm_train.dist.device import bf16_native, detect_device

    choice = detect_device(local_rank=0)
    assert (choice.accelerator, choice.backend, choice.device) == ("cuda", "nccl", torch.device("cuda", 0))
    name = torch.cuda.get_device_name(0)
    if torch.cuda.get_device_capability(0) >= (8, 0):
        assert bf16_native("cuda"), name


def test_flash_attention_runs_the_1b_attention_shape():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("flash attention needs compute capability >= 8.0")
    q, k, v = (torch.randn(2, 32, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only flash: an unsupported shape raises here
        out = sdpa(q, k, v, is_causal=True)
        out.sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_event_clock_times_gpu_work_and_leaves_pauses_out():
    from fm_train.engine.meter import CudaEventClock, interval_clock

    device = torch.device("cuda", 0)
    a = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    clock = interval_clock(device)
    assert isinstance(clock, CudaEventClock)
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    with clock.paused():
        time.sleep(0.2)
    elapsed = clock.elapsed_s()
    assert 0 < elapsed <= wall + 1e-3
    assert elapsed > 0.5 * wall - 1e-3  # the matmuls dominate; the 0.2 s pause is not counted


def _engine_facts(raw: dict[str, Any]) -> dict[str, Any]:
    import deepspeed

    from fm_train.config import build_config
    from fm_train.engine import build_engine
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.env import RankEnv
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    init_distributed(RankEnv.from_environ())
    cfg = build_config(raw)
    engine, _ = build_engine(cfg, build_train_module(cfg, family_of(cfg.model)))
    return {"device": str(engine.device), "fused": engine.basic_optimizer.defaults.get("fused"),
            "overlap_comm": engine.zero_overlap_comm(), "accelerator": deepspeed.get_accelerator().device_name()}


def test_engine_on_gpu_uses_fused_adamw_and_overlapped_zero2(tiny_config_dict, tmp_path):
    raw = {**tiny_config_dict, "run": {**tiny_config_dict["run"], "dir": str(tmp_path)}, "cluster": {"workers": 1},
           "precision": "bf16", "parallel": {"tp": 1, "pp": 1, "zero_stage": 2}}
    facts = run_distributed(_engine_facts, 1, (raw,), init_process_group=False)[0]
    assert facts == {"device": "cuda:0", "fused": True, "overlap_comm": True, "accelerator": "cuda"}


def _worker(raw: dict[str, Any], cpu: bool) -> list[float]:
    if cpu:  # before anything touches CUDA: this rank must see no GPU, so fm-train and DeepSpeed pick the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from fm_train.config import build_config
    from fm_train.worker import run_worker

    assert run_worker(build_config(raw)) == 0
    lines = (Path(raw["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    data_shards = pytest.importorskip("data_shards")
    path = tmp_path_factory.mktemp("gpu_single") / "corpus"
    data_shards.build_default_corpus(path, vocab_size=VOCAB, seq_len=SEQ, workers=1, max_bytes=300_000)
    return path


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_one_gpu_worker_matches_the_cpu_run(corpus: Path, tmp_path: Path, precision: str, tol: float):
    def raw(where: str, prec: str) -> dict[str, Any]:
        return {"run": {"name": where, "dir": str(tmp_path / where), "seed": 5},
                "model": {"n_layers": 4, "hidden": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 344,
                          "vocab_size": VOCAB, "max_seq_len": 64, "tie_embeddings": True},
                "parallel": {"zero_stage": 1}, "precision": prec,
                "data": {"sources": [{"path": str(corpus), "weight": 1.0}], "seq_len": SEQ, "num_workers": 0},
                "train": {"steps": STEPS, "micro_batch": 4, "log_every": 1, "eval_every": 0},
                "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 0.5},
                "checkpoint": {"every": 0, "resume": "none"}, "logging": {"tensorboard": False},
                "cluster": {"workers": 1}}

    cpu = run_distributed(_worker, 1, (raw("cpu", "fp32"), True), init_process_group=False)[0]
    gpu = run_distributed(_worker, 1, (raw("gpu", precision), False), init_process_group=False)[0]
    assert len(gpu) == len(cpu) == STEPS and cpu[-1] < cpu[0] - 0.1
    for step, (have, want) in enumerate(zip(gpu, cpu), start=1):
        assert abs(have - want) <= tol * abs(want), (precision, step, have, want)
