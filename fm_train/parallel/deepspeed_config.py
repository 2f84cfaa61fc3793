"""The one place that renders the DeepSpeed JSON config from an :class:`~fm_train.config.FmConfig`.

Everything DeepSpeed needs to know about batch shape, ZeRO, precision, clipping and the optimizer
comes from here, so a run's behaviour is a function of its resolved config alone. Things that are
live objects (weight-decay parameter groups, the LR scheduler, an ``mpu``) are passed to
``deepspeed.initialize`` by :mod:`fm_train.engine.build`, not rendered.

The hardware enters through one argument, ``accelerator`` (``cuda`` or ``cpu``, detected when not
given); the device-specific choices come from :mod:`fm_train.dist.device`. On a GPU ZeRO-1/2 overlap
their gradient reduction with backward (gloo has no streams to overlap on).
"""

from __future__ import annotations

from typing import Any

from fm_train.config import FmConfig
from fm_train.dist.device import Accelerator, check_precision, detect_accelerator
from fm_train.deepspeed_adapter.settings import ZERO3_SUB_GROUP, Zero3Gathered

# We print and log metrics ourselves (fm_train.engine.metrics); DeepSpeed's own progress report
# would interleave a second, differently averaged loss line on every rank.
_NEVER = 2**31 - 1


def zero_section(cfg: FmConfig, accelerator: Accelerator = "cpu",
                 zero3_gathered: Zero3Gathered | None = None) -> dict[str, Any]:
    """``zero_optimization`` for the configured stage, with optimizer offload to CPU when asked."""
    p = cfg.parallel
    section: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        # Contiguous gradient buffers avoid fragmentation at large scale and cost nothing small.
        section["contiguous_gradients"] = True
    if p.zero_stage in (1, 2) and accelerator == "cuda":
        # Reduce finished gradient buckets on a side stream while backward continues (ZeRO-3 does
        # this by default; ZeRO-1 on its boundary micro-batch). Not on CPU: gloo has no streams.
        section["overlap_comm"] = True
    if p.zero_stage == 3:
        # Needed so `engine.save_16bit_model` (HF export without a ZeRO merge) gets whole weights.
        section["stage3_gather_16bit_weights_on_model_save"] = True
        section.update(zero3_buffer_sizes(cfg, zero3_gathered))
    if p.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return section


