"""The whole ``fm-train launch`` flow: config, cluster, corpus, training with restarts, conversion, sample.

Everything heavy (corpus building, conversion, sampling) runs in child processes
(:mod:`launcher.steps`) so that the driver never imports torch.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from fm_train.config import FmConfig, dump_config, load_config
from fm_train.config.notices import precision_notice
from launcher.cluster import Demand, check_capacity, connect, resolve_address
from launcher.lease import run_lease
from launcher.options import LaunchOptions
from launcher.outcomes import Succeeded, exit_code
from launcher.runstate import latest_checkpoint

Say = Callable[[str], None]


def say_flush(text: str) -> None:
    """Print a driver line at once (stdout is block-buffered when it is a file or a Ray job log)."""
    print(text, flush=True)


def project_root() -> Path:
    """The checkout that holds this package (where cluster_configs/ lives); the working directory otherwise."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def default_config_path() -> Path | None:
    """cluster_configs/local.yaml of the project, or None when it is not there (built-in defaults apply)."""
    path = project_root() / "cluster_configs" / "local.yaml"
    return path if path.is_file() else None


def load_run_config(config: str | Path | None, overrides: Sequence[str], options: LaunchOptions,
                    say: Say = say_flush) -> tuple[FmConfig, str | None, Path | None]:
    """The validated config, the Ray address to use (None: private local) and the config file used."""
    path = Path(config) if config is not None else default_config_path()
    if config is None:
        say(f"config: {path}" if path else "config: built-in defaults (cluster_configs/local.yaml not found)")
    cfg = load_config(path, overrides)
    notice = precision_notice(cfg)
    if notice is not None:
        say(notice)
    address = resolve_address(options.address, cfg.cluster.address)
    if address is None:
        # Everything runs on this machine, so every data path must exist here, now.
        cfg = load_config(path, overrides, require_paths=True)
    return cfg, address, path


def launch(config: str | Path | None, overrides: Sequence[str], options: LaunchOptions, say: Say = say_flush) -> int:
    """Run the full flow; return the process exit status (0 only when training succeeded)."""
    cfg, address, _ = load_run_config(config, overrides, options, say)
    run_dir = Path(cfg.run.dir).resolve()
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Before anything starts or writes: a second launch on this run is refused, naming the first.
        with run_lease(run_dir, cfg.run.storage, say):
            return _launch_leased(cfg, address, run_dir, options, say)
    finally:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when still empty: a launch that never started leaves no run dir


def dry_run(config: str | Path | None, overrides: Sequence[str], options: LaunchOptions, say: Say = say_flush) -> int:
    """``fm-train launch --dry-run``: everything up to the first step, without training. The config check,
    the plan (its peak against the card), the cluster's resources against the request, the slots placed
    with their table, and every node's preflight; then everything is released. Returns 0 only when a real
    launch would start; raises (a user error) at the first thing that would stop it. Takes no lease and
    leaves no run directory behind."""
    from launcher.runner import RunPaths, rehearse  # imports Ray

    cfg, address, _ = load_run_config(config, overrides, options, say)
    problem = _plan_summary(cfg, say)
    run_dir = Path(cfg.run.dir).resolve()
    created = not run_dir.exists()
    conn = connect(address, timeout_s=options.connect_timeout_s)
    try:
        say(f"ray: {'private local instance (127.0.0.1, no dashboard)' if conn.private else address or 'existing connection'}")
        check_capacity(Demand(cfg.cluster.workers, cfg.cluster.cpus_per_worker, cfg.cluster.gpus_per_worker))
        say(f"resources: {cfg.cluster.workers} slots of {cfg.cluster.cpus_per_worker:g} CPU and"
            f" {cfg.cluster.gpus_per_worker:g} GPU available")
        run_dir.mkdir(parents=True, exist_ok=True)  # the preflight's write test needs it
        # A missing default corpus is built by the launch before its workers start: not data to probe yet.
        built = [s for s in cfg.data.sources if s.default_corpus and not (Path(s.path) / "index.json").is_file()]
        for source in built:
            say(f"data: {source.path} does not exist yet; the launch builds it first (default_corpus)")
        probed = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"sources": [s for s in cfg.data.sources if s not in built]})})
        rehearse(probed, RunPaths(run_dir=run_dir, run_dir_arg=cfg.run.dir, workdir=os.getcwd()), options, say)
    finally:
        conn.close()
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
    if problem is not None:
        say(f"dry run: the launch would start, but {problem}")
        return 1
    say("dry run: ok, a launch would start (nothing was trained or written)")
    return 0


