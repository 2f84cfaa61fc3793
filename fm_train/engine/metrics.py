"""Where metrics go: one compact stdout line, ``RUN/metrics.jsonl``, TensorBoard and optionally W&B (rank 0 only).

A record is a flat dict. Train records carry ``step, loss, lr, grad_norm, tokens_per_s,
tokens_per_s_per_device, mfu, step_time_s, peak_mem_gib, data_receipt`` (and ``tokens_seen``; with several data
sources ``tokens_seen/NAME`` and ``loss/NAME``: :mod:`fm_train.engine.source_metrics`); eval
records carry ``step`` and ``val_loss``. Every rank may call :meth:`MetricsSink.write`; only the
sink built with ``enabled=True`` (rank 0) writes, so the loop needs no rank checks.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from fm_train.config import ConfigError
from fm_train.config.rules import WANDB_INSTALL

# Shown on the stdout line, in this order, with these formats; everything else goes to the files only.
_LINE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("val_loss", "val_loss", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("tokens_per_s_per_device", "tok/s/dev", "{:,.0f}"),
    ("mfu", "mfu", "{:.2%}"),
    ("step_time_s", "step", "{:.3f}s"),
    ("peak_mem_gib", "mem", "{:.2f}GiB"),
    ("data_receipt", "data", "{:.12}"),
)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def format_line(record: dict[str, Any], extra: Sequence[tuple[str, str, str]] = ()) -> str:
    """``step 10 | loss 5.1234 | lr 1.00e-03 | ...`` with the fields the record has; ``extra``: more
    ``(key, label, format)`` fields (the model's own metrics), shown after the gradient norm."""
    parts = [f"step {record['step']}"]
    fields = list(_LINE_FIELDS)
    at = next(i for i, (key, _, _) in enumerate(fields) if key == "grad_norm") + 1
    fields[at:at] = extra
    for key, label, fmt in fields:
        value = record.get(key)
        if value is not None and value != "":
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


class MetricsSink:
    """Writes records to stdout, ``run_dir/metrics.jsonl`` and ``run_dir/tensorboard``."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, jsonl: bool = True, tensorboard: bool = True,
                 stream: TextIO | None = None, wandb: dict[str, Any] | None = None,
                 line_fields: Sequence[tuple[str, str, str]] = ()) -> None:
        """``wandb``: the keyword arguments of ``wandb.init`` (``project``, ``name``, ``config``, ``entity``,
        ``tags``, ``mode``) to also log to Weights & Biases (``id``, ``dir`` and ``resume`` are set here).
        ``line_fields``: the model's own metrics to show on the stdout line (see :func:`format_line`)."""
        self.enabled = enabled
        self._line_fields = tuple(line_fields)
        self._stream = stream if stream is not None else sys.stdout
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._wandb: Any = None
        if wandb is not None:
            # Checked on every rank, so a missing package stops all ranks alike instead of hanging the others.
            try:
                import wandb as wandb_module
            except ImportError:
                raise ConfigError(f"logging.wandb=true, but the wandb package is not installed: {WANDB_INSTALL},"
                                  " or set logging.wandb=false") from None
        if not enabled:
            return
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        if jsonl:
            # Append: a resumed run continues the same file (its steps carry on from the checkpoint).
            self._jsonl = open(run / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: pulls in tensorboard

            self._tb = SummaryWriter(log_dir=str(run / "tensorboard"))
        if wandb is not None:
            # A stable id from the run directory: a resumed run continues the same W&B run. The API key
            # stays in wandb's own store or WANDB_API_KEY; it is never passed through fm-train.
            run_id = hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb_module.init(**wandb, dir=str(run), id=run_id, resume="allow")

    def write(self, record: dict[str, Any]) -> None:
        """Emit one record everywhere (a no-op on ranks other than 0)."""
        if not self.enabled:
            return
        print(format_line(record, self._line_fields), file=self._stream, flush=True)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            prefix = "eval" if "val_loss" in record else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self._wandb is not None:
            prefix = "eval" if "val_loss" in record else "train"
            self._wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
