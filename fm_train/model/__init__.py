"""The contract of a pure model and what every family's modules share (imports torch only).

The modules themselves live with their family (``fm_train/families/<name>/model.py``).
"""

from fm_train.model.base import Init, ModelArgs, padded_vocab_size, real_logits

__all__ = ["Init", "ModelArgs", "padded_vocab_size", "real_logits"]
