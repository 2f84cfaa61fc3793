"""The DeepSpeed boundary (``fm_train/deepspeed_adapter/``, README layout table): one package imports
``deepspeed``, checks its version at import, and fails loudly when a DeepSpeed attribute it overrides is gone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "fm_train/deepspeed_adapter"
PACKAGES = ("fm_train", "data_shards", "launcher")


def _deepspeed_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of ``deepspeed`` or a submodule, at module level or in a function."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "deepspeed"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "deepspeed":
            found.append((node.lineno, node.module))
    dynamic = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.args[0] if n.args else None,
                                                                                  ast.Constant)
               and getattr(n.func, "attr", getattr(n.func, "id", "")) in ("import_module", "__import__")
               and str(n.args[0].value).split(".")[0] == "deepspeed"]
    return found + [(n.lineno, str(n.args[0].value)) for n in dynamic]


def _product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_only_the_adapter_imports_deepspeed() -> None:
    offenders = {}
    for path in _product_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ADAPTER + "/"):
            continue
        imports = _deepspeed_imports(ast.parse(path.read_text(), filename=rel))
        if imports:
            offenders[rel] = imports
    assert not offenders, f"only {ADAPTER} may import deepspeed (add a typed function there instead): {offenders}"


def test_adapter_modules_check_the_version_before_importing_deepspeed() -> None:
    """Every adapter module that imports deepspeed imports .version first (the check runs at import)."""
    for path in sorted((ROOT / ADAPTER).glob("*.py")):
        if path.name == "version.py":
            continue
        tree = ast.parse(path.read_text())
        imports = _deepspeed_imports(tree)
        if not imports:
            continue
        version_lines = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                         and n.module == "fm_train.deepspeed_adapter.version"
                         or isinstance(n, ast.ImportFrom) and n.module == "fm_train.deepspeed_adapter"
                         and any(a.name == "version" for a in n.names)]
        assert version_lines and min(version_lines) < min(line for line, _ in imports), path.name


def test_an_unsupported_deepspeed_is_refused_naming_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed

    from fm_train.deepspeed_adapter import version

    assert version.check_version() == deepspeed.__version__  # the installed one is supported
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(ImportError, match=r"supports DeepSpeed >=0\.19,<0\.20 but deepspeed 0\.21\.0 is installed"):
        version.check_version()
    for other in ("0.18.9", "1.19.0", "garbage"):
        with pytest.raises(version.UnsupportedDeepSpeedError, match=other):
            version.check_version(other)
    assert version.check_version("0.19.0+cuda") == "0.19.0+cuda"


def test_a_missing_override_target_is_named() -> None:
    from fm_train.deepspeed_adapter.overrides import MissingOverrideError, check_overrides, require_instance_attributes

    class Renamed:
        def _zero_init_param_v2(self) -> None: ...

    check_overrides(Renamed, ["_zero_init_param_v2"])
    with pytest.raises(MissingOverrideError, match=r"Renamed\._zero_init_param\b.*silently do nothing"):
        check_overrides(Renamed, ["_zero_init_param"])
    obj = Renamed()
    obj.enable = True  # type: ignore[attr-defined]
    require_instance_attributes(obj, ["enable"])
    with pytest.raises(MissingOverrideError, match="enable_backward_allreduce on"):
        require_instance_attributes(obj, ["enable_backward_allreduce"])
