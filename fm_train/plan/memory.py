"""Per-device memory estimate of a run: model states by ZeRO stage, activations, pipeline buffers.

The estimate is for the busiest rank (the pipeline stage with the most parameters: the first stage
holds the embedding, the last the head). Byte counts per parameter follow the ZeRO paper
(Rajbhandari et al. 2020): 16-bit params and grads (2 + 2 bytes) plus fp32 master weights and Adam
moments (12 bytes); in fp32, 4 + 4 + 8. ZeRO-1 divides optimizer states by dp, ZeRO-2 also grads,
ZeRO-3 also params. Activations follow Korthikanti et al. 2022 adapted to a SwiGLU block with
fused (SDPA) attention, so no ``seq x seq`` score matrix is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fm_train.config import FmConfig
from fm_train.plan.flops import parameter_count

GIB = 1024**3

# Resident memory of a worker process before any model state: the framework's own footprint.
# CPU: torch + DeepSpeed + the data loader, measured at 0.5-0.65 GiB per process on the 2-core CI
# machines. GPU: CUDA context and NCCL buffers, typically 1-2 GiB.
RUNTIME_OVERHEAD_GIB = {"cpu": 0.6, "gpu": 1.5}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by category, for the busiest rank."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    runtime: float
    offloaded_optimizer: float  # host memory, when parallel.offload_optimizer is on
    params_per_rank: int

    @property
    def device_total(self) -> float:
        """Peak bytes on the device (for CPU runs: resident memory of the worker process)."""
        return self.params + self.grads + self.optimizer + self.activations + self.logits + self.runtime


def _busiest_stage_params(cfg: FmConfig) -> int:
    """Parameters held by the largest pipeline stage, before tensor-parallel splitting."""
    m, pp = cfg.model, cfg.parallel.pp
    total = parameter_count(m)
    embed = m.vocab_size * m.hidden
    head = embed  # tied: the last stage holds a copy of the embedding; untied: its own head
    blocks = total - embed - (0 if m.tie_embeddings else head) - m.hidden
    per_block = blocks // m.n_layers
    if pp == 1:
        return total
    most_blocks = math.ceil(m.n_layers / pp)
    first = embed + most_blocks * per_block
    last = head + m.hidden + most_blocks * per_block
    return max(first, last)


def _activation_bytes_per_layer(cfg: FmConfig) -> float:
    """Bytes one decoder block keeps for backward, per micro-batch, without recomputation."""
    m, tp = cfg.model, cfg.parallel.tp
    s, b, h, f = cfg.data.seq_len, cfg.train.micro_batch, m.hidden, m.ffn_hidden
    kv = m.n_kv_heads * (h // m.n_heads)
    elt = 4 if cfg.precision == "fp32" else 2
    replicated = 4 * h  # both norm inputs and outputs (no sequence parallelism)
    sharded = (h + 2 * kv) + 2 * h + 4 * f  # q/k/v, attention out + o_proj input, gate/up/silu/product
    return s * b * (replicated + sharded / tp) * elt


def estimate_memory(cfg: FmConfig, *, device: str = "cpu") -> MemoryEstimate:
    """Estimated peak memory of the busiest rank of ``cfg`` on ``device`` (``cpu`` or ``gpu``)."""
    p, dp = cfg.parallel, cfg.dp
    n = _busiest_stage_params(cfg) / p.tp
    half = cfg.precision != "fp32"
    param_b, grad_b, opt_b = (2, 2, 12) if half else (4, 4, 8)
    params = n * param_b / (dp if p.zero_stage >= 3 else 1)
    grads = n * grad_b / (dp if p.zero_stage >= 2 else 1)
    optimizer = n * opt_b / (dp if p.zero_stage >= 1 else 1)
    offloaded = 0.0
    if p.offload_optimizer:
        offloaded, optimizer = optimizer, 0.0

    per_layer = _activation_bytes_per_layer(cfg)
    layers_here = math.ceil(cfg.model.n_layers / p.pp)
    if p.activation_checkpointing:
        elt = 4 if cfg.precision == "fp32" else 2
        kept = layers_here * cfg.data.seq_len * cfg.train.micro_batch * cfg.model.hidden * elt
        acts = kept + per_layer  # block inputs, plus one block recomputed at a time
    else:
        acts = layers_here * per_layer
    in_flight = min(p.pp, cfg.train.grad_accum) if p.pp > 1 else 1  # 1F1B: stage 0 holds pp micro-batches
    acts *= in_flight
    # Logits: 16-bit output, its fp32 upcast for the loss, and the fp32 gradient (last stage only).
    tokens = cfg.data.seq_len * cfg.train.micro_batch
    logits = tokens * cfg.model.vocab_size / p.tp * (4 + 4 + (2 if half else 4))
    runtime = RUNTIME_OVERHEAD_GIB[device] * GIB
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations=acts, logits=logits,
                          runtime=runtime, offloaded_optimizer=offloaded, params_per_rank=int(n))


def format_memory(est: MemoryEstimate, device: str) -> str:
    """A short table of the estimate in GiB."""
    rows = [("parameters", est.params), ("gradients", est.grads), ("optimizer states", est.optimizer),
            ("activations", est.activations), ("logits + loss", est.logits), (f"runtime ({device})", est.runtime)]
    lines = [f"# memory per device (busiest rank, {est.params_per_rank:,} parameters before ZeRO split)"]
    lines += [f"#   {name:<18} {value / GIB:9.2f} GiB" for name, value in rows]
    lines.append(f"#   {'total':<18} {est.device_total / GIB:9.2f} GiB")
    if est.offloaded_optimizer:
        lines.append(f"#   {'host (offload)':<18} {est.offloaded_optimizer / GIB:9.2f} GiB")
    return "\n".join(lines)
