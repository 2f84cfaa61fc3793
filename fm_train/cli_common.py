"""Moved to :mod:`fm_train.cli.common`; this name is kept only for ``fm_train/hf_eval.py``.

Remove it when ``hf_eval`` imports ``fm_train.cli.common`` (or moves into the convert package).
"""

from fm_train.cli.common import ConfigError, add_config_arguments, config_from_args, fail

__all__ = ["ConfigError", "add_config_arguments", "config_from_args", "fail"]
