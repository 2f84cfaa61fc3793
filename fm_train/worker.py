"""One training process: rank environment -> process groups -> data -> module -> engine -> loop.

Every layout trains here: data parallel (ZeRO 0-3), tensor parallel, pipeline parallel and their
products. The module and the engine kind follow from ``parallel.tp``/``parallel.pp``
(the model family's ``build_train_module``; a pipeline gets DeepSpeed's ``PipelineEngine``
and the loop its ``train_batch`` step); the data stream is split by the dp coordinate only.

Resumes from ``checkpoint.resume`` (auto: the run's latest complete checkpoint) and saves every
``checkpoint.every`` steps and at the end, through :mod:`fm_train.engine.checkpointing`.

Runs under any launcher that sets the torchrun variables (Ray actors, ``torchrun``, ``srun``):
``fm-train worker CONFIG [--set k=v ...]``. Returns an exit code instead of exiting, so the Ray
actor can report it; every rank leaves through a barrier and a process-group teardown.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fm_train.config import ConfigError, FmConfig, dump_config, load_config
from fm_train.dist.env import RankEnv, ensure_extension_cache
from fm_train.dist.topology import Topology
from fm_train.families import FamilySpec, family_of

if TYPE_CHECKING:
    from fm_train.dist.groups import ParallelGroups
    from fm_train.parallel.sharded_init import InitSource
    from fm_train.convert.background import BackgroundExports


RENDEZVOUS_EXIT_CODE = 4
"""Exit code of a rank that could not connect to its peers (its message names addresses, ports and the
fix): the launcher retries once on a new port, then stops instead of spending cluster.max_restarts."""

RESTART_EXIT_CODE = 3
"""Exit code of a rank that wants the group restarted from the last checkpoint (e.g. after recording a
bad shard): the launcher treats it as any failure (a restart within ``cluster.max_restarts``), unlike
exit code 2 (bad config, data or checkpoint), which a restart would only repeat."""


PEER_FAILURE_EXIT_CODE = 5
"""Exit code of a rank whose collective failed because a peer or the network went away (in a step or
in a checkpoint save): it did nothing wrong, so the launcher restarts the group from the last
checkpoint, with fewer workers when a node is gone. Never 2: a lost peer is not a local disk or
config problem (:mod:`fm_train.dist.peer_loss` tells the two apart)."""


class RestartNeeded(RuntimeError):
    """The run can go on, but only after every rank restarts from the last checkpoint."""


def _check_world(cfg: FmConfig, env: RankEnv) -> None:
    if env.world_size != cfg.world_size:
        raise ConfigError(
            f"cluster.workers={cfg.world_size} but the launcher started WORLD_SIZE={env.world_size} processes;"
            f" pass --set cluster.workers={env.world_size} (the global batch depends on it)"
        )


def _engine_mpu(topo: Topology, groups: ParallelGroups) -> ParallelGroups | None:
    """What ``deepspeed.initialize`` gets as ``mpu``: our groups for tp without a pipeline, else None.

    A pipeline engine builds its grid from the ``PipelineModule`` and must not get one; a pure dp run
    needs none (DeepSpeed's default world group is the dp group).
    """
    return groups if topo.tp > 1 and topo.pp == 1 else None


def _model_metrics(family: FamilySpec, engine: Any) -> Callable[[], dict[str, tuple[float, float]]] | None:
    """What the family's model measures in its forwards (MoE: router losses, expert load), for each record."""
    take = family.modules().take_metrics
    return None if take is None else (lambda: take(engine.module))


def _initial_weights(cfg: FmConfig, family: FamilySpec, resuming: bool) -> "InitSource":
    """The run seed, or on a fresh start with ``model.init_from`` the Hugging Face weights, opened lazily:
    ``build_train_module`` reads only the slices this rank holds (its tp shards, its stage's layers,
    its ZeRO-3 partitions), never the whole checkpoint."""
    if cfg.model.init_from is None or resuming:  # a checkpoint's weights replace any init
        return cfg.run.seed
    from fm_train.convert.hf_import import open_hf

    from fm_train.config.rules import field_differs

    fields, weights = open_hf(Path(cfg.model.init_from), family)
    wrong = [f"model.{k}={getattr(cfg.model, k)!r} vs config.json {v!r}" for k, v in fields.items()
             if k != "max_seq_len" and field_differs(getattr(cfg.model, k), v)]
    if wrong:  # the loader's rules check this; a dir replaced since then must not load silently
        raise ConfigError(f"model.init_from={cfg.model.init_from!r} does not match the model: {'; '.join(wrong)}")
    return weights


def _report_init_read(init: "InitSource", rank: int) -> None:
    """One line per rank: how much of the ``model.init_from`` checkpoint it read (its slices only)."""
    from fm_train.convert.hf_weights import HFWeights

    if isinstance(init, HFWeights) and init.total_bytes:
        print(f"rank {rank}: read {init.bytes_read / 2**20:.1f} MiB of the {init.total_bytes / 2**20:.1f} MiB in"
              f" model.init_from ({100 * init.bytes_read / init.total_bytes:.0f}%: the slices this rank holds)",
              flush=True)


def _banner(cfg: FmConfig, family: FamilySpec, topo: Topology, backend: str) -> str:
    p = cfg.parallel
    within = "".join(f", {name} {size} within dp" for name, size in (("ep", topo.ep), ("sp", topo.sp)) if size > 1)
    extras = "".join(f", {what}" for what, on in (("tp sequence split", p.tp_sequence_parallel and p.tp > 1),
                                                   ("document masking", cfg.data.document_masking)) if on)
    return (f"fm-train worker: world {topo.world} = dp {topo.dp} x tp {topo.tp} x pp {topo.pp}{within} ({backend}),"
            f" ZeRO-{cfg.parallel.zero_stage}, {cfg.precision}, {cfg.model.family}{extras},"
            f" {family.sizes.parameter_count(cfg.model) / 1e6:.2f}M params,"
            f" global batch {cfg.global_batch} x {cfg.data.seq_len} tokens,"
            f" {family.sizes.flops_per_token(cfg.model, cfg.data.seq_len) / 1e6:.2f} MFLOP/token,"
            f" {cfg.train.steps} steps")


def _hf_exports(cfg: FmConfig) -> "BackgroundExports | None":
    """Rank 0's handle on the Hugging Face exports of ``convert.every`` (None when it is 0)."""
    if not cfg.convert.every:
        return None
    from fm_train.convert.background import BackgroundExports

    return BackgroundExports(Path(cfg.run.dir), dtype=cfg.convert.dtype, keep=cfg.convert.keep, storage=cfg.run.storage,
                             retries=cfg.checkpoint.upload_retries, end_wait_s=cfg.convert.end_wait_s)


def run_worker(cfg: FmConfig) -> int:
    """Train ``cfg`` as the rank the environment names; returns 0 when every step ran."""
    # Heavy imports here, not at module import: the CLI and the launcher import this module cheaply.
    from data_shards.errors import BadShardError
    from fm_train.engine.signals import StopRequest
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.heartbeat import Heartbeat
    from fm_train.dist.rendezvous import local_endpoint, rendezvous_errors
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.engine.build import memory_budget_gib, planned_peak_gib
    from fm_train.dist.host_memory import HostMemory, requested_policy
    from fm_train.engine.goodput import Goodput
    from fm_train.engine.loop import throughput_spec
    from fm_train.engine.train_module import build_train_module
    from fm_train.engine import checkpointing
    from fm_train.engine import data as engine_data
    from fm_train.families.vocab import resolve_vocab
    import torch

    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.process_group import shutdown_distributed

    family = family_of(cfg.model)  # resolved once, handed to what needs it
    env = RankEnv.from_environ()
    _check_world(cfg, env)
    try:
        malloc = requested_policy()  # checked before anything starts; None: chosen by the plan below
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # SIGTERM (preemption, the launcher stopping the group) and SIGINT: finish the step, save, exit 0.
    stop = StopRequest().install()
    ensure_extension_cache()
    backend = init_distributed(env)
    is_rank0 = env.rank == 0
    heartbeat = Heartbeat.from_environ()
    try:
        topo = Topology(world=env.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep,
                        sp=cfg.parallel.sp)
        # First thing after joining, on every rank: each group is a collective over the world.
        with rendezvous_errors(env, "creating the dp/tp/pp groups"):
            groups = ParallelGroups(topo)
        print(f"rank {env.rank}: node {os.environ.get('FM_TRAIN_NODE_IP', '?')}, {local_endpoint()},"
              f" coordinates {topo.coord(env.rank)}", flush=True)
        sources = engine_data.prepare_sources(cfg, family, is_rank0=is_rank0)
        info = engine_data.check_sources(cfg, sources)
        # model.vocab_size: auto becomes the shards' number here, before anything is built or saved.
        auto_vocab, cfg = cfg.model.vocab_size == "auto", resolve_vocab(cfg, family, info)
        run_dir = Path(cfg.run.dir)
        if is_rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = run_dir / "config.resolved.yaml"  # by rename: a rank's actor may be reading it right now
            (tmp := resolved.with_name(f".{resolved.name}.{os.getpid()}")).write_text(dump_config(cfg))
            os.replace(tmp, resolved)
            print(_banner(cfg, family, topo, backend), flush=True)
            if auto_vocab:
                print(f"model.vocab_size: auto = {cfg.model.vocab_size} (the {info.vocab_size} tokens of"
                      f" {info.tokenizer_dir} and the {family.name} special tokens it lacks)", flush=True)

        # CPU ranks: activations reused from the heap where the plan leaves room for what it keeps, else
        # each freed at once (fm_train.dist.host_memory); the heap's growth trimmed after a step.
        budget = memory_budget_gib(cfg)
        host_memory = HostMemory.configure(malloc, gpu=torch.cuda.is_available(), budget_gib=budget,
                                           plan_gib=planned_peak_gib(cfg, family))
        if is_rank0 and malloc is None and host_memory.policy == "small" and not torch.cuda.is_available():
            print(f"host memory: the plan's peak is close to this rank's budget ({budget:.1f} GiB):"
                  " freed activations go back to the OS at once (slower steps; FM_TRAIN_HOST_MALLOC=reuse keeps"
                  " them for reuse)", flush=True)
        tokenizer_hash = getattr(info, "tokenizer_hash", None)
        resume_from = checkpointing.resume_point(cfg, topo)
        init = _initial_weights(cfg, family, resuming=resume_from is not None)
        module = build_train_module(cfg, family, groups, init=init)
        _report_init_read(init, env.rank)
        engine, scheduler = build_engine(cfg, module, blocks=family.modules().block_types, family=family,
                                         mpu=_engine_mpu(topo, groups))
        state = TrainState(lr_scheduler=scheduler)
        if resume_from is not None:
            checkpointing.restore(engine, resume_from, cfg, family, state, tokenizer_hash)
            if is_rank0:
                print(f"resumed from {resume_from} at step {state.step}", flush=True)
        save = checkpointing.checkpoint_hook(cfg, family, topo, is_rank0=is_rank0, tokenizer_hash=tokenizer_hash,
                                             rank=env.rank, on_save_start=lambda step: heartbeat.beat(step, "save"),
                                             exports=_hf_exports(cfg) if is_rank0 else None)
        # Split by the dp coordinate alone: tp and pp peers of one replica get identical batches, and so do
        # the sp ranks of a sequence-parallel group (each keeps its chunk of the tokens).
        dp_rank, dp_size = topo.batch_rank(env.rank), topo.batch_dp
        skip = engine_data.recorded_bad_shards(run_dir) if cfg.data.on_bad_shard == "skip" else []
        if skip and is_rank0:
            print(f"leaving out {len(skip)} shard(s) that earlier attempts found bad"
                  f" ({engine_data.bad_shards_dir(run_dir)}): {', '.join(skip)}", flush=True)
        objective = engine_data.data_objective(cfg, family, info)  # what the family's loss needs the batches to hold
        batches = engine_data.train_batches(cfg, sources, dp_rank=dp_rank, dp_size=dp_size, state=state.data_state,
                                            skip_shards=skip, objective=objective)
        # Evaluation leaves out what training does (recorded, resumed and start-up finds); a shard it
        # finds bad first is recorded below and left out after the restart, as when training finds it.
        val = engine_data.val_batches(cfg, sources, dp_rank=dp_rank, dp_size=dp_size,
                                      skip_shards=engine_data.shards_left_out(skip, state.data_state),
                                      objective=objective)
        lg = cfg.logging
        wandb = ({"project": lg.wandb_project, "entity": lg.wandb_entity, "tags": lg.wandb_tags, "mode": lg.wandb_mode,
                  "name": cfg.run.name, "config": cfg.model_dump(mode="json")} if lg.wandb else None)
        sink = MetricsSink(run_dir, enabled=is_rank0, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                           wandb=wandb, line_fields=family.modules().metric_fields)
        heartbeat.beat(state.step, "ready")
        try:
            train(engine, batches, state, cfg, sink=sink, spec=throughput_spec(cfg, family, engine.device),
                  val_batches=val, hooks=[save, heartbeat], group=groups.get_data_parallel_group(),
                  stop=lambda: stop.requested, on_stop=save.save, control_group=groups.control,
                  model_metrics=_model_metrics(family, engine),
                  goodput=Goodput.for_run(run_dir, state.tokens_seen, write=is_rank0),
                  after_step=host_memory.trim)
        except BadShardError as exc:
            if cfg.data.on_bad_shard != "skip":
                raise
            # This rank cannot drop the shard alone mid-step: its peers read other samples and wait in
            # the step's collectives. Record it; the restart leaves it out on every rank.
            path = engine_data.record_bad_shard(run_dir, exc.key, str(exc), rank=env.rank, step=state.step + 1)
            raise RestartNeeded(f"{exc}\nrank {env.rank}: recorded in {path} under data.on_bad_shard: skip; the"
                                " restart resumes from the last checkpoint with this shard left out on every rank"
                                ) from exc
        finally:
            sink.close()
        failed = save.close()  # the last checkpoint's upload, when run.storage is set
        if failed:
            print(f"rank {env.rank}: uploading {', '.join(failed)} to {cfg.run.storage} failed (see the log above);"
                  f" those steps are on local disk only", flush=True)
        if state.step < cfg.train.steps and is_rank0:
            print(f"stopped by {stop.signal_name or 'request'} after step {state.step}; checkpoint saved,"
                  " run again to resume", flush=True)
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    finally:
        stop.uninstall()
    shutdown_distributed()
    return 0


def add_worker_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train worker``: a config file and ``--set a.b=c`` overrides."""
    parser.add_argument("config", nargs="?", default=None, help="run config YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=100 (repeatable)")
    return parser


def run_worker_cli(args: argparse.Namespace) -> int:
    """Entry of ``fm-train worker``: load and validate the config, then :func:`run_worker`.

    A config, data or checkpoint problem (``ConfigError``, ``data_shards.DataError``,
    ``CheckpointError``: messages written for the user) prints its message and returns 2, which the
    launcher does not retry; :class:`RestartNeeded` returns :data:`RESTART_EXIT_CODE`, which it does;
    a failure to connect to the peers returns :data:`RENDEZVOUS_EXIT_CODE`; a peer or the network
    gone later (a collective failed in a step or a save) returns :data:`PEER_FAILURE_EXIT_CODE`, with
    one line; anything else propagates with its traceback.
    """
    from data_shards.errors import DataError
    from fm_train.checkpoint import CheckpointError
    from fm_train.dist.peer_loss import PeerLost, first_line, is_peer_failure
    from fm_train.dist.rendezvous import RendezvousError

    try:
        cfg = load_config(args.config, args.overrides)
        return run_worker(cfg)
    except RendezvousError as exc:
        print(f"fm-train worker: {exc}", file=sys.stderr)
        return RENDEZVOUS_EXIT_CODE
    except RestartNeeded as exc:
        print(f"fm-train worker: {exc}", file=sys.stderr)
        return RESTART_EXIT_CODE
    except PeerLost as exc:
        print(f"fm-train worker: {exc}", file=sys.stderr)
        return PEER_FAILURE_EXIT_CODE
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"fm-train worker: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_peer_failure(exc):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"fm-train worker: rank {rank}: stopped because a peer or the network went away ({first_line(exc)});"
              " the launcher restarts the group from the last checkpoint, with fewer workers if a node is gone",
              file=sys.stderr)
        return PEER_FAILURE_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    """``python -m fm_train.worker CONFIG [--set ...]`` (what ``fm-train worker`` does)."""
    parser = add_worker_arguments(argparse.ArgumentParser(prog="fm-train worker", description=__doc__))
    return run_worker_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
