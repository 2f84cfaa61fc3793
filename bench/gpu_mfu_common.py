"""The pure rules of ``bench/gpu_mfu.py``: the contenders and their order, the out-of-memory step-down,
the time budget, tokens/s and MFU, the ratios and the summary. Torch-free (the processes the bench
spawns import it too) and unit-tested on CPU in ``tests/test_device.py``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

Result = dict[str, Any]

#: The issue's goals for the 1.1B preset at seq 2048 in bf16 on one H100.
GOAL_MFU, GOAL_RATIO = 0.45, 1.0


class Split(NamedTuple):
    """How one optimizer step's sequences are cut: ``micro_batch`` sequences, ``grad_accum`` times."""

    micro_batch: int
    grad_accum: int


@dataclass(frozen=True)
class Contender:
    """One measurement: ``reference`` (transformers + a plain PyTorch loop) or ``fm_train``, eager or compiled."""

    kind: str  # "reference" | "fm_train"
    compiled: bool

    @property
    def name(self) -> str:
        return f"{'reference' if self.kind == 'reference' else 'fm-train'} {'compiled' if self.compiled else 'eager'}"


def contenders(modes: Sequence[bool] = (False, True)) -> list[Contender]:
    """The runs in the order they are measured: per mode (eager, then compiled), the reference then
    fm-train, so that a budget spent in the middle still leaves complete pairs behind."""
    return [Contender(kind, compiled) for compiled in modes for kind in ("reference", "fm_train")]


def step_down(split: Split) -> Split | None:
    """After an out-of-memory: the next smaller micro-batch that keeps the tokens per step (the largest
    divisor of ``micro_batch * grad_accum`` below ``micro_batch``), accumulation raised to match. None at 1."""
    sequences = split.micro_batch * split.grad_accum
    for micro_batch in range(split.micro_batch - 1, 0, -1):
        if sequences % micro_batch == 0:
            return Split(micro_batch, sequences // micro_batch)
    return None


def is_oom(error: str) -> bool:
    """Whether a run's error text is an accelerator out-of-memory (torch's own exception type, or the
    message as compiled code and DeepSpeed re-raise it)."""
    text = error.lower()
    return text == "oom" or "outofmemoryerror" in text or "out of memory" in text


def timed_steps(wanted: int, step_s: float, left_s: float) -> int:
    """How many of the ``wanted`` timed steps fit in ``left_s`` when one takes ``step_s`` (the last warm-up
    step's time); 0 when not even one does."""
    if step_s <= 0:
        return wanted
    return max(0, min(wanted, int(left_s // step_s)))


class Budget:
    """The bench's wall-clock budget: a run starts only with its expected need left, and may use at most
    its cap (and never more than what is left)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + total_s

    def left_s(self) -> float:
        return self.deadline - self.clock()

    def grant(self, need_s: float, cap_s: float) -> float | None:
        """Seconds this run may take, or None when less than ``need_s`` is left (the run is skipped)."""
        left = self.left_s()
        return None if left < need_s else min(cap_s, left)


def measure_all(runs: Sequence[Contender], start: Split,
                measure: Callable[[Contender, Split], Result]) -> tuple[list[Result], list[str]]:
    """Measure ``runs`` in order at one split shared by all of them; returns the results (in ``runs``'
    order) and the notes of every step-down.

    A run that runs out of memory lowers the shared micro-batch (:func:`step_down`); it is measured again
    there, and so is every run already measured at a larger micro-batch, so that contenders are compared
    at the same split. ``measure`` returns ``{"error": ...}`` for a failed or skipped run.
    """
    split, notes = start, []
    done: dict[Contender, Result] = {}
    queue = list(runs)
    while queue:
        run = queue.pop(0)
        result = measure(run, split)
        if "error" in result and is_oom(str(result["error"])):
            smaller = step_down(split)
            if smaller is None:
                done[run] = {"name": run.name, "kind": run.kind, "compiled": run.compiled,
                             "error": f"out of memory even at micro-batch 1 (grad_accum {split.grad_accum})"}
                continue
            notes.append(f"{run.name} ran out of memory at micro-batch {split.micro_batch} x grad_accum "
                         f"{split.grad_accum}; every contender at micro-batch {smaller.micro_batch} x grad_accum "
                         f"{smaller.grad_accum} from here on (same tokens per step)")
            split = smaller
            again = [r for r in runs if r in done and "error" not in done[r]]
            queue = [run, *again, *[r for r in queue if r not in again]]
            for r in again:
                del done[r]
            continue
        done[run] = result
    return [done[r] for r in runs], notes


def throughput(*, tokens_per_step: int, steps: int, seconds: float, gpus: int, flops_per_token: float,
               measured_peak: float | None, table_peak: float | None) -> dict[str, float | None]:
    """tokens/s per GPU, achieved model TFLOP/s per GPU and MFU against both peaks (None without one)."""
    per_gpu = tokens_per_step * steps / seconds / gpus
    achieved = per_gpu * flops_per_token
    return {"tokens_per_s_per_gpu": per_gpu, "tflops_per_gpu": achieved / 1e12,
            "mfu_measured": achieved / measured_peak if measured_peak else None,
            "mfu_table": achieved / table_peak if table_peak else None}


def ratios(results: Sequence[Result]) -> dict[str, float | None]:
    """fm-train / reference tokens/s per mode (``eager``, ``compiled``): None unless both were measured,
    at the same split."""
    by = {(r["kind"], r["compiled"]): r for r in results if "tokens_per_s_per_gpu" in r}
    out: dict[str, float | None] = {}
    for compiled, mode in ((False, "eager"), (True, "compiled")):
        ref, fm = by.get(("reference", compiled)), by.get(("fm_train", compiled))
        same = ref is not None and fm is not None and (ref["micro_batch"], ref["grad_accum"]) == (
            fm["micro_batch"], fm["grad_accum"])
        out[mode] = fm["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"] if same else None
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def summary(device: str, results: Sequence[Result], pair_ratios: dict[str, float | None], notes: Sequence[str]) -> str:
    """The one paragraph printed at the end: each contender's figures, the ratios against the goals,
    what failed or was skipped, and any step-down."""
    parts = [f"summary: {device}:"]
    for r in results:
        if "tokens_per_s_per_gpu" in r:
            parts.append(f"{r['name']} {r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, MFU {_pct(r['mfu_table'])} of the"
                         f" data sheet ({_pct(r['mfu_measured'])} of measured matmul peak), peak"
                         f" {r['peak_mem_gib']:.1f} GiB at micro-batch {r['micro_batch']} x grad_accum {r['grad_accum']};")
        else:
            parts.append(f"{r['name']}: {str(r.get('error', 'no result')).splitlines()[-1][:200]};")
    for mode, value in pair_ratios.items():
        parts.append(f"fm-train / reference {mode}/{mode} = {'n/a' if value is None else f'{value:.3f}'}"
                     f" (goal >= {GOAL_RATIO});")
    best = max((r["mfu_table"] for r in results if r.get("kind") == "fm_train" and r.get("mfu_table") is not None),
               default=None)
    parts.append(f"best fm-train MFU {_pct(best)} (goal >= {GOAL_MFU:.0%}).")
    parts.extend(notes)
    return " ".join(parts)
