"""``fm-train plan``: validate a config and show what a run would do, without starting anything."""

from __future__ import annotations

import argparse

from fm_train.cli.common import ConfigError, add_config_arguments, config_from_args, fail
from fm_train.config import FmConfig, dump_config
from fm_train.config.mixture import describe_mixture
from fm_train.config.rules import check_rules, missing_paths
from fm_train.families import family_of
from fm_train.families.spec import FamilySpec
from fm_train.families.vocab import plan_vocab
from fm_train.plan.fit import fit
from fm_train.plan.flops import flops_per_step
from fm_train.plan.layout import format_rank_table, rank_table
from fm_train.plan.memory import GIB, estimate_memory, format_memory


#: The MFU a GPU step-time estimate assumes unless ``--mfu`` says otherwise.
ASSUMED_MFU = 0.40


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fm-train plan``."""
    add_config_arguments(parser)
    parser.add_argument("--no-config", action="store_true", help="do not print the resolved config, only the layout")
    parser.add_argument("--check-paths", action="store_true",
                        help="fail (instead of warning) when a data path does not exist on this machine")
    parser.add_argument("--fit", type=_budget, default=None, metavar="GIB",
                        help="also find the cheapest memory settings that fit GIB per device (the fewest recomputed"
                             " blocks, then the smallest tp within a node, then the lowest ZeRO stage; world, pp, sp, ep,"
                             " micro-batch and global batch kept) and print the --set arguments; exit 1 if none fits")
    parser.add_argument("--mfu", type=_fraction, default=ASSUMED_MFU,
                        help=f"the model FLOPs utilisation the step-time estimate assumes (default {ASSUMED_MFU}; 0.4-0.5"
                             " is what well-tuned dense training reaches on H100s)")


def run_plan(args: argparse.Namespace) -> int:
    """Print the resolved config, the layout summary and the rank table; exit 2 on a bad config."""
    try:
        cfg = config_from_args(args, require_paths=args.check_paths)
        cfg, vocab_note = plan_vocab(cfg, family_of(cfg.model))  # model.vocab_size: auto as a number
    except ConfigError as exc:
        return fail("plan", str(exc))
    if not args.no_config:
        print("# resolved config")
        print(dump_config(cfg))
    p, family = cfg.parallel, family_of(cfg.model)
    if vocab_note is not None:
        print(f"# vocabulary: {vocab_note}")
    experts = "".join(f" ({name} {size} within dp)" for name, size in (("ep", p.ep), ("sp", p.sp)) if size > 1)
    print(f"# layout: world={cfg.world_size} = pp {p.pp} x dp {cfg.dp}{experts} x tp {p.tp}; zero stage {p.zero_stage}; "
          f"{cfg.precision}")
    print(f"# batch: global {cfg.global_batch} sequences = micro {cfg.train.micro_batch} x accum "
          f"{cfg.train.grad_accum} x dp {cfg.dp}{f' / sp {p.sp}' if p.sp > 1 else ''};"
          f" {cfg.tokens_per_step:,} tokens per step")
    mixture = describe_mixture(cfg)
    if mixture is not None:
        print(f"# data mixture: {mixture}")
    active = family.sizes.active_parameter_count
    per_token = "" if active is None else f" ({active(cfg.model):,} active per token)"
    flops = flops_per_step(family, cfg.model, cfg.data.seq_len, cfg.tokens_per_step)
    print(f"# model: {cfg.model.family}, {family.sizes.parameter_count(cfg.model):,} parameters{per_token}; "
          f"{flops:.3e} model FLOPs per step (6N + 12 L h s per token{', N active' if active is not None else ''})")
    device = "gpu" if cfg.cluster.gpus_per_worker > 0 else "cpu"
    estimate = estimate_memory(cfg, family, device=device)
    print(format_memory(estimate, device))
    if device == "gpu":
        card, source = _card(cfg)
        fixes = fitting_changes(cfg, family, card) if card is not None and estimate.device_total / GIB > card else []
        print(card_fit(estimate.device_total / GIB, card, source, fixes=fixes))
        print(step_time(flops, cfg, *_peak(cfg), mfu=args.mfu))
    for path in missing_paths(cfg):
        print(f"# warning: data path {path!r} does not exist on this machine")
    print(format_rank_table(rank_table(cfg)))
    if args.fit is not None:
        return _print_fit(cfg, family, args.fit, device)
    return 0


def _print_fit(cfg: FmConfig, family: FamilySpec, budget: float, device: str) -> int:
    """``--fit``: the chosen setting, its ``--set`` arguments and the best of each tp size; 1 when none fits."""
    chosen, per_tp = fit(cfg, family, budget, device=device)
    if chosen is None:
        print(f"# fit {budget:g} GiB: no setting fits (tp up to a node, any recomputation, ZeRO 1-3, with pp"
              f" {cfg.parallel.pp}, sp {cfg.parallel.sp}, micro_batch {cfg.train.micro_batch}); lower"
              " train.micro_batch, or raise parallel.pp or parallel.sp")
        return 1
    print(f"# fit {budget:g} GiB: {chosen.describe()}")
    print("#   apply: " + " ".join(f"--set {o}" for o in chosen.overrides()))
    for other in per_tp:
        if other is not chosen:
            print(f"#   also fits: {other.describe()}")
    return 0


def _budget(text: str) -> float:
    """A memory budget in GiB, > 0 (argparse type)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of GiB")
    return value


