"""Cross-field rules of a config, checked once at load time.

Each rule returns a message that names the field, its value and the fix. All rules run, so a user
sees every problem of a config at once rather than one per attempt.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any
from pathlib import Path

from fm_train.config.family_rules import family_rules
from fm_train.config.hf_shape import FREE_FIELDS, hf_config_file, hf_key_of, read_hf_shape
from fm_train.config.mixture import schedule_errors
from fm_train.config.schema import FmConfig, ModelConfig
from fm_train.config.storage_uri import uri_errors, uri_scheme


#: How to get Weights & Biases logging (an optional extra); named by every error about it.
WANDB_INSTALL = "pip install 'fm-train[wandb]' (then `wandb login`, or logging.wandb_mode=offline)"


def check_rules(cfg: FmConfig, *, require_paths: bool) -> list[str]:
    """Return one message per broken rule (empty when the config is consistent)."""
    errors: list[str] = []
    m, p, c, t, o = cfg.model, cfg.parallel, cfg.cluster, cfg.train, cfg.optim

    # Layout: world = pp x dp x tp.
    if c.workers % (p.tp * p.pp) != 0:
        errors.append(
            f"cluster.workers={c.workers} is not divisible by parallel.tp x parallel.pp = {p.tp} x {p.pp}"
            f" = {p.tp * p.pp}: world size must equal dp x pp x tp; set cluster.workers to a multiple of"
            f" {p.tp * p.pp}"
        )
    if p.ep > 1:
        errors.extend(_expert_parallel_errors(cfg))
    errors.extend(_sequence_errors(cfg))
    if p.pp > 1 and p.zero_stage > 1:
        errors.append(
            f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline engine allows"
            " ZeRO stage 0 or 1 only; set parallel.zero_stage=1 or parallel.pp=1"
        )
    if p.offload_optimizer and p.zero_stage == 0:
        errors.append("parallel.offload_optimizer=true needs parallel.zero_stage >= 1; raise the stage or turn offload off")
    if m.n_heads % p.tp != 0:
        errors.append(f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}; pick a tp that divides it")
    if m.n_kv_heads % p.tp != 0:
        errors.append(f"parallel.tp={p.tp} does not divide model.n_kv_heads={m.n_kv_heads}; pick a tp that divides it")
    if m.ffn_hidden % p.tp != 0:
        errors.append(f"parallel.tp={p.tp} does not divide model.ffn_hidden={m.ffn_hidden}; pick a tp that divides it")
    if m.vocab_size != "auto" and m.padded_vocab_size % p.tp != 0:  # auto: checked again once resolved
        errors.append(
            f"parallel.tp={p.tp} does not divide the padded vocabulary {m.padded_vocab_size} (model.vocab_size="
            f"{m.vocab_size} rounded up to model.vocab_multiple={m.vocab_multiple}) that the vocab-parallel embedding"
            f" splits; set model.vocab_multiple to a multiple of {p.tp} (e.g. {math.lcm(m.vocab_multiple, p.tp)})"
        )
    if p.recompute_blocks is not None:
        per_stage = math.ceil(m.n_layers / p.pp)
        if not p.activation_checkpointing:
            errors.append(f"parallel.recompute_blocks={p.recompute_blocks} needs parallel.activation_checkpointing=true;"
                          " turn it on, or set recompute_blocks to null")
        elif p.recompute_blocks > per_stage:
            errors.append(f"parallel.recompute_blocks={p.recompute_blocks} exceeds the {per_stage} blocks of a pipeline"
                          f" stage (model.n_layers={m.n_layers} / parallel.pp={p.pp}); set at most {per_stage}, or"
                          " null for all")
    if m.n_layers < p.pp:
        errors.append(f"model.n_layers={m.n_layers} is smaller than parallel.pp={p.pp}: every stage needs a block; lower parallel.pp")

    # Model shape.
    if m.hidden % m.n_heads != 0:
        errors.append(f"model.hidden={m.hidden} is not divisible by model.n_heads={m.n_heads}")
    families = family_rules()
    if m.family in families.names():
        errors += families.config_errors(cfg)
    else:
        errors.append(f"model.family={m.family!r} is not a known model family; use one of {list(families.names())}")
    if m.n_heads % m.n_kv_heads != 0:
        errors.append(f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads} (grouped-query attention)")
    if cfg.data.seq_len > m.max_seq_len:
        errors.append(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower one or raise the other")

    # Batch.
    if t.global_batch is not None and c.workers % (p.tp * p.pp) == 0 and t.global_batch != cfg.global_batch:
        errors.append(
            f"train.global_batch={t.global_batch} != micro_batch x grad_accum x dp / sp = {t.micro_batch} x"
            f" {t.grad_accum} x {cfg.dp} / {p.sp} = {cfg.global_batch}; fix one of them or drop train.global_batch"
        )

    # Optimizer and schedule.
    if o.min_lr > o.lr:
        errors.append(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}")
    if o.warmup_steps > t.steps:
        errors.append(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(f"optim.betas={list(o.betas)} must both lie in [0, 1)")

    # Resources.
    if c.slots_per_node is not None and c.workers > c.slots_per_node and c.workers % c.slots_per_node != 0:
        errors.append(
            f"cluster.workers={c.workers} is not a multiple of cluster.slots_per_node={c.slots_per_node};"
            " use whole nodes"
        )
    if c.min_workers is not None and (c.min_workers > c.workers or c.min_workers % (p.tp * p.pp) != 0):
        errors.append(
            f"cluster.min_workers={c.min_workers} must be at most cluster.workers={c.workers} and a multiple of"
            f" parallel.tp x parallel.pp = {p.tp * p.pp} (a smaller layout keeps tp and pp); fix it or set it to null"
        )
    if c.slots_per_node is not None and p.tp > c.slots_per_node:
        errors.append(
            f"parallel.tp={p.tp} exceeds cluster.slots_per_node={c.slots_per_node}: a tensor-parallel group"
            " would span nodes; lower parallel.tp"
        )

    # Continued pretraining.
    errors += _init_from_errors(m, require_paths=require_paths)

    # Checkpoint.
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "latest", "none") and not resume.isdigit() and require_paths and not Path(resume).exists():
        errors.append(f"checkpoint.resume={resume!r} does not exist; use auto, latest, none, a step number or a step"
                      " directory")
    errors += _convert_every_errors(cfg)

    # Logging.
    if cfg.logging.wandb and require_paths and importlib.util.find_spec("wandb") is None:
        errors.append(f"logging.wandb=true, but the wandb package is not installed: {WANDB_INSTALL}, or set"
                      " logging.wandb=false")

    # Data mixture over training (source names, data.schedule).
    errors += schedule_errors(cfg)

    # Data paths.
    if cfg.run.storage is not None:
        errors += uri_errors("run.storage", cfg.run.storage)
    for i, src in enumerate(cfg.data.sources):
        errors += uri_errors(f"data.sources[{i}].path", src.path)
        if src.default_corpus and uri_scheme(src.path) is not None:
            errors.append(f"data.sources[{i}]: default_corpus is built on local disk, not at {src.path!r}; build the"
                          f" shards with `fm-train shard --out {src.path}` and drop default_corpus")
    if require_paths:
        for i, src in enumerate(cfg.data.sources):
            if uri_scheme(src.path) is not None:
                continue  # object storage: the workers' first read names a missing index or bucket
            if not src.default_corpus and not (Path(src.path) / "index.json").exists():
                reason = "does not exist" if not Path(src.path).exists() else "has no index.json"
                errors.append(
                    f"data.sources[{i}].path={src.path!r} {reason}; build it with `fm-train shard --out {src.path}`"
                    " or set default_corpus: true"
                )
    return errors


def _expert_parallel_errors(cfg: FmConfig) -> list[str]:
    """parallel.ep splits the experts among data-parallel ranks: the model must have experts, ep must
    divide their number and the data-parallel size (also the smallest one an elastic run shrinks to)."""
    m, p = cfg.model, cfg.parallel
    if m.moe is None:
        return [f"parallel.ep={p.ep} splits experts, but model.family={m.family} has none (model.moe is unset);"
                " set parallel.ep=1, or train a Mixture-of-Experts model (model.preset: moe-tiny)"]
    errors = []
    if p.zero_stage == 3:
        errors.append(f"parallel.ep={p.ep} with parallel.zero_stage=3: DeepSpeed's ZeRO-3 does not partition expert"
                      " parameters over the expert-data-parallel group; use parallel.zero_stage=1 or 2 (their"
                      " optimizer states are partitioned over it), or parallel.ep=1")
    if p.zero_stage == 0:
        errors.append(f"parallel.ep={p.ep} with parallel.zero_stage=0: DeepSpeed then saves each expert-parallel"
                      " rank's optimizer whole in a file of its own, which fm-train cannot reshard or convert; use"
                      " parallel.zero_stage=1 or 2 (the optimizer states partitioned, less memory), or parallel.ep=1")
    if m.moe.experts % p.ep:
        errors.append(f"parallel.ep={p.ep} does not divide model.moe.experts={m.moe.experts}: each rank of an"
                      " expert-parallel group holds experts / ep of them; pick an ep that divides it")
    return errors + _carved_from_dp(cfg, "ep", "expert-parallel groups are carved out of the data-parallel ranks")


def _carved_from_dp(cfg: FmConfig, axis: str, why: str) -> list[str]:
    """``parallel.<axis>`` groups are made of data-parallel ranks: it must divide dp, also the smallest dp an
    elastic run shrinks to (``cluster.min_workers``)."""
    p, c = cfg.parallel, cfg.cluster
    size = getattr(p, axis)
    errors = []
    if c.workers % (p.tp * p.pp) == 0 and cfg.dp % size:
        errors.append(f"parallel.{axis}={size} does not divide the data-parallel size {cfg.dp} (cluster.workers="
                      f"{c.workers} / (tp {p.tp} x pp {p.pp})): {why}; set cluster.workers so that dp is a multiple"
                      f" of {axis}")
    if c.min_workers is not None and (c.min_workers // (p.tp * p.pp)) % size:
        errors.append(f"cluster.min_workers={c.min_workers} leaves a data-parallel size that parallel.{axis}={size}"
                      f" does not divide; raise it to a multiple of tp x pp x {axis} or set it to null")
    return errors


def _sequence_errors(cfg: FmConfig) -> list[str]:
    """parallel.sp shares samples among data-parallel ranks and splits their tokens, then their heads;
    parallel.tp_sequence_parallel splits the tokens over the tp ranks outside their matmuls."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    errors = []
    if p.tp_sequence_parallel:
        if p.tp == 1:
            errors.append("parallel.tp_sequence_parallel=true splits the sequence over the tensor-parallel ranks, and"
                          " parallel.tp=1 has none; raise parallel.tp or turn it off")
        elif d.seq_len % (p.tp * p.sp):
            errors.append(f"parallel.tp_sequence_parallel=true: parallel.tp={p.tp} x parallel.sp={p.sp} does not divide"
                          f" data.seq_len={d.seq_len} (outside the tp matmuls each rank holds seq_len / (sp x tp)"
                          f" tokens); pick a seq_len that is a multiple of {p.tp * p.sp}")
    if p.sp == 1:
        return errors
    if p.ep > 1:
        errors.append(f"parallel.sp={p.sp} with parallel.ep={p.ep}: sequence and expert parallelism do not compose yet"
                      " (both are carved out of the data-parallel ranks); set one of them to 1")
    errors += _carved_from_dp(cfg, "sp", "the ranks of a sequence-parallel group are data-parallel ranks sharing"
                                        " their samples")
    if d.seq_len % p.sp:
        errors.append(f"parallel.sp={p.sp} does not divide data.seq_len={d.seq_len}: each rank of a sequence-parallel"
                      f" group holds seq_len / sp tokens; pick a seq_len that is a multiple of {p.sp}")
    heads, kv = m.n_heads // p.tp, m.n_kv_heads // p.tp
    if m.n_heads % p.tp == 0 and heads % p.sp:
        errors.append(f"parallel.sp={p.sp} does not divide the {heads} attention heads per tp rank (model.n_heads="
                      f"{m.n_heads} / parallel.tp={p.tp}): after the all-to-all each rank computes heads / sp of"
                      " them; pick an sp that divides it")
    if m.n_kv_heads % p.tp == 0 and kv and kv % p.sp and p.sp % kv:
        errors.append(f"parallel.sp={p.sp} and the {kv} kv heads per tp rank (model.n_kv_heads={m.n_kv_heads} /"
                      f" parallel.tp={p.tp}): one must divide the other (fewer kv heads than sp are repeated so that"
                      " each rank gets the one its query heads use); pick such an sp")
    return errors


