"""Load a run config from YAML, apply ``--set a.b=c`` overrides and presets, validate everything once.

Order of precedence (last wins): field defaults < ``model.preset`` < the YAML file < ``--set``.
Any problem raises :class:`ConfigError`, whose message names the field, the value and the fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fm_train.config.bounded_yaml import YamlBoundError, cut, load_yaml_file, load_yaml_text, short_repr
from fm_train.config.hf_shape import shape_from_init_from
from fm_train.config.presets import MODEL_PRESETS
from fm_train.config.rules import check_rules
from fm_train.config.schema import FmConfig, leaf_types

MAX_ERROR_LINES = 20
MAX_LINE = 400


class ConfigError(ValueError):
    """A config that cannot run; the message is meant for the user, one problem per line."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into a key path and a typed value (YAML scalar/list syntax: 3, 1e-3, true, [1,2]).

    A text field keeps the user's text: ``run.name=1e5`` is the name "1e5", not the number 100000.0.
    """
    if "=" not in text:
        raise ConfigError(f"--set {short_repr(text)}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if not path:
        raise ConfigError(f"--set {short_repr(text)}: empty key")
    try:
        value = load_yaml_text(raw) if raw.strip() != "" else ""
    except YamlBoundError as exc:
        raise ConfigError(f"--set {short_repr(key)}: cannot parse value {short_repr(raw)}: {exc}") from None
    if _is_text_field(path):
        return path, value if value is None or isinstance(value, (str, list, dict)) else raw.strip()
    return path, _numeric(value)


def _is_text_field(path: list[str]) -> bool:
    """Whether the schema field at ``path`` (list items by index) takes text and no number."""
    annotation: Any = FmConfig
    for key in path:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return False
            annotation = field.annotation
        elif get_origin(annotation) is list and key.isdigit():
            annotation = get_args(annotation)[0]
        else:
            return False
    leaves = leaf_types(annotation)
    return str in leaves and not leaves & {int, float, bool}


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
        raise ConfigError(f"--set {cut(where, 120)}: index {short_repr(key)} is not in a list of {len(node)} items")
    return int(key)


def _merge_preset(raw: dict[str, Any]) -> dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, Mapping) or model.get("preset") is None:
        return raw
    name = str(model["preset"])
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={short_repr(name)} is unknown; choose one of {', '.join(MODEL_PRESETS)}")
    merged = dict(raw)
    preset = MODEL_PRESETS[name]
    merged["model"] = {**preset, **model}
    if isinstance(preset.get("moe"), Mapping) and isinstance(model.get("moe"), Mapping):
        merged["model"]["moe"] = {**preset["moe"], **model["moe"]}  # model.moe.top_k: 4 keeps the preset's experts
    return merged


def _normalize_precision(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept DeepSpeed's mapping form ``precision: {bf16: true}`` besides the plain string."""
    prec = raw.get("precision")
    if not isinstance(prec, Mapping):
        return raw
    unknown = set(prec) - {"bf16", "fp16"}
    if unknown:
        raise ConfigError(f"precision: unknown key(s) {short_repr(sorted(map(str, unknown)))}; use bf16/fp16 flags or a string bf16|fp16|fp32")
    bf16, fp16 = bool(prec.get("bf16", False)), bool(prec.get("fp16", False))
    if bf16 and fp16:
        raise ConfigError("precision: bf16 and fp16 are both on; turn one off (bf16 is the stable choice where hardware has it)")
    return {**raw, "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32"}


def _format_validation_error(exc: ValidationError) -> list[str]:
    """One line per pydantic error, naming the field; values are shown cut short, never in full."""
    lines = []
    for err in exc.errors():
        field = cut(".".join(str(p) for p in err["loc"]), 120)
        value = short_repr(err.get("input"))
        if err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key (value {value}); check its spelling against `fm-train plan --help` and fm_train/config/schema.py")
        elif err["type"] == "string_type":
            lines.append(f"{field}={value}: {err['msg']}; quote it in the YAML file to keep it text")
        else:
            lines.append(f"{field}={value}: {err['msg'].removeprefix('Value error, ')}")
    return lines


def _bounded_message(lines: list[str]) -> str:
    """At most MAX_ERROR_LINES lines of at most MAX_LINE characters: a hostile config cannot flood the terminal."""
    shown = [cut(line, MAX_LINE) for line in lines[:MAX_ERROR_LINES]]
    if len(lines) > MAX_ERROR_LINES:
        shown.append(f"... and {len(lines) - MAX_ERROR_LINES} more problems")
    return "\n".join(shown)


def build_config(raw: Mapping[str, Any] | None, overrides: Iterable[str] = (), *, require_paths: bool = False) -> FmConfig:
    """Validate a raw mapping (as read from YAML) plus overrides into an :class:`FmConfig`."""
    data = dict(raw or {})
    data = apply_overrides(data, overrides)
    data = _normalize_precision(_merge_preset(data))
    if isinstance(data.get("model"), dict):
        data["model"] = shape_from_init_from(data["model"])
    try:
        cfg = FmConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_bounded_message(_format_validation_error(exc))) from None
    errors = check_rules(cfg, require_paths=require_paths)
    if errors:
        raise ConfigError(_bounded_message(errors))
    return cfg


_RAY_CLUSTER_KEYS = frozenset({"cluster_name", "provider", "auth", "head_node_type", "available_node_types",
                               "head_start_ray_commands", "worker_start_ray_commands"})


def _is_ray_cluster_file(raw: dict[str, Any]) -> bool:
    """Whether a YAML mapping is a Ray autoscaler cluster file (``ray up``) rather than a run config."""
    return len(_RAY_CLUSTER_KEYS & set(raw)) >= 2 and not {"run", "model", "train"} & set(raw)


def load_config(path: str | Path | None, overrides: Iterable[str] = (), *, require_paths: bool = False) -> FmConfig:
    """Load ``path`` (YAML; None means all defaults) with overrides; raise :class:`ConfigError` on any problem."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = load_yaml_file(p) or {}
        except YamlBoundError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run, model, parallel, ...)")
        if _is_ray_cluster_file(raw):
            raise ConfigError(f"{p} is a Ray cluster launcher file (cluster_name, provider, ...), not an fm-train run"
                              f" config: bring the machines up with `ray up {p}`, then run `fm-train launch` with a"
                              " run config (cluster_configs/local.yaml, cluster_configs/h100_*.yaml)")
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
