"""Load a run config from YAML, apply ``--set a.b=c`` overrides and presets, validate everything once.

Order of precedence (last wins): field defaults < ``model.preset`` < the YAML file < ``--set``.
Any problem raises :class:`ConfigError`, whose message names the field, the value and the fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from fm_train.config.presets import MODEL_PRESETS
from fm_train.config.rules import check_rules
from fm_train.config.schema import FmConfig


class ConfigError(ValueError):
    """A config that cannot run; the message is meant for the user, one problem per line."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into a key path and a typed value (YAML scalar/list syntax: 3, 1e-3, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return path, _numeric(value)


def _numeric(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; users mean a float."""
    if isinstance(value, list):
        return [_numeric(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=c`` override applied (list items by index: data.sources.0.weight)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for depth, key in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(node, key, where)]
                continue
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {'.'.join(path)}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(path))] = value
        else:
            node[last] = value
    return out


def _list_index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set {where}: index {key!r} is not in a list of {len(node)} items")
    return int(key)


def _merge_preset(raw: dict[str, Any]) -> dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, Mapping) or model.get("preset") is None:
        return raw
    name = str(model["preset"])
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {', '.join(MODEL_PRESETS)}")
    merged = dict(raw)
    merged["model"] = {**MODEL_PRESETS[name], **model}
    return merged


def _normalize_precision(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept DeepSpeed's mapping form ``precision: {bf16: true}`` besides the plain string."""
    prec = raw.get("precision")
    if not isinstance(prec, Mapping):
        return raw
    unknown = set(prec) - {"bf16", "fp16"}
    if unknown:
        raise ConfigError(f"precision: unknown key(s) {sorted(unknown)}; use bf16/fp16 flags or a string bf16|fp16|fp32")
    bf16, fp16 = bool(prec.get("bf16", False)), bool(prec.get("fp16", False))
    if bf16 and fp16:
        raise ConfigError("precision: bf16 and fp16 are both on; turn one off (bf16 is the stable choice where hardware has it)")
    return {**raw, "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32"}


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key (value {value!r}); check its spelling against `fm-train plan --help` and fm_train/config/schema.py")
        else:
            lines.append(f"{field}={value!r}: {err['msg']}")
    return "\n".join(lines)


def build_config(raw: Mapping[str, Any] | None, overrides: Iterable[str] = (), *, require_paths: bool = False) -> FmConfig:
    """Validate a raw mapping (as read from YAML) plus overrides into an :class:`FmConfig`."""
    data = dict(raw or {})
    data = apply_overrides(data, overrides)
    data = _normalize_precision(_merge_preset(data))
    try:
        cfg = FmConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    errors = check_rules(cfg, require_paths=require_paths)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def load_config(path: str | Path | None, overrides: Iterable[str] = (), *, require_paths: bool = False) -> FmConfig:
    """Load ``path`` (YAML; None means all defaults) with overrides; raise :class:`ConfigError` on any problem."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run, model, parallel, ...)")
    try:
        return build_config(raw, overrides, require_paths=require_paths)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None


def dump_config(cfg: FmConfig) -> str:
    """The resolved config as YAML, in the public key order (written to RUN/config.resolved.yaml)."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
