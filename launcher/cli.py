"""Arguments and entry points of ``fm-train launch | submit | status | logs | stop``.

``fm_train.cli`` wires these in; ``python -m launcher`` offers the same commands on their own. Ray is
imported only inside the run functions, so building the parser costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.options import DEFAULT_WORKER_COMMAND, LaunchOptions, parse_worker_command

_USER_ERRORS = ("ConfigError", "ClusterError", "PreflightError", "PlacementError", "SubmitError", "LeaseError",
                "ValueError")


def _error(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all-ranks", action="store_true", default=None,
                        help="echo every rank's log lines on the driver, not only rank 0's (default: logging.all_ranks)")
    parser.add_argument("--worker-command", default=None, metavar="CMD",
                        help="command each rank runs instead of the trainer, split like a shell line but never run by"
                             " one; {config} is the resolved config path, {python} the workers' interpreter"
                             f" (default: {' '.join(DEFAULT_WORKER_COMMAND)})")


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train launch``."""
    parser.add_argument("config", nargs="?", default=None,
                        help="run config YAML (default: cluster_configs/local.yaml of the project)")
    _add_overrides(parser)
    parser.add_argument("--resume", default=None, metavar="latest|STEP|PATH|none",
                        help="what the run starts from (checkpoint.resume): latest (the newest intact checkpoint of"
                             " run.dir; none there is an error), a step number of run.dir, a step directory, or none"
                             " (from scratch); default: the config's, auto (latest if there is one). Restarts after a"
                             " failure continue from what the run saved since")
    parser.add_argument("--dry-run", action="store_true",
                        help="everything up to the first step, without training: the config check, the plan's peak"
                             " against cluster.gpu_memory_gib, the cluster's resources, the placement table and every"
                             " node's preflight (storage, data, versions); exit 0 only when a launch would start")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (host:6379, ray://host:10001 or auto); overrides cluster.address and"
                             " RAY_ADDRESS; without any of them a private local Ray is started on 127.0.0.1")
    _add_worker_options(parser)
    d = LaunchOptions()
    parser.add_argument("--stop-grace-s", type=float, default=d.stop_grace_s,
                        help="on Ctrl-C/SIGTERM, seconds the workers get to save before SIGKILL (default: %(default)s)")
    parser.add_argument("--failure-grace-s", type=float, default=d.failure_grace_s,
                        help="after a worker failed or hung, seconds before the others are killed (default: %(default)s)")
    parser.add_argument("--max-preemptions", type=int, default=d.max_preemptions,
                        help="relaunches after preemption, separate from cluster.max_restarts (default: %(default)s)")
    parser.add_argument("--placement-timeout-s", type=float, default=d.placement_timeout_s,
                        help="seconds to wait for the cluster to place all worker slots (default: %(default)s)")
    parser.add_argument("--connect-timeout-s", type=float, default=d.connect_timeout_s,
                        help="seconds to wait for a cluster address to answer (default: %(default)s)")
    return parser


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    """The :class:`LaunchOptions` a parsed ``launch`` command line asks for."""
    command = parse_worker_command(args.worker_command) if args.worker_command else DEFAULT_WORKER_COMMAND
    return LaunchOptions(address=args.address, worker_command=command, all_ranks=args.all_ranks,
                         stop_grace_s=args.stop_grace_s, failure_grace_s=args.failure_grace_s,
                         max_preemptions=args.max_preemptions, placement_timeout_s=args.placement_timeout_s,
                         connect_timeout_s=args.connect_timeout_s)


def launch_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of a parsed ``launch`` command line, ``--resume`` last (it wins)."""
    return [*args.overrides, *([f"checkpoint.resume={args.resume}"] if args.resume is not None else [])]


def run_launch(args: argparse.Namespace) -> int:
    """``fm-train launch``: train on Ray with restarts, then convert; returns the exit status."""
    from launcher.job import dry_run, launch

    try:
        run = dry_run if args.dry_run else launch
        return run(args.config, launch_overrides(args), launch_options(args))
    except Exception as exc:
        if type(exc).__name__ in _USER_ERRORS:
            return _error(exc)
        raise


def _add_dashboard_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray job server (dashboard) address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS,"
                             " RAY_ADDRESS or http://127.0.0.1:8265)")


def add_submit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train submit``."""
    parser.add_argument("config", nargs="?", default=None,
                        help="run config YAML inside the project (default: cluster_configs/local.yaml)")
    _add_dashboard_address(parser)
    _add_overrides(parser)
    _add_worker_options(parser)
    parser.add_argument("--working-dir", default=None,
                        help="directory uploaded as the job's working_dir (default: the project root)")
    parser.add_argument("--submission-id", default=None, help="job id to use instead of a generated one")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job to finish and exit 0 only if it SUCCEEDED")
    return parser


