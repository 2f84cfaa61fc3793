"""DeepSpeed checkpoint -> verified Hugging Face dir, and Hugging Face dir -> fm_train weights."""

from fm_train.convert.errors import ConvertError
from fm_train.convert.export import convert_checkpoint, write_hf_dir
from fm_train.convert.import_hf import import_hf

__all__ = ["ConvertError", "convert_checkpoint", "import_hf", "write_hf_dir"]
