"""Mixers usable on their own on ``[B, L, D]`` tensors."""

from bmojo.layers.attention import Attention
from bmojo.layers.bmojo import BMojoMixer, MixerState
from bmojo.layers.eidetic import EideticMemory
from bmojo.layers.norm import GatedRMSNorm, RMSNorm
from bmojo.layers.ssm import Mamba, Mamba2, SSMState
from bmojo.layers.storage import StorageConfig, VectorStore

__all__ = [
    "Attention", "BMojoMixer", "EideticMemory", "GatedRMSNorm", "Mamba", "Mamba2", "MixerState", "RMSNorm", "SSMState",
    "StorageConfig", "VectorStore",
]  # fmt: skip
