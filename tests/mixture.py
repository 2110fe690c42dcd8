"""Closed-form references for the diffusion tests: Gaussian mixtures and their exact denoisers.

Data x0 ~ Σ_k π_k N(μ_k, s_k² I) (isotropic components over an "event" of shape E). Noising with
x = x0 + σ ε keeps it a mixture, Σ_k π_k N(μ_k, (s_k² + σ²) I), and Bayes' rule gives the ideal
denoiser in closed form (Tweedie; EDM Appendix B.3):

    r_k(x) ∝ π_k N(x; μ_k, (s_k² + σ²) I)                     responsibilities
    E[x0 | x] = Σ_k r_k(x) · (μ_k + s_k²/(s_k² + σ²) · (x − μ_k))

For a single Gaussian N(μ, s²) the probability-flow ODE dx/dσ = (x − E[x0|x])/σ is solved by
x(σ) = μ + (x(σ0) − μ) · √(s² + σ²)/√(s² + σ0²).

Arrays are NumPy float64; x has shape (B, …, *E): the event is the trailing ``len(E)`` axes, so
E = () makes every element an independent scalar draw (many samples from a small batch).
"""

from __future__ import annotations

import numpy as np


class GaussianMixture:
    def __init__(self, weights, means, stds):
        self.weights = np.asarray(weights, dtype=np.float64)  # (K,) π_k
        self.means = np.asarray(means, dtype=np.float64)  # (K, *E) μ_k
        self.stds = np.asarray(stds, dtype=np.float64)  # (K,) s_k
        self.event_shape = self.means.shape[1:]

    def denoise(self, x, sigma):
        """E[x0 | x] for x = x0 + σ ε; sigma a float or a (B,) array."""
        x = np.asarray(x, dtype=np.float64)
        K, event_ndim = len(self.weights), len(self.event_shape)
        sigma2 = np.asarray(sigma, dtype=np.float64) ** 2
        sigma2 = sigma2.reshape(sigma2.shape + (1,) * (x.ndim - sigma2.ndim))  # (B, 1, …) or ()
        mu = self.means.reshape((K,) + (1,) * (x.ndim - event_ndim) + self.event_shape)  # (K, 1…, *E)
        s2 = (self.stds**2).reshape((K,) + (1,) * x.ndim)  # (K, 1, …, 1)
        var = s2 + sigma2  # (K, B or 1, 1, …)
        diff = x - mu  # (K, *x.shape)
        event_axes = tuple(range(diff.ndim - event_ndim, diff.ndim))
        event_size = int(np.prod(self.event_shape))
        log_r = (
            np.log(self.weights).reshape((K,) + (1,) * x.ndim)
            - 0.5 * event_size * np.log(var)
            - np.sum(diff**2, axis=event_axes, keepdims=True) / (2 * var)
        )
        r = np.exp(log_r - log_r.max(axis=0, keepdims=True))
        r /= r.sum(axis=0, keepdims=True)
        return np.sum(r * (mu + s2 / var * diff), axis=0)

    def mean(self):
        """E[x0] per coordinate: (E,)."""
        return np.tensordot(self.weights, self.means, axes=1)

    def variance(self):
        """Var[x0] per coordinate: Σ π_k (s_k² + μ_k²) − E[x0]²."""
        s2 = (self.stds**2).reshape((-1,) + (1,) * len(self.event_shape))  # (K, 1, …)
        return np.tensordot(self.weights, s2 + self.means**2, axes=1) - self.mean() ** 2


def gaussian(mu: float, s: float) -> GaussianMixture:
    """The one-component mixture N(μ, s²) on scalars."""
    return GaussianMixture([1.0], [mu], [s])


def gaussian_ode_solution(x, sigma_from, sigma_to, mu: float, s: float):
    """Exact probability-flow ODE solution for data N(μ, s²): x(σ_to) given x(σ_from)."""
    return mu + (x - mu) * np.sqrt(s**2 + sigma_to**2) / np.sqrt(s**2 + sigma_from**2)
