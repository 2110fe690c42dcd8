"""Thin layer classes over the functional pairs, with PyTorch's signatures, names and layouts.

Each ``forward`` checks its input (rank, features, dtype, backend) so a mistake is reported in
the layer's own words, keeps its cache (unless in ``no_grad()``), and each ``backward`` adds into
its parameters' ``.grad`` and returns the input gradient.

Layers with random initial values (Linear, Conv2d, Embedding, Attention, and Dropout's mask
seed) take ``generator=``, the NumPy Generator to draw them from: a model makes one from its
seed and passes it to every layer it builds. Without one they draw from the default generator
(``module.init_generator()``, reset by ``manual_seed``).
"""

from __future__ import annotations

import math

from ..backend import DEFAULT_DTYPE, default_xp, fast_or_reference, reference_enabled, rng
from . import conv, fast_conv, fast_norm
from . import functional as F
from .module import Module, Parameter, init_generator, is_grad_enabled, uniform_init


class Linear(Module):
    """y = x Wᵀ + b.  weight (out_features, in_features), bias (out_features,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, generator=None):
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(uniform_init((out_features, in_features), bound, generator))
        self.bias = Parameter(uniform_init((out_features,), bound, generator)) if bias else None

    def forward(self, x):
        self._check_input(x, self.weight.data, None, self.in_features, -1, "(..., in_features)")
        out, cache = F.linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)
        self._keep(cache)
        return out

    def backward(self, dout):
        dx, dw, db = F.linear_backward(dout, self._take())
        self.weight.accumulate(dw, "weight")
        if self.bias is not None:
            self.bias.accumulate(db, "bias")
        return dx


class Conv2d(Module):
    """2-D convolution. weight (out_channels, in_channels, kh, kw), bias (out_channels,).

    Runs ``fast_conv``'s pair, or the reference pair of ``conv`` under ``backend.use_reference()``;
    backward uses the pair its forward pass used."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, *, generator=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding = stride, padding
        bound = 1.0 / math.sqrt(in_channels * kh * kw)
        self.weight = Parameter(uniform_init((out_channels, in_channels, kh, kw), bound, generator))
        self.bias = Parameter(uniform_init((out_channels,), bound, generator)) if bias else None

    def forward(self, x):
        self._check_input(x, self.weight.data, 4, self.in_channels, 1, "(N, C, H, W)")
        b = None if self.bias is None else self.bias.data
        pair = fast_or_reference(fast_conv, conv)  # the module whose conv2d_forward/backward run
        out, cache = pair.conv2d_forward(x, self.weight.data, b, self.stride, self.padding)
        self._keep((pair, cache))
        return out

    def backward(self, dout):
        pair, cache = self._take()
        dx, dw, db = pair.conv2d_backward(dout, cache)
        self.weight.accumulate(dw, "weight")
        if self.bias is not None:
            self.bias.accumulate(db, "bias")
        return dx


def _ones(n):
    return default_xp().ones(n, dtype=DEFAULT_DTYPE)


def _zeros(n):
    return default_xp().zeros(n, dtype=DEFAULT_DTYPE)


