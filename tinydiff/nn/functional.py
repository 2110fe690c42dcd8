"""Every hand-written forward/backward pair in one namespace: ``from tinydiff.nn import functional as F``.

Convention (cs231n): ``F.NAME_forward(inputs...) -> (out, cache)`` and
``F.NAME_backward(dout, cache) -> gradients``; caches are NamedTuples. ``attention_forward`` is
``fast_attention``'s, which runs the reference ``attention.attention_forward`` under
``backend.use_reference()``.
"""

from .activations import (
    dropout_backward,
    dropout_forward,
    gelu_backward,
    gelu_forward,
    sigmoid,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
)
from .attention import attention_backward
from .fast_attention import attention_forward  # attention.attention_forward's numbers, faster (use_reference: it)
from .broadcast import unbroadcast
from .conv import (
    conv2d_backward,
    conv2d_forward,
    conv_output_size,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)
from .dense import embedding_backward, embedding_forward, linear_backward, linear_forward
from .norm import group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward

__all__ = [
    "attention_backward",
    "attention_forward",
    "conv2d_backward",
    "conv2d_forward",
    "conv_output_size",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_backward",
    "gelu_forward",
    "group_norm_backward",
    "group_norm_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_backward",
    "linear_forward",
    "sigmoid",
    "silu_backward",
    "silu_forward",
    "softmax_backward",
    "softmax_forward",
    "unbroadcast",
    "upsample_nearest2x_backward",
    "upsample_nearest2x_forward",
]