def _fraction(text: str) -> float:
    """An MFU in (0, 1] (argparse type)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]; an MFU of 40 % is 0.4")
    return value


def step_time(flops: float, cfg: FmConfig, peak: float | None, source: str, *, mfu: float) -> str:
    """The roofline estimate of a step: the model FLOPs over every GPU's peak at an assumed MFU."""
    if peak is None:
        return ("# step time: unknown (no GPU here and cluster.gpu_peak_tflops unset): set it to the card's data-sheet"
                " peak to get an estimate")
    seconds = flops / (cfg.world_size * peak * mfu)
    tokens = cfg.tokens_per_step / seconds
    return (f"# step time: ~{seconds:.2f} s, {tokens:,.0f} tokens/s ({tokens / cfg.world_size:,.0f} per GPU): a roofline"
            f" estimate at an assumed {mfu:.0%} MFU of the {peak / 1e12:g} TFLOP/s peak ({source}), not a measurement")


def _peak(cfg: FmConfig) -> tuple[float | None, str]:
    """``(FLOP/s, where the figure comes from)`` of each GPU at the run's precision; None when unknown."""
    if cfg.cluster.gpu_peak_tflops is not None:
        return cfg.cluster.gpu_peak_tflops * 1e12, "cluster.gpu_peak_tflops"
    import torch

    if torch.cuda.is_available():
        from fm_train.engine.flops import table_peak_flops

        name = torch.cuda.get_device_name(0)
        peak = table_peak_flops(name, cfg.precision)
        return (peak, f"this machine's {name}, data sheet") if peak is not None else (None, "")
    return None, ""


def _card(cfg: FmConfig) -> tuple[float | None, str]:
    """``(GiB, where the figure comes from)`` of the GPU the plan is held against; None when unknown."""
    if cfg.cluster.gpu_memory_gib is not None:
        return cfg.cluster.gpu_memory_gib, "cluster.gpu_memory_gib"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GIB, f"this machine's {props.name}"
    return None, ""


def fitting_changes(cfg: FmConfig, family: FamilySpec, card_gib: float) -> list[str]:
    """Single changes of the sequence split that make the plan fit ``card_gib``, every config rule held:
    ``parallel.tp_sequence_parallel=true`` (when tp > 1), and the smallest ``parallel.sp`` (dividing dp,
    seq_len and the heads) with ``train.grad_accum`` raised by sp so that the global batch stays, each
    with its peak."""
    def peak_with(accum: int = 1, **parallel: object) -> float | None:
        trial = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update=parallel),
                                       "train": cfg.train.model_copy(update={"grad_accum": cfg.train.grad_accum * accum})})
        if check_rules(trial, require_paths=False):
            return None
        return estimate_memory(trial, family, device="gpu").device_total / GIB

    fixes = []
    if cfg.parallel.tp > 1 and not cfg.parallel.tp_sequence_parallel:
        peak = peak_with(tp_sequence_parallel=True)
        if peak is not None and peak <= card_gib:
            fixes.append(f"parallel.tp_sequence_parallel=true (peak {peak:.2f} GiB)")
    for sp in range(cfg.parallel.sp + 1, cfg.dp + 1):
        if cfg.dp % sp or sp % cfg.parallel.sp:
            continue
        accum = sp // cfg.parallel.sp  # fewer batch replicas: more micro-batches each keep the global batch
        peak = peak_with(accum=accum, sp=sp)
        if peak is not None and peak <= card_gib:
            fixes.append(f"parallel.sp={sp}" + (f" with train.grad_accum={cfg.train.grad_accum * accum}" if accum > 1
                                                else "") + f" (peak {peak:.2f} GiB)")
            break
    return fixes


def card_fit(peak_gib: float, card_gib: float | None, source: str, fixes: list[str] | None = None) -> str:
    """The plan's peak against the card: the margin when it fits, a warning naming the fixes when not
    (``fixes``: single changes known to fit, from :func:`fitting_changes`)."""
    if card_gib is None:
        return ("# card: unknown (no GPU here and cluster.gpu_memory_gib unset): set cluster.gpu_memory_gib to"
                " check the peak against it")
    if peak_gib <= card_gib:
        return f"# card: fits, peak {peak_gib:.2f} GiB of {card_gib:g} GiB ({source}), {card_gib - peak_gib:.2f} GiB left"
    return (f"# warning: the planned peak {peak_gib:.2f} GiB exceeds the {card_gib:g} GiB card ({source}) by"
            f" {peak_gib - card_gib:.2f} GiB: lower train.micro_batch (raising train.grad_accum keeps the batch),"
            " turn on parallel.activation_checkpointing, raise parallel.zero_stage, or split the model further"
            " (parallel.tp, parallel.pp)" + (f"; each of these fits alone: {', '.join(fixes)}" if fixes else ""))
