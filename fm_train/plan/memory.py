"""Per-device memory estimate of a run: model states by ZeRO stage, activations, pipeline buffers.

The estimate is for the busiest rank (the pipeline stage with the most parameters: the first stage
holds the embedding, the last the head). Byte counts per parameter follow the ZeRO paper
(Rajbhandari et al. 2020): 16-bit params and grads (2 + 2 bytes) plus fp32 master weights and Adam
moments (12 bytes); in fp32, 4 + 4 + 8. ZeRO-1 divides optimizer states by dp, ZeRO-2 also grads,
ZeRO-3 also params. The family-specific terms (the largest stage's parameters, a block's
parameters and its activations) come from the model family (``FamilySpec.sizes``: ``stage_params``,
``block_params``, ``activation_bytes_per_layer``; Llama's in :mod:`fm_train.families.llama.shape`).

Two terms come from what the code really allocates, as measured on CPU (bench/RESULTS_memory.md):

* ZeRO-3 working set: the full (gathered) parameters of the modules being computed and their full
  gradients before the reduce-scatter, bounded by the buffer sizes we render
  (:func:`fm_train.parallel.deepspeed_config.zero3_buffer_sizes`: two decoder blocks, unless a memory
  budget holds more blocks or the whole stage: :func:`zero3_gathered`) but never below the largest
  single module (the embedding or the head, ``vocab x hidden``); a CPU rank keeping its whole stage adds
  its reduce bucket ``REDUCE_BUCKET_COPIES`` times over (the bucket, its flattened copy, gloo's buffer).
* The optimizer step: ``torch.optim.AdamW(fused=True)`` updates in place, with no temporaries the
  size of the tensor it steps; ZeRO-3 flattens an optimizer sub-group's gradient views into one fp32
  tensor before the step (``_prepare_fp32_grad_for_sub_group``): one sub-group's worth.

Sequence parallelism divides every activation term by sp (a rank holds seq_len / sp tokens), tensor-parallel
sequence parallelism the terms outside the tp matmuls (norms, block inputs) by tp; document
masking on CPU adds the mask of the whole sequence (micro_batch x seq_len^2 x (dtype + 1 bool) bytes).

With expert parallelism the family adds the token exchange (``Sizes.dispatch_bytes``): the all-to-all
buffers of one routed block in flight and the expert-order index each routed block keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fm_train.config import FmConfig
from fm_train.deepspeed_adapter.settings import REDUCE_BUCKET_COPIES, ZERO3_SUB_GROUP, Zero3Gathered
from fm_train.families.spec import FamilySpec

GIB = 1024**3

# Resident memory of a worker process before any model state: the framework's own footprint.
# CPU: torch + DeepSpeed + the data loader, measured at 0.5-0.65 GiB per process on the 2-core CI
# machines. GPU: CUDA context and NCCL buffers, typically 1-2 GiB.
RUNTIME_OVERHEAD_GIB = {"cpu": 0.6, "gpu": 1.5}



#: fm_train.model.loss.CHUNK_BYTES (that module imports torch; a test checks the two agree).
LOSS_CHUNK_BYTES = 64 * 1024**2


def fused_loss_bytes(tokens: int, columns: int, hidden: int, half: bool) -> float:
    """Peak bytes of the head fused with the cross-entropy (``linear_cross_entropy``) over ``columns``
    vocabulary columns, beyond the head weight's own gradient: forward holds one chunk of rows' logits
    (in the model's dtype and in fp32); backward one slice of columns for all tokens (fp32, the gradient
    cast back, in 16-bit also the fp32 copies its matmuls take) and the input's fp32 gradient; plus a
    few fp32 numbers per token. When all the tokens are one chunk, its fp32 logits stay for backward."""
    rows = min(tokens, max(1, LOSS_CHUNK_BYTES // (4 * columns)))
    cols = min(columns, max(1, LOSS_CHUNK_BYTES // (4 * tokens)))
    kept = tokens * columns * 4 if rows == tokens else 0
    forward = rows * columns * (4 + (2 if half else 0))
    backward = (kept + cols * tokens * (4 + (2 + 2 + 4 if half else 0)) + (cols * hidden * 4 if half else 0)
                + tokens * hidden * 4)
    return max(forward, backward) + tokens * 16


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
    gathered: float = 0.0  # ZeRO-3: full parameters and gradients of the modules in flight
    optimizer_step: float = 0.0  # the optimizer step's temporaries (ZeRO-3: a flattened sub-group gradient; transient)
    dispatch: float = 0.0  # expert parallelism's all-to-all buffers and kept expert-order indices

    @property
    def device_total(self) -> float:
        """Peak bytes on the device (for CPU runs: resident memory of the worker process).

        The optimizer step's temporaries and the backward's activations and logits are not alive
        at the same time; the peak is the larger of the two phases on top of the steady states.
        """
        steady = self.params + self.grads + self.optimizer + self.runtime
        return steady + max(self.activations + self.logits + self.gathered + self.dispatch, self.optimizer_step)

    def rank_total(self, device: str) -> float:
        """Peak bytes of one rank against its memory budget: :attr:`device_total`, and on a CPU rank also the
        offloaded optimizer states (the host is its device)."""
        return self.device_total + (self.offloaded_optimizer if device == "cpu" else 0.0)


def _largest_module_params(cfg: FmConfig, family: FamilySpec) -> int:
    """Parameters of the largest module a rank computes at once: a block or the embedding/head."""
    m = cfg.model
    return max(family.sizes.block_params(m), m.padded_vocab_size * m.hidden) // cfg.parallel.tp


def _zero3_gathered_bytes(cfg: FmConfig, family: FamilySpec, param_b: int, grad_b: int,
                          gathered: Zero3Gathered | None) -> float:
    """ZeRO-3's full parameters and gradients in flight (see the module docstring)."""
    largest = _largest_module_params(cfg, family)
    gathered = gathered or _two_blocks(cfg, family)
    bucket = REDUCE_BUCKET_COPIES * (gathered.reduce_bucket or 0)
    return max(gathered.max_live, largest) * param_b + (largest + bucket) * grad_b


