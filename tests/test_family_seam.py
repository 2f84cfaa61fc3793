"""The model-family seam holds: the parts that take the family from the config know no family by name.

The engine, checkpoints, planner, converter, worker and launcher call ``family_of(...)`` and nothing
family-specific; a family's code lives in ``fm_train/families``, its pure model in ``fm_train/model``
and its pipeline layers in ``fm_train/parallel/<family>_pipeline.py``. This test reads the code (not
the docstrings or comments, which may name a family as an example) of those parts and fails on any
identifier, import or string that names a registered family: a branch on ``model.family == "bert"``,
an import of ``fm_train.model.llama``, a Llama-only Hugging Face class.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fm_train.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
FAMILY_BLIND = ["launcher", "fm_train/engine", "fm_train/checkpoint", "fm_train/convert", "fm_train/plan",
                "fm_train/dist", "fm_train/worker.py", "fm_train/cli.py", "fm_train/cli_common.py",
                "fm_train/hf_eval.py", "data_shards"]
# A family's key also matches its classes and modules (``LlamaForCausalLM``, ``fm_train.model.bert``).
FAMILY_WORDS = sorted({name.lower() for name in FAMILIES})


def _sources() -> list[Path]:
    files: list[Path] = []
    for entry in FAMILY_BLIND:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _docstrings(tree: ast.AST) -> set[int]:
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return docs


def family_mentions(source: str) -> list[tuple[int, str]]:
    """(line, word) for every identifier, imported name or non-docstring string that names a family."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
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
        elif isinstance(node, ast.Import):
            words += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            words += [alias.name for alias in node.names] + [node.module or ""]
        found += [(node.lineno, w) for w in words if any(f in w.lower() for f in FAMILY_WORDS)]
    return found


def test_the_scan_finds_what_a_family_branch_looks_like():
    branch = 'from fm_train.model.llama import LlamaArgs\nif cfg.model.family == "bert":\n    x = BertThing()\n'
    assert {w for _, w in family_mentions(branch)} == {"fm_train.model.llama", "LlamaArgs", "bert", "BertThing"}
    assert family_mentions('"""Llama and BERT, as examples."""\n# a llama comment\nfamily = family_of(cfg.model)\n') == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_family_blind_parts_name_no_family(path: Path):
    mentions = family_mentions(path.read_text(encoding="utf-8"))
    assert not mentions, (f"{path.relative_to(ROOT)} names a model family at "
                          + ", ".join(f"line {line} ({word!r})" for line, word in mentions)
                          + ": ask the family (fm_train.families.family_of) instead")
