"""Source names and ``data.schedule``: the checks of the config, and the schedule turned into sample positions.

A schedule is written in steps; the reader works in global sample positions, so each phase boundary
becomes ``until_step * global_batch`` (the global batch is fixed for a run: the same on any dp size).
"""

from __future__ import annotations

import math
from typing import Any

from fm_train.config.schema import DataConfig, FmConfig

_FIX_NAMES = "give each source a distinct name (data.sources[i].name)"


def source_names(data: DataConfig) -> list[str]:
    """Each source's name: ``name``, else the last part of its path (``s3://b/web/`` -> ``web``)."""
    return [s.name if s.name is not None else (s.path.rstrip("/").rsplit("/", 1)[-1] or s.path) for s in data.sources]


def _weights_of(where: str, given: dict[str, float], data: DataConfig, names: list[str]) -> tuple[list[float], list[str]]:
    """Weights by source index from a phase's ``{name or path: weight}``, and the errors found."""
    errors: list[str] = []
    out = [0.0] * len(names)
    paths = [s.path for s in data.sources]
    for key, w in given.items():
        idx = names.index(key) if key in names else (paths.index(key) if key in paths else None)
        if idx is None:
            errors.append(f"{where} names source {key!r}, which is not in data.sources (names: {names}); use one of"
                          " those names or paths, or add the source")
            continue
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            errors.append(f"{where}.{key}={w!r} is not a weight: use a finite number >= 0")
            continue
        out[idx] = float(w)
    if not errors and sum(out) <= 0:
        errors.append(f"{where} gives every source weight 0, so no sample could be drawn; give at least one source"
                      " a positive weight")
    return out, errors


def schedule_errors(cfg: FmConfig) -> list[str]:
    """One message per problem of ``data.sources`` names and ``data.schedule`` (empty when fine)."""
    d = cfg.data
    names = source_names(d)
    errors: list[str] = []
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup and (d.schedule is not None or any(s.name is not None for s in d.sources)):
        errors.append(f"data.sources have the same name {dup} (a name defaults to the last part of the path); "
                      + _FIX_NAMES)
    if d.schedule is None:
        return errors
    if not d.schedule:
        return errors + ["data.schedule is empty; give at least one phase or set data.schedule: null"]
    weighted = [i for i, s in enumerate(d.sources) if s.weight != 1.0]  # 1.0, the default, is also what a dump says
    if weighted:
        i = weighted[0]
        errors.append(f"data.sources[{i}].weight={d.sources[i].weight} is set, but data.schedule gives the weights;"
                      " move it into the schedule's phases or drop data.schedule")
    previous = 0
    for i, ph in enumerate(d.schedule):
        where = f"data.schedule[{i}]"
        if (ph.weights is None) == (ph.ramp_to is None):
            errors.append(f"{where} needs exactly one of weights (constant) or ramp_to (a linear ramp)")
            continue
        given = ph.weights if ph.weights is not None else ph.ramp_to
        errors += _weights_of(f"{where}.{'weights' if ph.weights is not None else 'ramp_to'}", given or {}, d,
                              names)[1]
        if ph.ramp_to is not None and i == 0:
            errors.append(f"{where} ramps, but the first phase has no earlier weights to ramp from; give it weights")
        if ph.until_step is None:
            if ph.ramp_to is not None:
                errors.append(f"{where}: a ramp needs until_step (the step where it reaches ramp_to)")
            if i + 1 < len(d.schedule):
                errors.append(f"{where} has no until_step, so it runs to the end of training, but phases follow it;"
                              " give it an until_step or remove the later phases")
            continue
        if ph.until_step <= previous:
            errors.append(f"{where}.until_step={ph.until_step} is not after the previous phase's end (step"
                          f" {previous}): phases would overlap; make until_step increase from phase to phase")
        previous = max(previous, ph.until_step)
    last = d.schedule[-1].until_step
    if last is not None and last < cfg.train.steps:
        errors.append(f"data.schedule ends at step {last} but train.steps={cfg.train.steps}: steps {last} to"
                      f" {cfg.train.steps} have no weights; raise the last phase's until_step or drop it (null: to"
                      " the end of training)")
    return errors


def resolve_schedule(cfg: FmConfig) -> list[dict[str, Any]] | None:
    """``data.schedule`` in global sample positions (``data_shards.schedule.Phase.to_json`` dicts), or None.

    Expects a config that passed :func:`schedule_errors`.
    """
    d = cfg.data
    if d.schedule is None:
        return None
    names, batch, start = source_names(d), cfg.global_batch, 0
    out: list[dict[str, Any]] = []
    for ph in d.schedule:
        ramp = ph.ramp_to is not None
        weights, _ = _weights_of("", (ph.ramp_to if ramp else ph.weights) or {}, d, names)
        end = None if ph.until_step is None else ph.until_step * batch
        out.append({"start": start, "end": end, "weights": weights, "ramp_step": batch if ramp else 0})
        start = end if end is not None else start
    return out


def describe_mixture(cfg: FmConfig) -> str | None:
    """One line for ``fm-train plan``: the sources' weights over the steps (None for one static source)."""
    d, names = cfg.data, source_names(cfg.data)
    if d.schedule is None:
        if len(names) < 2:
            return None
        return "static weights " + ", ".join(f"{n} {s.weight:g}" for n, s in zip(names, d.sources))
    parts, start = [], 0
    for ph in d.schedule:
        given = (ph.ramp_to if ph.ramp_to is not None else ph.weights) or {}
        weights, _ = _weights_of("", given, d, names)
        total = sum(weights) or 1.0
        shares = " ".join(f"{n} {w / total:.2f}" for n, w in zip(names, weights) if w > 0)
        end = "end" if ph.until_step is None else str(ph.until_step)
        parts.append(f"steps {start}-{end}: {'ramp to ' if ph.ramp_to is not None else ''}{shares}")
        start = ph.until_step if ph.until_step is not None else start
    return "schedule " + "; ".join(parts)
