"""bmojo: B'MOJO hybrid state-space language models (fading + eidetic memory) in PyTorch."""

from bmojo import convert
from bmojo.models import BMojoCache, BMojoConfig, BMojoForCausalLM, BMojoModel

__version__ = "0.1.0"
__all__ = ["BMojoCache", "BMojoConfig", "BMojoForCausalLM", "BMojoModel", "__version__", "convert"]
