"""Hugging Face style config, model and cache; importing registers ``model_type="bmojo"`` with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from bmojo.models.cache import BMojoCache
from bmojo.models.config import BMojoConfig
from bmojo.models.modeling import BMojoForCausalLM, BMojoModel, BMojoPreTrainedModel

AutoConfig.register(BMojoConfig.model_type, BMojoConfig, exist_ok=True)
AutoModel.register(BMojoConfig, BMojoModel, exist_ok=True)
AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM, exist_ok=True)

__all__ = ["BMojoCache", "BMojoConfig", "BMojoForCausalLM", "BMojoModel", "BMojoPreTrainedModel"]
