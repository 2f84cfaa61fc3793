"""The model-family seam: lookup, the parts that must not know the family, and the Llama family's
pieces agreeing with each other (its formulas with its module, its key map with transformers' model,
its Hugging Face config with its import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The family's own parts: only fm_train.families (and they themselves) may import them.
FAMILY_PARTS = ("fm_train.model", "fm_train.parallel.build", "fm_train.parallel.pipeline",
                "fm_train.parallel.llama_pipeline", "fm_train.parallel.bert_pipeline", "fm_train.parallel.tp_plan",
                "fm_train.parallel.tensor_parallel", "fm_train.parallel.sharded_init")
# What works for every family and must reach family-specific code through fm_train.families only.
FAMILY_BLIND = ("fm_train/engine", "fm_train/checkpoint", "fm_train/convert", "fm_train/plan", "fm_train/config",
                "fm_train/worker.py", "launcher")
# Of those, the parts whose code never names a family either (fm_train/config lists the choices and presets).
NAME_BLIND = tuple(p for p in FAMILY_BLIND if p != "fm_train/config") + (
    "fm_train/dist", "fm_train/cli.py", "fm_train/cli_common.py", "fm_train/convert/hf_eval.py", "data_shards")


def _files(parts: tuple[str, ...]) -> list[Path]:
    return [f for part in parts for f in ([ROOT / part] if part.endswith(".py") else sorted((ROOT / part).rglob("*.py")))]

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


@pytest.mark.unit
def test_engine_checkpoints_converter_planner_and_launcher_reach_the_model_through_the_family() -> None:
    offenders = []
    for path in _files(FAMILY_BLIND):
        bad = sorted(n for n in _imports(path) if n.startswith(FAMILY_PARTS))
        if bad:
            offenders.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offenders, "import the family (fm_train.families.family_of) instead:\n" + "\n".join(offenders)



def family_mentions(source: str) -> list[tuple[int, str]]:
    """(line, word) for every identifier, imported name or string in ``source`` that names a registered
    family (``bert``, ``LlamaArgs``, ``fm_train.model.llama``); docstrings and comments may, as examples."""
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
    branch = 'from fm_train.model.llama import LlamaArgs\nif cfg.model.family == "bert":\n    x = BertThing()\n'
    assert {w for _, w in family_mentions(branch)} == {"fm_train.model.llama", "LlamaArgs", "bert", "BertThing"}
    assert family_mentions('"""Llama and BERT, as examples."""\n# a llama\nfamily = family_of(cfg.model)\n') == []
    offenders = [f"{path.relative_to(ROOT)}:{line}: {word!r}" for path in _files(NAME_BLIND)
                 for line, word in family_mentions(path.read_text(encoding="utf-8"))]
    assert not offenders, "ask the family (fm_train.families.family_of) instead:\n" + "\n".join(offenders)

@pytest.mark.unit
def test_family_lookup() -> None:
    from fm_train.config import ModelConfig
    from fm_train.families import family_of, family_of_hf

    assert family_of(ModelConfig()).name == "llama"
    assert family_of({"vocab_size": 8}).name == "llama"  # a manifest written before model.family existed
    assert family_of_hf("llama").name == "llama" and family_of_hf("gpt2") is None
    with pytest.raises(ValueError, match="model.family='gpt' is not a known model family; use one of"):
        family_of("gpt")


@pytest.mark.unit
@pytest.mark.parametrize("fields", [{}, {"tie_embeddings": False, "qkv_bias": True, "vocab_size": 1001}],
                         ids=["tied", "untied-bias-1001"])
def test_llama_family_pieces_agree(fields: dict) -> None:
    import torch
    import transformers

    from fm_train.config import ModelConfig
    from fm_train.convert.keymap import fm_param_shapes, fm_to_hf
    from fm_train.families import family_of

    model_cfg = ModelConfig(**fields)
    family = family_of(model_cfg)
    args = family.args(model_cfg)
    with torch.device("meta"):
        model = family.build(args)
    assert family.parameter_count(model_cfg) == sum(p.numel() for p in model.parameters())
    # The export's names are exactly what transformers' class for this config expects.
    dumped = model_cfg.model_dump(mode="json")
    hf_cfg = family.hf_config(dumped, dtype="fp32", bos=None, eos=None)
    with torch.device("meta"):
        hf = getattr(transformers, family.hf_auto_class).from_config(hf_cfg)
    hf_names = {n for n, _ in hf.named_parameters()}
    assert {fm_to_hf(n) for n in fm_param_shapes(dumped)} == hf_names
    # Importing that config gives back the model fields.
    back = family.fields_from_hf(hf_cfg.to_dict())
    assert back == {k: dumped[k] for k in back}
    assert family.hf_import_problems(hf_cfg.to_dict()) == []


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
