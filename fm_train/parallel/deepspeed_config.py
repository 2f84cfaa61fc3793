"""The one place that renders the DeepSpeed JSON config from an :class:`~fm_train.config.FmConfig`.

Everything DeepSpeed needs to know about batch shape, ZeRO, precision, clipping and the optimizer
comes from here, so a run's behaviour is a function of its resolved config alone. Things that are
live objects (weight-decay parameter groups, the LR scheduler, an ``mpu``) are passed to
``deepspeed.initialize`` by :mod:`fm_train.engine.build`, not rendered.
"""

from __future__ import annotations

from typing import Any

from fm_train.config import FmConfig

# We print and log metrics ourselves (fm_train.engine.metrics); DeepSpeed's own progress report
# would interleave a second, differently averaged loss line on every rank.
_NEVER = 2**31 - 1


def zero_section(cfg: FmConfig) -> dict[str, Any]:
    """``zero_optimization`` for the configured stage, with optimizer offload to CPU when asked."""
    p = cfg.parallel
    section: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        # Contiguous gradient buffers avoid fragmentation at large scale and cost nothing small.
        section["contiguous_gradients"] = True
    if p.zero_stage == 3:
        # Needed so `engine.save_16bit_model` (HF export without a ZeRO merge) gets whole weights.
        section["stage3_gather_16bit_weights_on_model_save"] = True
    if p.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return section


def precision_sections(cfg: FmConfig) -> dict[str, Any]:
    """``bf16`` / ``fp16`` sections; fp16 uses dynamic loss scaling (``loss_scale: 0``)."""
    if cfg.precision == "bf16":
        return {"bf16": {"enabled": True}}
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
    """AdamW through ``torch.optim.AdamW`` (``torch_adam``), so no fused op is JIT-compiled.

    ``weight_decay`` here is only the default; the parameter groups built by
    :func:`fm_train.engine.param_groups.weight_decay_groups` set it per group (0 for norms/biases).
    The ``lr`` is the peak rate; the LR scheduler multiplies it by the schedule's factor each step.
    """
    o = cfg.optim
    return {
        "type": "AdamW",
        "params": {
            "lr": o.lr,
            "betas": list(o.betas),
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "torch_adam": True,
        },
    }


def deepspeed_config(cfg: FmConfig, *, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (pass it as ``deepspeed.initialize(config=...)``).

    The batch triple is derived once from the config: ``train_batch_size = micro_batch x grad_accum x
    dp`` (``cfg.global_batch``), which DeepSpeed re-checks against its own data-parallel size.
    ``load_universal`` is a fact of the checkpoint being resumed (saved on another dp size, see
    ``fm_train.checkpoint.prepare_resume``), not of the config, hence an argument.
    """
    t = cfg.train
    config: dict[str, Any] = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_section(cfg),
        "optimizer": optimizer_section(cfg),
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    config.update(precision_sections(cfg))
    return config
