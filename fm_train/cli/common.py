"""Arguments and error handling shared by the subcommands that take a run config."""

from __future__ import annotations

import argparse
import sys

from fm_train.config import ConfigError, FmConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``CONFIG`` positional plus repeatable ``--set a.b=c`` overrides."""
    parser.add_argument("config", nargs=None if required else "?", default=None, metavar="CONFIG",
                        help="YAML run config (see cluster_configs/)" + ("" if required else "; default: cluster_configs/local.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, typed as YAML (e.g. --set train.steps=50 "
                             "--set optim.betas=[0.9,0.99]); repeatable")


def config_from_args(args: argparse.Namespace, *, require_paths: bool = False) -> FmConfig:
    """Load the config named by the parsed arguments (raises ConfigError)."""
    return load_config(args.config, args.overrides, require_paths=require_paths)


def fail(command: str, message: str, code: int = 2) -> int:
    """Print ``fm-train COMMAND: error: ...`` on stderr and return the exit code."""
    for i, line in enumerate(str(message).splitlines() or [""]):
        print(f"fm-train {command}: error: {line}" if i == 0 else f"  {line}", file=sys.stderr)
    return code


__all__ = ["ConfigError", "add_config_arguments", "config_from_args", "fail"]
