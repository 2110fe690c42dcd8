"""Pointwise nonlinearities, softmax and dropout: forward/backward pairs."""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import backend_of, erf, fast_or_reference, get_xp, to_device


def sigmoid(x):
    """σ(x) = 1/(1+e^{−x}) written as ½(1 + tanh(x/2)), which never overflows."""
    s = get_xp(x).tanh(0.5 * x)
    s += 1.0  # in place: no temporary per step
    s *= 0.5
    return s


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
    t = 1.0 - s
    t *= x
    t += 1.0  # 1 + x(1 − σ), in place
    dx = dout * s
    dx *= t
    return dx


class GELUCache(NamedTuple):
    x: object
    approximate: str
    phi: object  # Φ(x) (exact) or t = tanh(u) (tanh form), kept so backward needs no second erf/tanh


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715

# erf(x) ≈ x·α(x²)/β(x²) on [−4, 4]: the coefficients of α and β (highest power of x² first) of
# the single-precision erf of the Eigen library (``generic_fast_erf_float``), which XLA and TVM
# use too. Beyond |x| = 4, erf(x) is ±1 in float32 (1 − erf(4) = 1.5e-8).
_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
             -1.42647390514189e-02)
ERF_CHUNK = 32768  # numbers per chunk of erf_rational: its float64 temporaries (4 × 256 kB) stay in cache


def erf_rational(x):
    """erf of a NumPy array by a rational approximation, about 4× faster than scipy.special.erf
    (scipy evaluates the series of Cody-type approximations element by element):

        erf(x) ≈ x·α(x²)/β(x²),  x clipped to [−4, 4],  α of degree 6, β of degree 4 in x²

    Each chunk is evaluated in float64 by Horner's rule and rounded back to x's dtype. Measured
    against scipy over [−8, 8] (tests/test_fast_paths.py): the approximation is within 6.5e-8
    (absolute, and relative to erf(x) too, since both are odd and linear near 0), and within
    1e-7 once rounded to float32, about the size of float32's rounding of numbers near 1 (6e-8):
    so GELU(x) = x·Φ(x) is unchanged up to float32 rounding. (Evaluated in float32 instead, the
    error grows to 4e-7 near |x| = 4.) Not for float64 work, which needs erf to 1e-16: GELU uses
    it on float32 only.
    """
    flat = x.reshape(-1)
    out = get_xp(x).empty_like(flat)
    for start in range(0, flat.size, ERF_CHUNK):
        z = flat[start : start + ERF_CHUNK].astype("float64")  # a copy, clipped in place
        z.clip(-4.0, 4.0, out=z)
        z2 = z * z
        num = z2 * _ERF_ALPHA[0]
        num += _ERF_ALPHA[1]
        for a in _ERF_ALPHA[2:]:  # Horner: num = num·x² + a
            num *= z2
            num += a
        den = z2 * _ERF_BETA[0]
        den += _ERF_BETA[1]
        for b in _ERF_BETA[2:]:
            den *= z2
            den += b
        num *= z
        num /= den
        out[start : start + ERF_CHUNK] = num
    return out.reshape(x.shape)


def _gelu_erf(x):
    """The erf that exact GELU uses: ``erf_rational`` for float32 arrays on the CPU unless the
    reference implementations are on (``backend.use_reference``), else scipy's (float64, CuPy)."""
    if x.dtype.itemsize == 4 and backend_of(x) == "numpy":
        return fast_or_reference(erf_rational, erf)(x)
    return erf(x)


def gelu_forward(x, approximate: str = "none"):
    """GELU: out = x·Φ(x), Φ the standard normal CDF (Hendrycks & Gimpel 2016).

    approximate="none" (PyTorch's default): Φ(x) = ½(1 + erf(x/√2)).
    approximate="tanh": out = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³).
    """
    xp = get_xp(x)
    if approximate == "none":
        phi = _gelu_erf(x * (1.0 / math.sqrt(2.0)))
        phi += 1.0
        phi *= 0.5  # Φ(x) = ½(1 + erf(x/√2)), in place
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
        dx = x * x
        dx *= -0.5
        xp.exp(dx, out=dx)
        dx *= 1.0 / math.sqrt(2.0 * math.pi)  # φ(x)
        dx *= x
        dx += phi
        dx *= dout  # dout · (Φ(x) + x φ(x)), in one new array
        return dx
    t = phi
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


class SoftmaxCache(NamedTuple):
    p: object  # the softmax output
    axis: int


def softmax_forward(x, axis: int = -1):
    """p_i = e^{x_i − max x} / Σ_j e^{x_j − max x} (subtracting the max changes nothing but overflow)."""
    xp = get_xp(x)
    p = x - x.max(axis=axis, keepdims=True)
    xp.exp(p, out=p)  # in place: one new array in all
    p /= p.sum(axis=axis, keepdims=True)
    return p, SoftmaxCache(p, axis)


def softmax_backward(dout, cache: SoftmaxCache):
    """∂p_i/∂x_j = p_i(δ_ij − p_j)  ⇒  dx = p ⊙ (dout − Σ_j dout_j p_j)."""
    p, axis = cache
    dx = dout * p
    get_xp(dx).subtract(dout, dx.sum(axis=axis, keepdims=True), out=dx)  # dout − Σ_j dout_j p_j, in place
    dx *= p
    return dx


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
