"""What the config loader needs to know about model families, registered from outside.

``config`` sits below the families in the layer order, so it cannot import them; the family registry
(``fm_train.families``) is registered here by ``fm_train/__init__.py``, when the ``fm_train`` package is imported, and the
loader asks through this small interface: the known names, each family's own rules on a config, and
the ``model`` fields of a Hugging Face ``config.json`` (for ``model.init_from``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:
    from fm_train.config.schema import FmConfig


class FamilyRules(Protocol):
    """The families as the config loader sees them."""

    def names(self) -> tuple[str, ...]:
        """The values ``model.family`` may take."""

    def config_errors(self, cfg: FmConfig) -> list[str]:
        """The family of ``cfg``'s own rules on it, each naming the field and the fix."""

    def fields_from_hf(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``model`` fields (``family`` included) of the Hugging Face ``config.json`` ``raw`` read from
        ``where``; ``ValueError`` naming the problem (an unknown ``model_type``, a missing key)."""

    def hf_key(self, family: str, field: str) -> str:
        """The ``config.json`` key ``model.<field>`` of ``family`` comes from, for error messages."""


_registered: list[FamilyRules] = []


def register_family_rules(rules: FamilyRules) -> None:
    """Make ``rules`` the families the loader checks configs against (``fm_train/__init__.py`` does, once)."""
    _registered[:] = [rules]


def family_rules() -> FamilyRules:
    """The registered families; importing ``fm_train`` registers them."""
    if not _registered:
        raise RuntimeError("no model families are registered with fm_train.config: import fm_train (whose"
                           " __init__ registers fm_train.families) before loading a config")
    return _registered[0]
