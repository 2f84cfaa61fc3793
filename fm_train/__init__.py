"""fm-train: pretraining of Llama-family decoders and BERT-style encoders with DeepSpeed and Ray.

Importing the package registers the model families with the config loader, which sits below them
in the layer order and cannot import them itself (``docs/architecture.md``).
"""

from fm_train.config.family_rules import register_family_rules
from fm_train.families import ConfigRules

register_family_rules(ConfigRules())