class GroupNorm(Module):
    """GroupNorm(num_groups, num_channels, eps=1e-5); weight = γ (ones), bias = β (zeros)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(_ones(num_channels))
        self.bias = Parameter(_zeros(num_channels))

    def forward(self, x):
        self._check_input(x, self.weight.data, None, self.num_channels, 1, "(N, C, ...)")
        out, cache = F.group_norm_forward(x, self.num_groups, self.weight.data, self.bias.data, self.eps)
        self._keep(cache)
        return out

    def backward(self, dout):
        dx, dg, db = F.group_norm_backward(dout, self._take())
        self.weight.accumulate(dg, "weight")
        self.bias.accumulate(db, "bias")
        return dx


class LayerNorm(Module):
    """LayerNorm(normalized_shape, eps=1e-5) over the trailing axes; weight ones, bias zeros."""

    def __init__(self, normalized_shape, eps: float = 1e-5):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(default_xp().ones(shape, dtype=DEFAULT_DTYPE))
        self.bias = Parameter(default_xp().zeros(shape, dtype=DEFAULT_DTYPE))

    def forward(self, x):
        if tuple(x.shape[x.ndim - len(self.normalized_shape) :]) != self.normalized_shape:
            raise ValueError(
                f"LayerNorm{self.normalized_shape} got an input of shape {tuple(x.shape)}: "
                "its trailing axes must equal normalized_shape"
            )
        self._check_input(x, self.weight.data, None, None, -1, "")
        out, cache = F.layer_norm_forward(x, self.weight.data, self.bias.data, self.eps)
        self._keep(cache)
        return out

    def backward(self, dout):
        dx, dg, db = F.layer_norm_backward(dout, self._take())
        self.weight.accumulate(dg, "weight")
        self.bias.accumulate(db, "bias")
        return dx


class Embedding(Module):
    """Embedding(num_embeddings, embedding_dim): weight (num_embeddings, embedding_dim) ~ N(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, generator=None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        w = init_generator(generator).standard_normal((num_embeddings, embedding_dim)).astype(DEFAULT_DTYPE)
        self.weight = Parameter(default_xp().asarray(w))

    def forward(self, ids):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"Embedding expects integer ids, got dtype {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"Embedding ids must lie in [0, {self.num_embeddings}), got range "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        out, cache = F.embedding_forward(ids, self.weight.data)
        self._keep(cache)
        return out

    def backward(self, dout):
        self.weight.accumulate(F.embedding_backward(dout, self._take()), "weight")
        return None  # integer ids have no gradient


class SiLU(Module):
    def forward(self, x):
        out, cache = F.silu_forward(x)
        self._keep(cache)
        return out

    def backward(self, dout):
        return F.silu_backward(dout, self._take())


def group_norm_silu(norm: GroupNorm, act: SiLU, x):
    """``act(norm(x))``, a GroupNorm followed by SiLU. In inference mode (``no_grad``), unless the
    reference implementations are on, one fused computation that keeps no cache
    (``fast_norm.group_norm_silu_forward``); otherwise the two layers, keeping their caches."""
    if is_grad_enabled() or reference_enabled():
        return act(norm(x))
    norm._check_input(x, norm.weight.data, None, norm.num_channels, 1, "(N, C, ...)")
    norm._keep(None)  # as their own forward in no_grad: neither layer can run backward now
    act._keep(None)
    return fast_norm.group_norm_silu_forward(x, norm.num_groups, norm.weight.data, norm.bias.data, norm.eps)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        F.gelu_forward(_zeros(1), approximate)  # validates the option now, not at first use
        self.approximate = approximate

    def forward(self, x):
        out, cache = F.gelu_forward(x, self.approximate)
        self._keep(cache)
        return out

    def backward(self, dout):
        return F.gelu_backward(dout, self._take())


class Upsample(Module):
    """Nearest-neighbour upsampling by 2 (the only mode the U-Net needs)."""

    def __init__(self, scale_factor: int = 2, mode: str = "nearest"):
        if scale_factor != 2 or mode != "nearest":
            raise ValueError("Upsample supports scale_factor=2, mode='nearest' only")
        self.scale_factor, self.mode = scale_factor, mode

    def forward(self, x):
        self._check_input(x, None, 4, None, 1, "(N, C, H, W)")
        out, x_shape = F.upsample_nearest2x_forward(x)
        self._keep(x_shape)
        return out

    def backward(self, dout):
        return F.upsample_nearest2x_backward(dout, self._take())


class Dropout(Module):
    """Dropout(p). Its mask comes from its own CPU generator (``self.generator``), seeded from the
    initialisation generator, so a seeded model drops the same units on either backend."""

    def __init__(self, p: float = 0.5, *, generator=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.generator = rng(int(init_generator(generator).integers(2**63)))

    def forward(self, x):
        out, cache = F.dropout_forward(x, self.p, self.generator, self.training)
        self._keep(cache)
        return out

    def backward(self, dout):
        return F.dropout_backward(dout, self._take())


class Attention(Module):
    """Multi-head attention usable as self-attention (context=None) or cross-attention.

    Parameters (diffusers' names): to_q (query_dim → inner), to_k/to_v (context_dim → inner), no
    bias; to_out (inner → query_dim) with bias; inner = heads · dim_head.

    forward(x (B, L, query_dim), context (B, Lc, context_dim) or None, mask (B, Lc) bool or None,
    True = a real key) → (B, L, query_dim).  backward returns dx for self-attention and
    (dx, dcontext) for cross-attention.  If ``probs_callback`` is set it is called with the
    attention probabilities (B, heads, L, Lc) on every forward (for attention maps).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 4, dim_head: int = 32, *,
                 generator=None):
        self.query_dim, self.heads, self.dim_head = query_dim, heads, dim_head
        self.context_dim = context_dim if context_dim is not None else query_dim
        inner = heads * dim_head
        self.to_q = Linear(query_dim, inner, bias=False, generator=generator)
        self.to_k = Linear(self.context_dim, inner, bias=False, generator=generator)
        self.to_v = Linear(self.context_dim, inner, bias=False, generator=generator)
        self.to_out = Linear(inner, query_dim, generator=generator)
        self.probs_callback = None

    def _split_heads(self, t):
        b, length, _ = t.shape
        return t.reshape(b, length, self.heads, self.dim_head).transpose(0, 2, 1, 3)  # (B, h, L, d)

    def _merge_heads(self, t):
        b, _, length, _ = t.shape
        return t.transpose(0, 2, 1, 3).reshape(b, length, self.heads * self.dim_head)  # (B, L, h·d)

    def forward(self, x, context=None, mask=None):
        self._check_input(x, self.to_q.weight.data, 3, self.query_dim, -1, "(B, L, query_dim)")
        is_cross = context is not None
        source = context if is_cross else x
        if is_cross and (source.ndim != 3 or source.shape[-1] != self.context_dim or source.shape[0] != x.shape[0]):
            raise ValueError(
                f"Attention expects context of shape (B={x.shape[0]}, Lc, {self.context_dim}), got {tuple(source.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(source.shape[:2]):
            raise ValueError(f"Attention mask must have shape {tuple(source.shape[:2])}, got {tuple(mask.shape)}")
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(source))
        v = self._split_heads(self.to_v(source))
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lc)
        o, cache = F.attention_forward(q, k, v, key_mask)
        if self.probs_callback is not None:
            self.probs_callback(cache.p)
        self._keep((cache, is_cross))
        return self.to_out(self._merge_heads(o))

    def backward(self, dout):
        cache, is_cross = self._take()
        do = self._split_heads(self.to_out.backward(dout))
        dq, dk, dv = F.attention_backward(do, cache)
        dx = self.to_q.backward(self._merge_heads(dq))
        dsource = self.to_k.backward(self._merge_heads(dk))
        dsource += self.to_v.backward(self._merge_heads(dv))  # in place: Linear.backward returns a new array
        if is_cross:
            return dx, dsource
        dx += dsource
        return dx
