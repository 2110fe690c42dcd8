"""tinydiff: Stable Diffusion in miniature, from scratch in NumPy (with a CuPy backend).

Every forward and backward pass is written by hand and proven by gradient checks; see
``tinydiff.nn`` for the layers, ``tinydiff.backend`` for the NumPy/CuPy switch.
"""

__version__ = "0.1.0"

from .backend import get_backend, get_xp, set_backend, to_device, to_numpy
from .nn.module import manual_seed, no_grad

__all__ = ["__version__", "get_backend", "get_xp", "manual_seed", "no_grad", "set_backend", "to_device", "to_numpy"]
