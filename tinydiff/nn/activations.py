"""Pointwise nonlinearities, softmax and dropout: forward/backward pairs."""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import erf, get_xp, to_device, backend_of


def sigmoid(x):
    """σ(x) = 1/(1+e^{−x}) written as ½(1 + tanh(x/2)), which never overflows."""
    xp = get_xp(x)
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


class SiLUCache(NamedTuple):
    x: object
    s: object  # σ(x)


def silu_forward(x):
    """SiLU (swish): out = x·σ(x)."""
    s = sigmoid(x)
    return x * s, SiLUCache(x, s)


def silu_backward(dout, cache: SiLUCache):
    """d/dx [x σ(x)] = σ(x) + x σ(x)(1 − σ(x)) = σ(x)(1 + x(1 − σ(x)))."""
    x, s = cache
    return dout * s * (1.0 + x * (1.0 - s))


class GELUCache(NamedTuple):
    x: object
    approximate: str
    phi: object  # Φ(x) (exact) or t = tanh(u) (tanh form), kept so backward needs no second erf/tanh


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def gelu_forward(x, approximate: str = "none"):
    """GELU: out = x·Φ(x), Φ the standard normal CDF (Hendrycks & Gimpel 2016).

    approximate="none" (PyTorch's default): Φ(x) = ½(1 + erf(x/√2)).
    approximate="tanh": out = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³).
    """
    xp = get_xp(x)
    if approximate == "none":
        phi = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
        return x * phi, GELUCache(x, approximate, phi)
    if approximate == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
        return 0.5 * x * (1.0 + t), GELUCache(x, approximate, t)
    raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_backward(dout, cache: GELUCache):
    """exact: Φ(x) + x φ(x), φ(x) = e^{−x²/2}/√(2π);
    tanh:  ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²), t = tanh(u)."""
    x, approximate, phi = cache
    xp = get_xp(x)
    if approximate == "none":
        pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return dout * (phi + x * pdf)
    t = phi
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


class SoftmaxCache(NamedTuple):
    p: object  # the softmax output
    axis: int


def softmax_forward(x, axis: int = -1):
    """p_i = e^{x_i − max x} / Σ_j e^{x_j − max x} (subtracting the max changes nothing but overflow)."""
    xp = get_xp(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    p = e / e.sum(axis=axis, keepdims=True)
    return p, SoftmaxCache(p, axis)


def softmax_backward(dout, cache: SoftmaxCache):
    """∂p_i/∂x_j = p_i(δ_ij − p_j)  ⇒  dx = p ⊙ (dout − Σ_j dout_j p_j)."""
    p, axis = cache
    return p * (dout - (dout * p).sum(axis=axis, keepdims=True))


class DropoutCache(NamedTuple):
    mask: object | None  # kept/(1−p) scaling per element, None when dropout was a no-op


def dropout_forward(x, p: float, generator, training: bool = True):
    """Inverted dropout: zero each element with probability p and scale survivors by 1/(1−p),
    so the expectation is unchanged and evaluation needs no rescaling. The mask is drawn on the
    CPU from ``generator`` and moved to x's device (same seed, same mask on either backend)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x, DropoutCache(None)
    keep = generator.random(x.shape) >= p
    mask = to_device(keep.astype(x.dtype) / (1.0 - p), backend_of(x))
    return x * mask, DropoutCache(mask)


def dropout_backward(dout, cache: DropoutCache):
    """The same mask scales the gradient."""
    return dout if cache.mask is None else dout * cache.mask