def resolve_vocab_here(cfg: FmConfig, say: Say) -> FmConfig:
    """``cfg`` with ``model.vocab_size: auto`` as a number, so that every worker reads the same config; left
    to the workers (which resolve it alike) when the shards cannot be read from the driver."""
    from fm_train.families import family_of
    from fm_train.families.vocab import DataUnreadable, plan_vocab

    try:
        cfg, note = plan_vocab(cfg, family_of(cfg.model))
    except DataUnreadable as exc:
        say(f"model.vocab_size: auto is left to the workers: {exc}")
        return cfg
    if note is not None:
        say(note)
    return cfg


def _plan_summary(cfg: FmConfig, say: Say) -> str | None:
    """The plan's lines a dry run prints (layout, batch, peak memory against the card); what would make the
    run fail once started (the peak over the card), or None."""
    from fm_train.families import family_of
    from fm_train.plan.memory import GIB, estimate_memory

    from fm_train.config import ConfigError
    from fm_train.families.vocab import DataUnreadable, plan_vocab

    try:
        cfg, note = plan_vocab(cfg, family_of(cfg.model))  # the plan needs model.vocab_size: auto as a number
    except DataUnreadable as exc:
        raise ConfigError(str(exc)) from None
    if note is not None:
        say(f"plan: {note}")
    p = cfg.parallel
    say(f"plan: world {cfg.world_size} = pp {p.pp} x dp {cfg.dp} x tp {p.tp}" +
        "".join(f", {name} {size} within dp" for name, size in (("ep", p.ep), ("sp", p.sp)) if size > 1) +
        f"; {cfg.global_batch} sequences, {cfg.tokens_per_step:,} tokens per step")
    gpu = cfg.cluster.gpus_per_worker > 0
    peak = estimate_memory(cfg, family_of(cfg.model), device="gpu" if gpu else "cpu").device_total / GIB
    card = cfg.cluster.gpu_memory_gib
    if not gpu:
        say(f"plan: peak {peak:.2f} GiB per worker process (CPU run: no card to hold it against)")
        return None
    if card is None:
        say(f"plan: peak {peak:.2f} GiB per GPU; set cluster.gpu_memory_gib to hold it against the card")
        return None
    if peak > card:
        return (f"its planned peak {peak:.2f} GiB exceeds the {card:g} GiB card (cluster.gpu_memory_gib); `fm-train plan`"
                " names the changes that fit")
    say(f"plan: peak {peak:.2f} GiB per GPU of {card:g} GiB (cluster.gpu_memory_gib), {card - peak:.2f} GiB left")
    return None


