"""``bmojo.convert``: Hugging Face <-> bmojo conversion (see :mod:`bmojo.models.convert`)."""

from bmojo.models.convert import (
    FAMILIES,
    bmojo_config_from_hf,
    convert_checkpoint,
    from_hf,
    hf_config_from_bmojo,
    infer_family,
    pattern_summary,
    to_hf,
)

__all__ = [
    "FAMILIES", "bmojo_config_from_hf", "convert_checkpoint", "from_hf", "hf_config_from_bmojo", "infer_family",
    "pattern_summary", "to_hf",
]  # fmt: skip
