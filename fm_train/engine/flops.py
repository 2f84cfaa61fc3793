"""Model FLOPs per token, device peak FLOP/s and MFU, with the formula stated so numbers compare.

MFU (model FLOPs utilisation) = achieved model FLOP/s per device / peak FLOP/s of that device, where
the achieved model FLOP/s count only the FLOPs the model needs, never recomputation (activation
checkpointing does not raise MFU) and never optimizer or communication work.

FLOPs per trained token come from the model family's formula (``FamilySpec.sizes.flops_per_token``),
the one shared with the planner; Llama's::

    6 * N_matmul  +  12 * n_layers * hidden * seq_len

``N_matmul``: every block projection plus the output head (counted even when tied; the embedding
lookup and the norms are not matmuls). 6 = forward (2) + backward (4) FLOPs per weight and token;
the second term is the attention score and value matmuls, forward + backward, with no discount
for the causal mask (PaLM appendix B, Megatron-LM). Recomputation is not counted.

Peak FLOP/s: dense (no sparsity) tensor-core figures from vendor data sheets, bf16/fp16 and fp32
(fp32 uses the plain fp32 rate, not TF32). A GPU rarely sustains its data-sheet figure (an H100 SXM
reaches about 75-80 % of it in a large bf16 matmul, at the clocks its power limit allows), so
``bench/gpu_mfu.py`` reports MFU against both the table and :func:`measure_matmul_flops`. On a CPU there is no meaningful data-sheet figure, so the
peak is measured once with a matmul (:func:`measure_matmul_flops`) unless
``FM_TRAIN_PEAK_FLOPS`` gives it; a CPU MFU therefore says how close training runs to the best
matmul speed this process gets, not to a hardware limit.
"""

from __future__ import annotations

import os
import time

import torch

# Dense peak FLOP/s per device: (bf16/fp16 tensor core, fp32). Matched by substring of
# torch.cuda.get_device_name(), most specific first ("A100" before "A10").
PEAK_FLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("GB200", (2.5e15, 80e12)),
    ("B200", (2.25e15, 80e12)),
    ("H200 NVL", (835e12, 60e12)),
    ("H200", (989e12, 67e12)),  # SXM; also matches GH200
    ("H100 NVL", (835e12, 60e12)),
    ("H100 PCIe", (756e12, 51e12)),
    ("H100", (989e12, 67e12)),  # SXM
    ("H800", (989e12, 67e12)),
    ("A100", (312e12, 19.5e12)),
    ("A800", (312e12, 19.5e12)),
    ("L40S", (362e12, 91.6e12)),
    ("L40", (181e12, 90.5e12)),
    ("L4", (121e12, 30.3e12)),
    ("A10", (125e12, 31.2e12)),
    ("V100", (125e12, 15.7e12)),
    ("T4", (65e12, 8.1e12)),
)

ENV_PEAK = "FM_TRAIN_PEAK_FLOPS"

__all__ = ["PEAK_FLOPS", "measure_matmul_flops", "mfu", "peak_flops", "table_peak_flops"]


def table_peak_flops(device_name: str, precision: str) -> float | None:
    """Data-sheet peak FLOP/s for a device name, or None when the device is not in :data:`PEAK_FLOPS`."""
    for key, (half, fp32) in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return fp32 if precision == "fp32" else half
    return None


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, size: int | None = None, seconds: float = 0.3) -> float:
    """Best FLOP/s of a square matmul in ``dtype`` on ``device``, timed for about ``seconds``.

    ``size`` defaults to 1024 on a CPU and 8192 on a GPU, where a small matmul cannot fill the
    tensor cores. On a GPU each sample is a burst of matmuls between two CUDA events: the host
    only queues kernels, so host timers would measure the launch, not the work.
    """
    if device.type == "cuda":
        with torch.cuda.device(device):  # events record on the current device's stream
            return _measure_cuda_matmul(dtype, device, size or 8192, seconds)
    size = size or 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: allocator, kernel selection
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return best


def _measure_cuda_matmul(dtype: torch.dtype, device: torch.device, size: int, seconds: float, burst: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks ramping up
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(burst):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        best = max(best, burst * 2.0 * size**3 / (start.elapsed_time(end) / 1e3))
    return best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s per device and where the figure came from (``env``, ``table:<name>`` or ``measured``)."""
    if os.environ.get(ENV_PEAK):
        return float(os.environ[ENV_PEAK]), "env"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak_flops(name, precision)
        if peak is not None:
            return peak, f"table:{name}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # CPUs without native bf16 matmul run the model's large kernels through fp32 paths, so the
    # faster of the two rates is the honest ceiling.
    rates = {measure_matmul_flops(dtype, device)}
    if device.type == "cpu" and dtype != torch.float32:
        rates.add(measure_matmul_flops(torch.float32, device))
    return max(rates), "measured"


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1] (can exceed 1 only if ``peak`` is wrong)."""
    return tokens_per_s_per_device * flops_per_tok / peak if peak > 0 else 0.0
