"""Hugging Face style config, model and cache."""

from bmojo.models.cache import BMojoCache
from bmojo.models.config import BMojoConfig
from bmojo.models.modeling import BMojoForCausalLM, BMojoModel, BMojoPreTrainedModel

__all__ = ["BMojoCache", "BMojoConfig", "BMojoForCausalLM", "BMojoModel", "BMojoPreTrainedModel"]