def _launch_leased(cfg: FmConfig, address: str | None, run_dir: Path, options: LaunchOptions, say: Say) -> int:
    """:func:`launch` once the run's lease is held."""
    from launcher.runner import RunPaths, train  # imports Ray

    conn = connect(address, timeout_s=options.connect_timeout_s)
    try:
        say(f"ray: {'private local instance (127.0.0.1, no dashboard)' if conn.private else address or 'existing connection'}")
        check_capacity(Demand(cfg.cluster.workers, cfg.cluster.cpus_per_worker, cfg.cluster.gpus_per_worker))
        if options.post_training:
            ensure_corpus(cfg, say)
        cfg = resolve_vocab_here(cfg, say)
        text = dump_config(cfg)
        _write_atomic(run_dir / "config.resolved.yaml", text)
        paths = RunPaths(run_dir=run_dir, run_dir_arg=cfg.run.dir, workdir=os.getcwd())
        outcome = train(cfg, paths, options, say)
        say(f"training {outcome.summary()}")
        hf_dir = hf_uri = None
        if isinstance(outcome, Succeeded) and options.post_training and cfg.convert.at_end:
            hf_dir = convert_and_sample(run_dir, cfg, say)
        if hf_dir is not None and cfg.run.storage is not None:
            hf_uri = publish_results(hf_dir, cfg.run.storage, retries=cfg.checkpoint.upload_retries, say=say)
        _summary(run_dir, hf_dir, say, hf_uri)
        return exit_code(outcome)
    finally:
        conn.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step(args: list[str], say: Say) -> int:
    """Run ``python -m launcher.steps ARGS`` with its output passed through; returns the exit code."""
    from launcher.logsink import known_noise

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project_root()), os.environ.get("PYTHONPATH")])),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' weight-loading bars among the step's lines
    proc = subprocess.Popen([sys.executable, "-m", "launcher.steps", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:  # streamed: building a corpus or converting a 70B model takes a while
        if not known_noise(line.rstrip()):
            say(f"  {line.rstrip()}")
    return proc.wait()


def ensure_corpus(cfg: FmConfig, say: Say) -> None:
    """Build each ``default_corpus`` source that has no index.json yet (once, before any worker starts)."""
    for src in cfg.data.sources:
        if not src.default_corpus or (Path(src.path) / "index.json").is_file():
            continue
        say(f"building the default corpus in {src.path} (model.vocab_size {cfg.model.vocab_size}, seq_len {cfg.data.seq_len})")
        code = _step(["corpus", src.path, "--vocab-size", str(cfg.model.vocab_size), "--family", cfg.model.family,
                      "--seq-len", str(cfg.data.seq_len)], say)
        if code != 0:
            raise RuntimeError(f"building the default corpus in {src.path} failed (exit code {code}); see the lines above")


def convert_and_sample(run_dir: Path, cfg: FmConfig, say: Say) -> Path | None:
    """Convert RUN/checkpoints/latest (or, with ``run.storage``, storage's latest) to RUN/hf and print a
    short sample; None when conversion is skipped."""
    # Without a shared run.dir the driver's copy holds only its own node's ranks' files: storage has all.
    ckpt = cfg.run.storage if cfg.run.storage is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        say(f"conversion skipped: {run_dir / 'checkpoints' / 'latest'} names no complete checkpoint")
        return None
    hf_dir = run_dir / "hf"
    say(f"converting {ckpt} to {hf_dir} ({cfg.convert.dtype}, logits verified)")
    code = _step(["convert", str(ckpt), str(hf_dir), "--dtype", cfg.convert.dtype], say)
    if code != 0:
        say(f"conversion failed (exit code {code}); the checkpoint {ckpt} is intact")
        return None
    say("sample from the converted model:")
    if _step(["sample", str(hf_dir)], say) != 0:
        say("sampling failed; the converted model is still in place")
    return hf_dir


def publish_results(hf_dir: Path, storage: str, *, retries: int, say: Say) -> str | None:
    """Upload the verified RUN/hf to ``<run.storage>/hf/`` (files, then its marker); that location, or
    None when the upload failed (the model is then on this machine only, and the lines above say why)."""
    uri = f"{storage.rstrip('/')}/hf"
    say(f"uploading {hf_dir} to {uri}")
    if _step(["publish", str(hf_dir), storage, "--retries", str(retries)], say) != 0:
        return None
    return uri


def _summary(run_dir: Path, hf_dir: Path | None, say: Say, hf_uri: str | None = None) -> None:
    items = [("run directory", run_dir), ("resolved config", run_dir / "config.resolved.yaml"),
             ("metrics", run_dir / "metrics.jsonl"), ("logs", run_dir / "logs"),
             ("placement", run_dir / "placement.json"), ("checkpoints", run_dir / "checkpoints"),
             ("failures", run_dir / "failures.jsonl"), ("hugging face model", hf_dir),
             ("exports in training", run_dir / "hf_steps")]
    say("where everything is:")
    for name, path in items:
        if path is not None and path.exists():
            say(f"  {name:<19} {path}")
    if hf_uri is not None:
        say(f"  {'model in storage':<19} {hf_uri}")
