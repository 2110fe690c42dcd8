"""tinydiff.nn: hand-written forward/backward passes, thin layers, losses, optimisers, gradcheck."""

from . import functional
from .gradcheck import gradcheck, gradcheck_module
from .layers import (
    GELU,
    Attention,
    Conv2d,
    Dropout,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    SiLU,
    Upsample,
    group_norm_silu,
)
from .losses import cross_entropy, gaussian_kl, info_nce_loss, mse_loss
from .module import (
    Module,
    ModuleList,
    Parameter,
    Sequential,
    StateDictError,
    is_grad_enabled,
    manual_seed,
    no_grad,
    to_state_arrays,
)
from .optim import EMA, AdamW, clip_grad_norm, warmup_cosine_lr

__all__ = [
    "AdamW", "Attention", "Conv2d", "Dropout", "EMA", "Embedding", "GELU", "GroupNorm", "LayerNorm",
    "Linear", "Module", "ModuleList", "Parameter", "Sequential", "SiLU", "StateDictError", "Upsample",
    "clip_grad_norm", "cross_entropy", "functional", "gaussian_kl", "gradcheck", "gradcheck_module", "group_norm_silu",
    "info_nce_loss", "is_grad_enabled", "manual_seed", "mse_loss", "no_grad", "to_state_arrays",
    "warmup_cosine_lr",
]
