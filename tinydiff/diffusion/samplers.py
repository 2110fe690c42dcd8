"""Samplers: walk x from pure noise at σ_0 down to clean data at σ = 0, using only D(x, σ).

Every sampler here has the same signature (the k-diffusion convention):

    sample_NAME(denoiser, x, sigmas, *, rng=None, callback=None, **options) -> x0

    denoiser   D(x, σ) → x̂0 ≈ E[x0 | x], e.g. a `tinydiff.diffusion.Denoiser`
    x          the starting point, noise · sigmas[0], shape (B, …), any backend
    sigmas     decreasing 1-D noise levels ending with 0 (see `schedules.get_sigmas`)
    rng        for the stochastic samplers: None, an int seed, a Generator, or one Generator
               per batch element (`noise.per_sample_generators`); deterministic samplers ignore it
    callback   called once per step with {"i", "x", "sigma", "sigma_next", "denoised"}

Samplers are pure functions: multistep history is a local variable, and fresh noise is drawn on
the CPU, per sample, by `noise.randn_per_sample`, so a sample does not depend on its batch.

The maths, in the VE form x = x0 + σ ε (EDM, Karras et al. 2022). The probability-flow ODE is

    dx/dσ = (x − D(x, σ))/σ                     (EDM eq. 1 with ∇log p = (D − x)/σ², eq. 3; σ(t) = t)

    euler       x ← x + (σ' − σ)·d,  d = (x − D)/σ                            (the Euler part of EDM Alg. 1)
    heun        Euler predictor, then the trapezoid with d at the predicted point    (EDM Alg. 1)
                (the final step to σ' = 0 stays Euler: D at σ = 0 would be 1/0 in d)
    dpmpp_2m    x ← (σ'/σ)·x − (e^{−h} − 1)·D̃,  h = log(σ/σ')  (λ = −log σ)   (DPM-Solver++ 2M)
                D̃ = (1 + 1/2r)·D_i − (1/2r)·D_{i−1},  r = h_{i−1}/h_i; first order (D̃ = D_i)
                for the first step and for the final step to σ' = 0, where h = ∞ and x ← D
    ddim        x ← D + √(σ'² − σ_up²)·ε̂ + σ_up·z,  ε̂ = (x − D)/σ                (DDIM eq. 12)
    ddpm        x ← D + (σ'/σ)²·(x − D) + σ'·√(1 − (σ'/σ)²)·z                  (DDPM eq. 6–7)
    euler_ancestral   Euler to σ_down, then add σ_up·z                      (k-diffusion)
    lcm         x ← f(x, σ), then re-noise: x ← x + √(σ'² − σ_min²)·z   (multistep consistency sampling)

where z ~ N(0, I) is fresh noise and σ' = sigmas[i+1].

DDIM in σ-space. DDIM eq. 12 in VP terms is x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ_η²) ε̂ + σ_η z with
σ_η from eq. 16, σ_η = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s). Dividing by √ᾱ_s (VP → VE) and
using σ² = (1 − ᾱ)/ᾱ gives the line above with

    σ_up = σ_η/√ᾱ_s = η · σ' · √(σ² − σ'²)/σ,        σ_down = √(σ'² − σ_up²)

which is exactly k-diffusion's ancestral split (`ancestral_step`). Hence: DDIM with η = 0 is the
Euler step (D + σ'·(x − D)/σ = x + (σ' − σ)(x − D)/σ), and DDIM with η is Euler ancestral with η.

DDPM in σ-space. In VE form the forward process is a Brownian motion, x_σ | x_σ' ~ N(x_σ',
(σ² − σ'²) I), so the posterior of DDPM eq. 6–7 is the Brownian bridge written above: mean
x̂0 + (σ'/σ)²(x − x̂0), variance σ'²(σ² − σ'²)/σ². Over all T training σ this is Ho et al.'s
Algorithm 2 with the posterior variance β̃_t; it also equals DDIM / Euler ancestral with η = 1.

LCM (Luo et al. 2023). A consistency model f maps any noisy point straight to x0; sampling
alternates that jump with re-noising to the next, lower σ. The consistency boundary scalings
(c_skip, c_out) belong to the function f the loop is given (``consistency.ConsistencyFunction``
around a distilled network), not to the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..backend import backend_of, to_numpy
from .noise import per_sample_generators, randn_per_sample


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def validate_sigmas(sigmas) -> list[float]:
    """The σ sequence as Python floats, after checking it is 1-D, finite, strictly decreasing, ends at 0."""
    array = to_numpy(sigmas)
    if array.ndim != 1 or array.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D array of at least 2 entries (one step); got shape {array.shape}")
    values = [float(s) for s in array]
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"sigmas must be finite; got {values}")
    if any(later >= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing (no repeated sigma); got {values}")
    if values[-1] != 0:
        raise ValueError(f"sigmas must end with 0 so the last step lands on clean data; got last {values[-1]}")
    return values


def _steps(sigmas) -> list[tuple[float, float]]:
    """[(σ_0, σ_1), (σ_1, σ_2), …]: one pair per step, validated."""
    values = validate_sigmas(sigmas)
    return list(zip(values[:-1], values[1:]))


def to_d(x, sigma, denoised):
    """dx/dσ = (x − D(x, σ))/σ, the probability-flow ODE in VE form (EDM eq. 1, 3); also ε̂."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split σ → σ' into a deterministic move to σ_down and fresh noise σ_up (σ_down² + σ_up² = σ'²).

    σ_up = min(σ', η σ' √(σ² − σ'²)/σ): DDIM eq. 16 mapped to σ-space (module docstring).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def _noise_like(generators, x):
    """z ~ N(0, I) shaped like x, element i drawn by generators[i]."""
    return randn_per_sample(generators, x.shape, dtype=x.dtype, backend=backend_of(x))


def _report(callback, i, x, sigma, sigma_next, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


# ---------------------------------------------------------------------------------------------
# Deterministic samplers (probability-flow ODE)
# ---------------------------------------------------------------------------------------------


def sample_euler(denoiser, x, sigmas, *, rng=None, callback=None):
    """Euler's method on dx/dσ = (x − D)/σ: first order (the predictor of EDM Alg. 1)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


def sample_heun(denoiser, x, sigmas, *, rng=None, callback=None):
    """Heun's method (EDM Alg. 1, deterministic; Alg. 2 adds churn): second order, two D calls per step but the last."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:  # final step: Euler (EDM Alg. 1, line 8)
            x = x_euler
        else:  # trapezoid rule with the slope at the Euler prediction
            d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, rng=None, callback=None):
    """DPM-Solver++ 2M (Lu et al. 2022): second-order multistep in λ = −log σ, one D call per step."""
    previous = None  # (σ_{i−1}, D_{i−1}) from the step before: the multistep history
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        ratio = sigma_next / sigma  # e^{−h}
        if previous is None or sigma_next == 0:
            # First order (DPM-Solver++ 1 = DDIM): x ← (σ'/σ) x − (e^{−h} − 1) D; x ← D when σ' = 0.
            x = ratio * x + (1 - ratio) * denoised
        else:
            sigma_prev, denoised_prev = previous
            h, h_last = math.log(sigma / sigma_next), math.log(sigma_prev / sigma)
            r = h_last / h
            denoised_mix = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev  # D̃
            x = ratio * x - math.expm1(-h) * denoised_mix
        previous = (sigma, denoised)
    return x


# ---------------------------------------------------------------------------------------------
# DDIM (deterministic at eta = 0) and the stochastic samplers
# ---------------------------------------------------------------------------------------------


def ddim_step(x, denoised, sigma, sigma_next):
    """The deterministic part of a DDIM step (eq. 12 with σ_η = 0): x̂0 + σ'·ε̂, ε̂ = (x − x̂0)/σ.

    ``sigma`` and ``sigma_next`` are floats, or arrays that broadcast against x (B, 1, …, 1) for
    a different step per sample (consistency distillation's teacher solve, ``train.lcm``).
    """
    eps = to_d(x, sigma, denoised)  # ε̂ = (x − x̂0)/σ, the noise the network sees in x
    return denoised + sigma_next * eps


def sample_ddim(denoiser, x, sigmas, *, rng=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2020, eq. 12 and 16) in σ-space; eta = 0 deterministic, eta = 1 DDPM-like."""
    generators = per_sample_generators(rng, x.shape[0]) if eta > 0 else None
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = ddim_step(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * _noise_like(generators, x)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, rng=None, callback=None, eta: float = 1.0):
    """Euler step down to σ_down, then fresh noise σ_up back up to σ' (k-diffusion's ancestral sampler)."""
    generators = per_sample_generators(rng, x.shape[0])
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + sigma_up * _noise_like(generators, x)
    return x


def sample_ddpm(denoiser, x, sigmas, *, rng=None, callback=None):
    """Ancestral sampling from the DDPM posterior q(x_{σ'} | x_σ, x̂0) (Ho et al. eq. 6–7, Algorithm 2)."""
    generators = per_sample_generators(rng, x.shape[0])
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        shrink = (sigma_next / sigma) ** 2  # σ'²/σ²
        x = denoised + shrink * (x - denoised)  # posterior mean, eq. 7 in VE form
        if sigma_next > 0:  # posterior std σ' √(1 − σ'²/σ²); none on the last step
            x = x + sigma_next * math.sqrt(1 - shrink) * _noise_like(generators, x)
    return x


def sample_lcm(denoiser, x, sigmas, *, rng=None, callback=None, sigma_min: float = 0.0):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, Luo et al. 2023, Alg. 3).

    ``denoiser`` must be a consistency function f(x, σ) (``consistency.ConsistencyFunction``
    around a distilled network, ``train.lcm``): each step jumps to the clean estimate x̂ = f(x, σ)
    and, unless it was the last step, re-noises it to the next level,

        x ← x̂ + √(σ'² − σ_min²) · z,       z ~ N(0, I)                    (CM Algorithm 1, line 5)

    where σ_min is the consistency boundary (f's output is a point at noise level σ_min, about
    clean). With the denoiser D of an ordinary diffusion model instead of f this loop still runs,
    but it is then just "jump to x̂0 and re-noise", not a consistency model. Returns the last x̂.
    """
    generators = per_sample_generators(rng, x.shape[0])
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = denoiser(x, sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = denoised
        if sigma_next > 0:
            noise_level = math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0))
            x = denoised + noise_level * _noise_like(generators, x)
    return x


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Callable:
    """The sampler function registered under ``name``; a clear error lists the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None
