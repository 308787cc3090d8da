"""Models: the interface every generator implements, and our compact video DiT.

``VideoDiT`` / ``DiTConfig``: the rectified-flow transformer (dit.py, layers.py, rope.py).
``dancegrpo.models.attention``: the attention dispatcher the DiT uses (flash-attn, xformers,
SDPA); its function ``attention`` is not re-exported here so the submodule name stays the module.
Importing this package loads no optional dependency (flash-attn, xformers, safetensors load on use).
"""

from .attention import available_backends
from .config import DiTConfig
from .dit import VideoDiT
from .interface import Conditioning, GenerativeModel

__all__ = ["DiTConfig", "VideoDiT", "available_backends", "Conditioning", "GenerativeModel"]
