"""The model-family seam: a family is one folder reached through its spec, resolved only by the entry
points, and its pieces agree with each other (its formulas with its module, its key map with
transformers' model, its Hugging Face config with its import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Everything but the families themselves: it may reach a family only through fm_train.families (the
# registry) and fm_train.families.spec, never a family's folder.
FAMILY_BLIND = ("fm_train/engine", "fm_train/checkpoint", "fm_train/convert", "fm_train/plan", "fm_train/config",
                "fm_train/parallel", "fm_train/model", "fm_train/dist", "fm_train/deepspeed_adapter", "fm_train/storage",
                "fm_train/cli", "fm_train/worker.py", "launcher")
# Of those, the parts whose code never names a family either (fm_train/config lists the choices and presets).
NAME_BLIND = tuple(p for p in FAMILY_BLIND if p != "fm_train/config") + ("data_shards",)
# The entry points, which resolve the family once (fm_train.families.family_of, family_of_hf, FAMILIES) and
# hand it on: the rank's worker, the commands, the conversion of a checkpoint (its manifest names the
# family), `fm-train eval` of a Hugging Face dir (its config.json does), the launcher's steps.
ENTRY_POINTS = ("fm_train/worker.py", "fm_train/cli", "fm_train/convert/export.py", "fm_train/convert/hf_eval.py",
                "launcher")
RESOLVERS = ("family_of", "family_of_hf", "FAMILIES")


def _files(parts: tuple[str, ...]) -> list[Path]:
    return [f for part in parts if (ROOT / part).exists()
            for f in ([ROOT / part] if part.endswith(".py") else sorted((ROOT / part).rglob("*.py")))]

def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out: types only)."""
    names: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            names.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return names


def _family_folders() -> tuple[str, ...]:
    return tuple(f"fm_train.families.{d.name}" for d in (ROOT / "fm_train" / "families").iterdir()
                 if d.is_dir() and (d / "__init__.py").exists())


@pytest.mark.unit
def test_a_family_is_one_folder_that_nothing_else_imports() -> None:
    folders = _family_folders()
    assert set(folders) >= {"fm_train.families.llama", "fm_train.families.bert"}
    offenders = []
    for path in _files(FAMILY_BLIND):
        bad = sorted(n for n in _imports(path) if n.startswith(folders))
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offenders, "take the FamilySpec the entry point resolved instead:\n" + "\n".join(offenders)


@pytest.mark.unit
def test_only_the_entry_points_resolve_a_family() -> None:
    """``family_of`` is no service locator: below the entry points the spec is passed in."""
    offenders = []
    for path in _files(FAMILY_BLIND):
        if str(path.relative_to(ROOT)).startswith(ENTRY_POINTS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.ImportFrom) else
                     [node.id] if isinstance(node, ast.Name) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n in RESOLVERS]
    assert not offenders, "pass the resolved FamilySpec down instead of looking it up:\n" + "\n".join(offenders)



def family_mentions(source: str) -> list[tuple[int, str]]:
    """(line, word) for every identifier, imported name or string in ``source`` that names a registered
    family (``bert``, ``LlamaArgs``, ``fm_train.families.llama.model``); docstrings and comments may, as examples."""
    from fm_train.families import FAMILIES

    tree = ast.parse(source)
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words += [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        found += [(node.lineno, w) for w in words if any(f in w.lower() for f in FAMILIES)]
    return found


@pytest.mark.unit
def test_the_family_blind_parts_name_no_family_in_their_code() -> None:
    """No branch on ``model.family == "bert"``, no Llama default, no family's class: ask the family."""
    branch = 'from fm_train.families.llama.model import LlamaArgs\nif cfg.model.family == "bert":\n    x = BertThing()\n'
    assert {w for _, w in family_mentions(branch)} == {"fm_train.families.llama.model", "LlamaArgs", "bert", "BertThing"}
    assert family_mentions('"""Llama and BERT, as examples."""\n# a llama\nfamily = family_of(cfg.model)\n') == []
    offenders = [f"{path.relative_to(ROOT)}:{line}: {word!r}" for path in _files(NAME_BLIND)
                 for line, word in family_mentions(path.read_text(encoding="utf-8"))]
    assert not offenders, "ask the family's spec instead:\n" + "\n".join(offenders)

@pytest.mark.unit
def test_family_lookup() -> None:
    from fm_train.config import ModelConfig
    from fm_train.families import family_of, family_of_hf

    assert family_of(ModelConfig()).name == "llama"  # the config's documented default
    with pytest.raises(ValueError, match="model.family is missing"):
        family_of({"vocab_size": 8})  # no default family: a manifest without one is refused by name
    assert family_of_hf("llama").name == "llama" and family_of_hf("gpt2") is None
    with pytest.raises(ValueError, match="model.family='gpt' is not a known model family; use one of"):
        family_of("gpt")


@pytest.mark.unit
@pytest.mark.parametrize("fields", [{"vocab_size": 8192}, {"tie_embeddings": False, "qkv_bias": True, "vocab_size": 1001}],
                         ids=["tied", "untied-bias-1001"])
def test_llama_family_pieces_agree(fields: dict) -> None:
    import torch
    import transformers

    from fm_train.config import ModelConfig
    from fm_train.convert.keymap import fm_param_shapes, fm_to_hf
    from fm_train.families import family_of

    model_cfg = ModelConfig(**fields)
    family = family_of(model_cfg)
    args = family.modules().args(model_cfg)
    with torch.device("meta"):
        model = args.build()
    assert family.sizes.parameter_count(model_cfg) == sum(p.numel() for p in model.parameters())
    # The export's names are exactly what transformers' class for this config expects.
    dumped = model_cfg.model_dump(mode="json")
    hf_cfg = family.hf.config(dumped, dtype="fp32", bos=None, eos=None)
    with torch.device("meta"):
        hf = getattr(transformers, family.hf.auto_class).from_config(hf_cfg)
    hf_names = {n for n, _ in hf.named_parameters()}
    assert {fm_to_hf(family, n) for n in fm_param_shapes(family, dumped)} == hf_names
    # Importing that config gives back the model fields.
    back = family.hf.fields_from_config(hf_cfg.to_dict())
    assert back == {k: dumped[k] for k in back}
    assert family.hf.import_problems(hf_cfg.to_dict()) == []


@pytest.mark.unit
def test_a_checkpoint_of_another_family_is_not_resumed(tmp_path: Path) -> None:
    from fm_train.checkpoint import CheckpointError
    from fm_train.checkpoint.resume import check_compatible
    from fm_train.config import build_config

    cfg = build_config({"model": {"preset": "tiny"}})
    saved = cfg.model_dump(mode="json")
    check_compatible({"config": saved, "data": {}}, cfg, None, tmp_path)  # the same family and shape: fine
    saved["model"]["family"] = "bert"
    with pytest.raises(CheckpointError, match="model.family: checkpoint 'bert', config 'llama'"):
        check_compatible({"config": saved, "data": {}}, cfg, None, tmp_path)