def _convert_every_errors(cfg: FmConfig) -> list[str]:
    """``convert.every`` exports committed checkpoints: it needs one at each of its steps."""
    every, ckpt = cfg.convert.every, cfg.checkpoint.every
    if every == 0:
        return []
    if ckpt == 0:
        return [f"convert.every={every} exports checkpoints during training, but checkpoint.every=0 saves only at the"
                f" end; set checkpoint.every to {every} or a divisor of it, or convert.every=0"]
    if every % ckpt != 0:
        return [f"convert.every={every} is not a multiple of checkpoint.every={ckpt}: an export is made from the"
                f" checkpoint of its step; set convert.every to a multiple of {ckpt} (e.g."
                f" {max(ckpt, every // ckpt * ckpt)})"]
    wait, limit = cfg.convert.end_wait_s, cfg.cluster.save_timeout_s
    if wait >= limit:
        return [f"convert.end_wait_s={wait:g} is not below cluster.save_timeout_s={limit:g}: the launcher would take"
                " rank 0 waiting for its last export for a hang; lower convert.end_wait_s or raise"
                " cluster.save_timeout_s"]
    return []


def _init_from_errors(m: ModelConfig, *, require_paths: bool) -> list[str]:
    """``model.init_from`` must be a readable Hugging Face dir whose shape every explicitly set field agrees with."""
    if m.init_from is None:
        return []
    if not hf_config_file(m.init_from).is_file():
        if not require_paths:
            return []  # planning elsewhere: `plan` warns through missing_paths
        return [f"model.init_from={m.init_from!r} has no config.json; point it at a Hugging Face model dir"
                " (save_pretrained output) or set it to null"]
    try:
        shape = read_hf_shape(m.init_from)
    except ValueError as exc:
        return [f"model.init_from={m.init_from!r}: {exc}"]
    return [
        f"model.{field}={getattr(m, field)!r} conflicts with model.init_from (config.json {hf_key_of(field, shape['family'])}="
        f"{value!r}); drop model.{field} (and model.preset) to take the checkpoint's shape"
        for field, value in shape.items()
        if field not in FREE_FIELDS and field_differs(getattr(m, field), value)
    ]


def field_differs(now: Any, stored: Any) -> bool:
    """Whether a model field differs from what ``config.json`` gives; a section (``model.moe``) is compared
    on the keys ``config.json`` sets (the others, such as the z-loss weight, are the run's to choose)."""
    if isinstance(stored, dict) and hasattr(now, "model_dump"):
        now = {k: v for k, v in now.model_dump().items() if k in stored}
    return now != stored


def missing_paths(cfg: FmConfig) -> list[str]:
    """Data paths (and ``model.init_from``) that do not exist on this machine (``plan`` warns about them)."""
    paths = [s.path for s in cfg.data.sources
             if not s.default_corpus and uri_scheme(s.path) is None and not Path(s.path).exists()]
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).exists():
        paths.append(cfg.model.init_from)
    return paths