def _two_blocks(cfg: FmConfig, family: FamilySpec) -> Zero3Gathered:
    return Zero3Gathered.blocks(family.sizes.block_params(cfg.model) // cfg.parallel.tp, 2)


def _rank_stage_params(cfg: FmConfig, family: FamilySpec) -> tuple[float, float]:
    """(dense, expert) parameters of the busiest stage held by one rank before ZeRO: dense ones split over tp,
    routed experts over ep."""
    experts = _stage_expert_params(cfg, family)
    return (family.sizes.stage_params(cfg) - experts) / cfg.parallel.tp, experts / cfg.parallel.ep


def zero3_gathered(cfg: FmConfig, family: FamilySpec, *, device: str, budget_gib: float | None) -> Zero3Gathered:
    """What ZeRO-3 may keep gathered on one rank: the whole stage (embedding and head included: nothing is
    gathered twice in a step; on a CPU with its gradients reduce-scattered in buckets of up to
    ``CPU_REDUCE_BUCKET`` elements) when
    ``budget_gib`` per device holds it beyond the plan's peak with two blocks; else two blocks (the one
    computing and the one prefetched) plus as many as it holds, up to the stage's blocks (a kept block is
    not gathered again for its backward or recompute). None (no budget known, or below ZeRO-3): two blocks."""
    two = _two_blocks(cfg, family)
    if cfg.parallel.zero_stage < 3 or budget_gib is None:
        return two
    spare = budget_gib * GIB - estimate_memory(cfg, family, device=device, zero3=two).rank_total(device)
    param_b = 4 if cfg.precision == "fp32" else 2
    whole = int(sum(_rank_stage_params(cfg, family)))
    candidate = Zero3Gathered.whole(whole, cpu=device == "cpu")
    more_params = whole - max(two.max_live, _largest_module_params(cfg, family))
    if spare >= (more_params + REDUCE_BUCKET_COPIES * (candidate.reduce_bucket or 0)) * param_b:
        return candidate
    block = two.max_live // 2
    blocks = math.ceil(cfg.model.n_layers / cfg.parallel.pp)
    more = int(spare // (block * param_b)) if block > 0 else 0
    return Zero3Gathered.blocks(block, max(2, min(blocks, 2 + more)))


def _optimizer_step_bytes(cfg: FmConfig, family: FamilySpec, n: float) -> float:
    """fp32 temporaries of the optimizer step (see the module docstring): ZeRO-3's flattened sub-group gradient."""
    if cfg.parallel.zero_stage < 3:
        return 0.0
    return 4 * min(n / cfg.dp, ZERO3_SUB_GROUP + _largest_module_params(cfg, family) / cfg.dp)


def _stage_expert_params(cfg: FmConfig, family: FamilySpec) -> float:
    """Routed-expert parameters of the busiest pipeline stage, before expert-parallel splitting."""
    count = family.sizes.expert_parameter_count
    if count is None:
        return 0.0
    return count(cfg.model) * math.ceil(cfg.model.n_layers / cfg.parallel.pp) / cfg.model.n_layers


def estimate_memory(cfg: FmConfig, family: FamilySpec, *, device: str = "cpu",
                    zero3: Zero3Gathered | None = None) -> MemoryEstimate:
    """Estimated peak memory of the busiest rank of ``cfg`` (a ``family`` model) on ``device`` (``cpu`` or ``gpu``);
    ``zero3``: what ZeRO-3 keeps gathered (:func:`zero3_gathered`; None: two blocks)."""
    p, dp = cfg.parallel, cfg.dp
    # Experts are whole on every tp rank and split over ep. ZeRO partitions their gradients and optimizer
    # states over the dp / ep ranks holding the same experts: 1/dp of all of them per rank, as dense ones.
    dense, split_experts = _rank_stage_params(cfg, family)
    experts = split_experts * p.ep
    n = dense + split_experts
    half = cfg.precision != "fp32"
    param_b, grad_b, opt_b = (2, 2, 12) if half else (4, 4, 8)
    params = n * param_b / (dp if p.zero_stage >= 3 else 1)
    grads = (dense + experts) * grad_b / dp if p.zero_stage >= 2 else n * grad_b
    if half and p.zero_stage >= 1 and cfg.train.grad_accum_dtype == "fp32":
        # fp32 accumulation: ZeRO-2/3 keep their gradient partition in fp32; ZeRO-1 (DeepSpeed's
        # BF16_Optimizer) keeps every gradient in fp32 next to the bf16 one backward writes.
        grads = (dense + experts) * 4 / dp if p.zero_stage >= 2 else n * (grad_b + 4)
    optimizer = (dense + experts) * opt_b / dp if p.zero_stage >= 1 else n * opt_b
    offloaded = 0.0
    step_temps = _optimizer_step_bytes(cfg, family, n)
    if p.offload_optimizer:
        offloaded, optimizer = optimizer, 0.0
    gathered = _zero3_gathered_bytes(cfg, family, param_b, grad_b, zero3) if p.zero_stage >= 3 else 0.0

    # Sequence parallelism: a rank keeps seq_len / sp tokens of every activation (after the all-to-all,
    # attention holds the whole sequence for heads / sp heads: as many values).
    per_layer = family.sizes.activation_bytes_per_layer(cfg) / p.sp
    layers_here = math.ceil(cfg.model.n_layers / p.pp)
    if p.activation_checkpointing:
        elt = 4 if cfg.precision == "fp32" else 2
        split = p.sp * (p.tp if p.tp_sequence_parallel else 1)  # the block inputs: split with the sequence
        recomputed = layers_here if p.recompute_blocks is None else min(p.recompute_blocks, layers_here)
        kept = recomputed * cfg.data.seq_len // split * cfg.train.micro_batch * cfg.model.hidden * elt
        # Recomputed blocks keep their inputs, the others everything. They are the first ones, so backward
        # recomputes each after the later blocks' activations are freed: the peak is the end of forward, or
        # one recomputed block when all are.
        acts = kept + max(layers_here - recomputed, 1) * per_layer
    else:
        acts = layers_here * per_layer
    in_flight = min(p.pp, cfg.train.grad_accum) if p.pp > 1 else 1  # 1F1B: stage 0 holds pp micro-batches
    acts *= in_flight
    # Logits: 16-bit output, its fp32 upcast for the loss, and the fp32 gradient (last stage only).
    tokens = cfg.data.seq_len // p.sp * cfg.train.micro_batch
    logits = tokens * cfg.model.padded_vocab_size / p.tp * (4 + 4 + (2 if half else 4))
    if family.sizes.fused_head_loss:
        head = tokens if family.sizes.head_tokens is None else min(tokens, family.sizes.head_tokens(cfg))
        logits = fused_loss_bytes(head, cfg.model.padded_vocab_size // p.tp, cfg.model.hidden, half)
    # Document masking on CPU: the additive mask of the whole sequence (made once per forward, in the
    # activations' dtype) and the boolean one it comes from; on a GPU FlexAttention's block mask is
    # (seq / 128)^2 entries, nothing next to the activations.
    elt = 4 if cfg.precision == "fp32" else 2
    mask = (cfg.train.micro_batch * cfg.data.seq_len ** 2 * (elt + 1)
            if cfg.data.document_masking and device == "cpu" else 0.0)
    runtime = RUNTIME_OVERHEAD_GIB[device] * GIB
    dispatch = family.sizes.dispatch_bytes(cfg) if family.sizes.dispatch_bytes is not None else 0.0
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, activations=acts + mask, logits=logits,
                          runtime=runtime, offloaded_optimizer=offloaded, params_per_rank=int(n),
                          gathered=gathered, optimizer_step=step_temps, dispatch=dispatch)


def format_memory(est: MemoryEstimate, device: str) -> str:
    """A short table of the estimate in GiB."""
    rows = [("parameters", est.params), ("gradients", est.grads), ("optimizer states", est.optimizer),
            ("activations", est.activations), ("logits + loss", est.logits), ("zero-3 gathered", est.gathered),
            (f"runtime ({device})", est.runtime), ("step temps", est.optimizer_step)]
    if est.dispatch:
        rows.insert(5, ("all-to-all (ep)", est.dispatch))
    lines = [f"# memory per device (busiest rank, {est.params_per_rank:,} parameters before ZeRO split)"]
    lines += [f"#   {name:<18} {value / GIB:9.2f} GiB" for name, value in rows]
    lines.append(f"#   {'total (peak)':<18} {est.device_total / GIB:9.2f} GiB   (the step temps and the"
                 " activations/logits/gathered/all-to-all are not alive at once: the larger counts)")
    if est.offloaded_optimizer:
        lines.append(f"#   {'host (offload)':<18} {est.offloaded_optimizer / GIB:9.2f} GiB")
    return "\n".join(lines)