def run_submit(args: argparse.Namespace) -> int:
    """``fm-train submit``: submit ``fm-train launch`` as a Ray Job and print the job id."""
    from launcher import submit
    from launcher.job import default_config_path, project_root

    try:
        from fm_train.config import load_config

        # A config error found here costs a second; found on the cluster it costs a job submission.
        load_config(args.config if args.config is not None else default_config_path(), args.overrides)
        working_dir = Path(args.working_dir).resolve() if args.working_dir else project_root()
        extra: list[str] = ["--all-ranks"] if args.all_ranks else []
        if args.worker_command:
            parse_worker_command(args.worker_command)  # fail here, not on the cluster
            extra += ["--worker-command", args.worker_command]
        # The job runs the CLI that submitted it: fm-train's, or ``python -m launcher`` when used alone.
        module = getattr(args, "entry_module", "fm_train.cli")
        entry = submit.launch_entrypoint(submit.relative_config(args.config, working_dir), args.overrides, extra, module)
        # `fm-train stop` SIGTERMs the job's driver, which forwards it to the workers so they save; Ray
        # SIGKILLs the driver after RAY_JOB_STOP_WAIT_TIME_S (3 s by default), too soon for a checkpoint.
        stop_wait = {"RAY_JOB_STOP_WAIT_TIME_S": str(int(LaunchOptions().stop_grace_s + 60))}
        job_id = submit.submit(args.address, entry, working_dir, submission_id=args.submission_id, env_vars=stop_wait)
        print(job_id)
        print(f"submitted: {entry}\nfollow it with: fm-train logs {job_id} --follow", file=sys.stderr)
        if args.wait:
            final = submit.wait(args.address, job_id, timeout_s=float("inf"))
            print(f"job {job_id}: {final}", file=sys.stderr)
            return 0 if final == "SUCCEEDED" else 1
        return 0
    except Exception as exc:
        if type(exc).__name__ in _USER_ERRORS:
            return _error(exc)
        raise


def add_status_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train status``."""
    parser.add_argument("job_id", help="job id printed by fm-train submit")
    _add_dashboard_address(parser)
    return parser


def run_status(args: argparse.Namespace) -> int:
    """``fm-train status``: print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from launcher import submit

    try:
        state, message = submit.status(args.address, args.job_id)
    except submit.SubmitError as exc:
        return _error(exc)
    print(state if not message else f"{state}: {message}")
    return 0


def add_logs_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train logs``."""
    parser.add_argument("job_id", help="job id printed by fm-train submit")
    _add_dashboard_address(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the job ends")
    return parser


def run_logs(args: argparse.Namespace) -> int:
    """``fm-train logs``: print (or follow) the job driver's output."""
    from launcher import submit

    try:
        submit.logs(args.address, args.job_id, follow=args.follow, write=lambda s: print(s, end="", flush=True))
    except submit.SubmitError as exc:
        return _error(exc)
    except KeyboardInterrupt:
        return 130
    return 0


def add_stop_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train stop``."""
    parser.add_argument("job_id", help="job id printed by fm-train submit")
    _add_dashboard_address(parser)
    parser.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    return parser


def run_stop(args: argparse.Namespace) -> int:
    """``fm-train stop``: stop the job; its workers get SIGTERM and save before they exit."""
    from launcher import submit

    try:
        stopped = submit.stop(args.address, args.job_id)
        print(f"stop requested for {args.job_id}" if stopped else f"{args.job_id} was not running")
        if args.wait:
            print(submit.wait(args.address, args.job_id, timeout_s=float("inf")))
    except submit.SubmitError as exc:
        return _error(exc)
    return 0


def add_runs_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fm-train runs``."""
    parser.add_argument("words", nargs="*", metavar="DIR_OR_URI | show NAME",
                        help="`fm-train runs [DIR_OR_URI]` lists the runs in DIR (a run directory, or one holding run"
                             " directories; default $FM_TRAIN_RUNS or ./runs) or under an object-store URI (one run's"
                             " run.storage, or a prefix holding several, e.g. s3://bucket/runs): name, state (running,"
                             " finished, stopped), last step, last loss, latest checkpoint, run.storage, start, host."
                             " `fm-train runs show NAME [--dir DIR_OR_URI]` prints one run in detail, with how to"
                             " resume it")
    parser.add_argument("--dir", default=None, metavar="DIR_OR_URI",
                        help="where `runs show` looks for NAME (default: as `runs`)")
    return parser


def run_runs(args: argparse.Namespace) -> int:
    """``fm-train runs [DIR_OR_URI]`` / ``fm-train runs show NAME``."""
    from launcher import runs

    words = list(args.words)
    try:
        if words[:1] == ["show"]:
            if len(words) != 2:
                raise runs.RunsError("usage: fm-train runs show NAME [--dir DIR_OR_URI]")
            root = runs.open_root(args.dir) if args.dir else runs.default_root()
            with runs.reading(root):
                print(runs.describe_run(runs.find_run(root, words[1])))
            return 0
        if len(words) > 1 or args.dir:
            raise runs.RunsError("usage: fm-train runs [DIR_OR_URI] (or fm-train runs show NAME [--dir DIR_OR_URI])")
        root = runs.open_root(words[0]) if words else runs.default_root()
        with runs.reading(root):
            print(runs.format_runs(runs.find_runs(root)))
    except runs.RunsError as exc:
        return _error(exc)
    return 0


COMMANDS = {
    "launch": ("train on a Ray cluster (or a private local Ray) with restarts, then convert", add_launch_arguments, run_launch),
    "submit": ("submit `fm-train launch` to a Ray cluster as a Ray Job", add_submit_arguments, run_submit),
    "status": ("status of a submitted job", add_status_arguments, run_status),
    "logs": ("logs of a submitted job", add_logs_arguments, run_logs),
    "stop": ("stop a submitted job (workers save first)", add_stop_arguments, run_stop),
    "runs": ("list runs from their run directories or run.storage; `runs show NAME` for one", add_runs_arguments,
             run_runs),
}
"""name -> (help, add-arguments function, run function), for the CLI wiring."""
