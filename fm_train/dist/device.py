"""Every choice that depends on the hardware a rank runs on, made in one place.

What is chosen, and from what:

=====================  =====================================  ==================================
choice                 with a CUDA GPU                        without
=====================  =====================================  ==================================
accelerator, device    ``cuda``, ``cuda:LOCAL_RANK``          ``cpu``
comm backend           ``nccl``                               ``gloo``
bf16                   only if the GPU has it natively        allowed; warns when the CPU lacks
                       (compute capability >= 8.0), else an   native bf16 (it runs, slowly)
                       error naming ``precision``
SDPA attention         flash, then memory-efficient, then     torch's default (unchanged CPU
                       cuDNN, then math as the fallback       numerics)
AdamW                  ``torch.optim.AdamW(fused=True)``      the same (torch's CPU fused kernel;
                                                              ZeRO-Offload's host states too)
=====================  =====================================  ==================================

The deciding functions are pure (they take flags, not torch state), so the rules are unit-tested on
a machine without a GPU; ``detect_*`` helpers read the flags from torch and call them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import ContextManager, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fm_train.config import ConfigError
from fm_train.dist.errors import DistError

Accelerator = Literal["cuda", "cpu"]
Backend = Literal["nccl", "gloo"]

# Tried in this order on a GPU. Flash (FA2 in torch) is the fastest for bf16/fp16 causal attention
# with head_dim <= 256; memory-efficient covers fp32 and odd shapes; cuDNN stays behind both because
# torch itself demoted it after correctness issues (2.5); math never fails, so nothing can break.
GPU_SDPA_BACKENDS: tuple[SDPBackend, ...] = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
)


class DeviceError(DistError, ConfigError):
    """The run's config or rank environment does not fit the hardware this rank sees."""


@dataclass(frozen=True)
class DeviceChoice:
    """Where one rank computes and how it talks to its peers."""

    accelerator: Accelerator
    backend: Backend
    index: int | None  # CUDA ordinal among the visible devices; None on CPU

    @property
    def device(self) -> torch.device:
        """``torch.device("cuda:<index>")`` or ``torch.device("cpu")``."""
        return torch.device("cuda", self.index) if self.accelerator == "cuda" else torch.device("cpu")


def choose_device(*, cuda_available: bool, device_count: int, local_rank: int) -> DeviceChoice:
    """The device of the rank with ``local_rank`` given what CUDA reports.

    All GPUs of a node visible (torchrun, the Ray launcher, which sets ``CUDA_VISIBLE_DEVICES`` to the
    node's GPUs in local-rank order): rank ``i`` takes ``cuda:i``. One GPU visible (srun or a
    scheduler that isolates each process): ``cuda:0`` whatever the local rank. Anything else means
    two ranks would share a GPU, which silently halves throughput and can run out of memory, so it
    is an error rather than a modulo.
    """
    if not cuda_available or device_count == 0:
        return DeviceChoice("cpu", "gloo", None)
    if device_count == 1:
        return DeviceChoice("cuda", "nccl", 0)
    if not 0 <= local_rank < device_count:
        raise DeviceError(
            f"LOCAL_RANK={local_rank} but this process sees {device_count} GPUs: two ranks would share one."
            " Start at most one rank per GPU on each node (cluster.workers, cluster.slots_per_node) or make"
            " CUDA_VISIBLE_DEVICES list one GPU per process"
        )
    return DeviceChoice("cuda", "nccl", local_rank)


def detect_device(local_rank: int) -> DeviceChoice:
    """:func:`choose_device` with the flags of this process."""
    available = torch.cuda.is_available()
    return choose_device(cuda_available=available, device_count=torch.cuda.device_count() if available else 0,
                         local_rank=local_rank)


def activate(choice: DeviceChoice) -> torch.device:
    """Make ``choice`` this process's current device (before the process group exists: nccl binds to it)."""
    if choice.accelerator == "cuda":
        torch.cuda.set_device(choice.index)
    return choice.device


def accelerator_of(device: torch.device | str) -> Accelerator:
    """``cuda`` for a CUDA device, else ``cpu``."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def detect_accelerator() -> Accelerator:
    """``cuda`` when this process can use a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- precision ---------------------------------------------------------------------------------

def precision_warning(precision: str, accelerator: Accelerator, *, bf16_native: bool, device_name: str = "") -> str | None:
    """Check ``precision`` against the hardware: None when fine, a warning to show, or a :class:`DeviceError`.

    bf16 on a GPU without native bf16 (V100, T4) would be emulated at a fraction of the fp16 rate,
    so it is refused with the fix. On a CPU bf16 runs either way (the tests use it), only much
    slower without AVX512-BF16/AMX, so it warns. (fp16 on a CPU is DeepSpeed's to refuse, which it
    does at ``deepspeed.initialize``; configs are still rendered and validated for it here.)
    """
    if precision != "bf16" or bf16_native:
        return None
    if accelerator == "cuda":
        raise DeviceError(f"precision=bf16 but {device_name or 'this GPU'} has no native bf16 (needs compute"
                          " capability >= 8.0, e.g. A100/H100); set precision=fp16 or precision=fp32")
    return ("precision=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): it runs, but its matmuls go"
            " through slow conversion paths; precision=fp32 is usually faster on this machine")


def bf16_native(accelerator: Accelerator) -> bool:
    """Whether this process's device computes bf16 natively (no emulation)."""
    if accelerator == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return _onednn_bf16_native()


def _onednn_bf16_native() -> bool:
    """oneDNN's own answer to "bf16 without emulation on this CPU" (False where torch cannot say).

    A private torch name, kept in this one helper: torch has no public equivalent across the torch
    versions fm_train supports (``torch.cpu.get_capabilities()``, public only in recent torch, lists CPU flags,
    not what oneDNN decides from them).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, accelerator: Accelerator) -> None:
    """:func:`precision_warning` for this process's hardware; raises or warns (once per process)."""
    name = torch.cuda.get_device_name() if accelerator == "cuda" else ""
    message = precision_warning(precision, accelerator, bf16_native=bf16_native(accelerator), device_name=name)
    if message:
        warnings.warn(message, stacklevel=2)


# --- kernels -----------------------------------------------------------------------------------

def sdpa_backends(accelerator: Accelerator) -> tuple[SDPBackend, ...] | None:
    """SDPA backends to allow, in priority order; None leaves torch's own choice (on CPU)."""
    return GPU_SDPA_BACKENDS if accelerator == "cuda" else None


def attention_context(accelerator: Accelerator) -> ContextManager[None]:
    """The context to train in: on a GPU, SDPA restricted to :data:`GPU_SDPA_BACKENDS` in that order.

    Applied by the engine around its steps, never inside the model (which stays pure torch). It
    covers backward too, so a recomputed forward (activation checkpointing) picks the same kernel.
    """
    backends = sdpa_backends(accelerator)
    if backends is None:
        return contextlib.nullcontext()
    return sdpa_kernel(list(backends), set_priority=True)
