"""DeepSpeed checkpoint -> verified Hugging Face dir, and Hugging Face dir -> fm_train weights.

Names load lazily so that ``fm-train --help`` (which imports ``fm_train.cli.convert``) stays
torch-free and fast. No exported name equals a submodule's: importing ``fm_train.convert.X`` sets
the package attribute ``X`` to that module, which would hide a function of the same name
(``import_hf`` lives in ``hf_import``).
"""

from __future__ import annotations

import importlib
from typing import Any

from fm_train.convert.errors import ConvertError

_LAZY = {
    "convert_checkpoint": "fm_train.convert.export",
    "write_hf_dir": "fm_train.convert.export",
    "import_hf": "fm_train.convert.hf_import",
}

__all__ = ["ConvertError", "convert_checkpoint", "import_hf", "write_hf_dir"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        # Bind the function over the same-named submodule (fm_train.convert.hf_import), which the
        # import above just set as a package attribute.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fm_train.convert' has no attribute {name!r}")
