"""One-line notices a job prints about its config before it starts (torch-free: the driver imports this)."""

from __future__ import annotations

from fm_train.config.schema import FmConfig

# Measured on the CI kind of CPU (no AMX/AVX512-BF16): tiny preset, 8 x 128 tokens, 1 thread,
# 0.8 s per fp32 step vs 8 s per bf16 step (see cluster_configs/local.yaml).
_CPU_BF16_SLOWDOWN = "about 10x"


def precision_notice(cfg: FmConfig) -> str | None:
    """Why a CPU-only run trains in the precision it does, in one line; None when there is nothing to say.

    A run whose workers reserve no GPU (``cluster.gpus_per_worker == 0``) trains on CPU cores. There,
    fp32 is the fast choice unless the CPU has native bf16 matmuls, so an fp32 CPU run says why it is
    not bf16 and how to choose bf16, and a bf16 CPU run says what it costs and how to choose fp32.
    GPU runs get no notice.
    """
    if cfg.cluster.gpus_per_worker > 0:
        return None
    if cfg.precision == "fp32":
        return (f"precision: fp32, since the workers have no GPU (cluster.gpus_per_worker=0) and bf16 is"
                f" {_CPU_BF16_SLOWDOWN} slower on CPUs without native bf16 matmuls; for bf16 (GPUs, or CPUs"
                " with AMX/AVX512-BF16) pass --set precision=bf16")
    if cfg.precision == "bf16":
        return (f"precision: bf16 on CPU workers (cluster.gpus_per_worker=0) is {_CPU_BF16_SLOWDOWN} slower"
                " than fp32 on CPUs without native bf16 matmuls; pass --set precision=fp32 if steps are slow")
    return None