def zero3_buffer_sizes(cfg: FmConfig, gathered: Zero3Gathered | None = None) -> dict[str, int]:
    """ZeRO-3 buffer sizes (in elements) scaled to the model instead of DeepSpeed's fixed defaults.

    The defaults (a 5e8-element gradient bucket, up to 1e9 gathered parameters kept live or for
    reuse, 1e9-element optimizer sub-groups) are sized for GPUs, not for the model: for a 1.1B
    model in fp32 on 2 ranks they allow a 2 GB gradient bucket, about 4 GB of gathered parameters
    and 2 x 2.2 GB of optimizer temporaries per rank on top of its 8.8 GB of ZeRO-3 states, more than a
    24 GiB machine holds (bench/RESULTS_memory.md). Buckets follow the Hugging Face integration's
    ``auto`` rule (``hidden^2``), unless ``gathered`` brings its own gradient bucket (a CPU rank holding
    its whole stage: buckets of up to ``CPU_REDUCE_BUCKET`` elements); gathered parameters are bounded by ``gathered`` (the
    planner's choice from the rank's memory budget, :func:`fm_train.plan.memory.zero3_gathered`: more
    blocks, or the whole stage, where it holds them; None: two dense decoder blocks); optimizer
    sub-groups of ``ZERO3_SUB_GROUP`` (2e7) elements bound the flattened gradient of a step.
    """
    m = cfg.model
    h, kv = m.hidden, m.n_kv_heads * (m.hidden // m.n_heads)
    if gathered is None:
        gathered = Zero3Gathered.blocks(2 * h * h + 2 * h * kv + 3 * h * m.ffn_hidden, 2)
    return {
        "reduce_bucket_size": gathered.reduce_bucket or h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
        "stage3_max_live_parameters": gathered.max_live,
        "stage3_max_reuse_distance": gathered.reuse_distance,
        "sub_group_size": ZERO3_SUB_GROUP,
    }


def precision_sections(cfg: FmConfig) -> dict[str, Any]:
    """``bf16`` / ``fp16`` sections; fp16 uses dynamic loss scaling (``loss_scale: 0``); bf16 with ZeRO >= 1
    accumulates gradients in ``train.grad_accum_dtype``."""
    if cfg.precision == "bf16":
        sections: dict[str, Any] = {"bf16": {"enabled": True}}
        if cfg.parallel.zero_stage >= 1:
            # ZeRO-1 then runs DeepSpeed's BF16_Optimizer (fp32 gradient buffers), ZeRO-2/3 their fp32
            # accumulation partitions; ZeRO-0 has no fp32 path (DeepSpeed refuses the mix).
            sections["data_types"] = {"grad_accum_dtype": cfg.train.grad_accum_dtype}
        return sections
    if cfg.precision == "fp16":
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,  # 0 = dynamic
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    return {}


def optimizer_section(cfg: FmConfig) -> dict[str, Any]:
    """AdamW through ``torch.optim.AdamW(fused=True)`` (``torch_adam``), so no DeepSpeed op is JIT-compiled.

    DeepSpeed 0.19 builds ``torch.optim.AdamW(params, **params_without_torch_adam)`` for ``torch_adam``,
    so ``fused`` reaches torch, whose fused AdamW updates every tensor in place in one kernel per dtype,
    on a GPU and on a CPU alike (ZeRO-Offload's CPU states included): the same update rule as its
    for-each and single-tensor paths, without their temporaries the size of the flat tensor, and on a CPU
    about 6x faster than the single-tensor path it otherwise takes (bench/RESULTS.md).

    ``weight_decay`` here is only the default; the parameter groups built by
    :func:`fm_train.engine.param_groups.weight_decay_groups` set it per group (0 for norms/biases).
    The ``lr`` is the peak rate; the LR scheduler multiplies it by the schedule's factor each step.
    """
    o = cfg.optim
    params: dict[str, Any] = {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "torch_adam": True,
        "fused": True,
    }
    return {"type": "AdamW", "params": params}


def deepspeed_config(cfg: FmConfig, *, accelerator: Accelerator | None = None,
                     zero3_gathered: Zero3Gathered | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (pass it as ``deepspeed.initialize(config=...)``).

    The batch triple is derived once from the config: ``train_batch_size = micro_batch x grad_accum x
    dp``, which DeepSpeed re-checks against its own data-parallel size. With sequence parallelism that
    is DeepSpeed's count, not the samples': the sp ranks of a group read the same samples
    (``cfg.global_batch``), yet DeepSpeed rightly treats them as data-parallel ranks (ZeRO partitions
    over them, gradients are averaged with them).

    ``accelerator``: the device kind the engine will run on; None detects this process's (and then
    also checks ``precision`` against the hardware: an error for bf16 on a GPU without it, a warning
    for bf16 on a CPU without native support). Pass it to render another machine's config.
    ``zero3_gathered``: what ZeRO-3 keeps gathered (:func:`zero3_buffer_sizes`).
    """
    if accelerator is None:
        accelerator = detect_accelerator()
        check_precision(cfg.precision, accelerator)
    t = cfg.train
    config: dict[str, Any] = {
        "train_batch_size": t.micro_batch * t.grad_accum * cfg.dp,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_section(cfg, accelerator, zero3_gathered),
        "optimizer": optimizer_section(cfg),
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # Never DeepSpeed's universal loader (it unpickles fully): fm-train reshards every layout change.
        "checkpoint": {"load_universal": False},
    }
    if cfg.parallel.pp > 1 and cfg.parallel.tp_sequence_parallel:
        # DeepSpeed's pipeline sends each tp rank 1/tp of an activation and all-gathers it on the next
        # stage, which assumes the tp ranks hold the same activation; with the sequence split they hold
        # different chunks, so each rank sends its own whole.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    config.update(precision_sections(cfg))
    return config
