"""Consistency models: one network call from any noise level straight to clean data.

A diffusion model's probability-flow ODE carries every noisy point x_σ along a trajectory that
ends at one clean point. A *consistency function* f maps every point of a trajectory to that same
end point (Song et al. 2023, "Consistency Models", §3):

    f(x_σ, σ) = f(x_σ', σ')  for all σ, σ' on one trajectory,      f(x, σ_min) = x      (CM eq. 3)

so sampling needs one evaluation of f, or a few with re-noising in between (``sample_lcm``).
The boundary condition is built into the parameterisation rather than learned (CM eq. 5):

    f(x, σ) = c_skip(σ) · x + c_out(σ) · x̂0(x, σ)

with c_skip(σ_min) = 1 and c_out(σ_min) = 0, where x̂0 is the network's estimate of the clean
data (the denoiser D of ``denoiser.py``). Latent consistency models (Luo et al. 2023, LCM,
arXiv 2310.04378, eq. 9 and their released code) use σ_data = 0.5 on the DDPM timestep index t,
scaled by 10:

    u = 10 · t,     c_skip = σ_data² / (u² + σ_data²),     c_out = u / √(u² + σ_data²)

so c_skip(0) = 1, c_out(0) = 0, and already at t = 1 (u = 10) c_skip = 0.0025: away from the very
first timestep f is the network's x̂0.

**From the paper's timesteps to tinydiff's σ.** The paper writes f(x_t, t) on DDPM indices
t ∈ {0, …, T−1} with the boundary at t = 0. tinydiff's samplers work with the noise level σ of
x = x0 + σ·ε (VE form). Two choices make the boundary exact here:

* **t is the timestep of σ**, t = ``sigma_to_t(schedule, σ)`` (log σ interpolated between the
  integers, as the denoiser feeds the network), and the formula is applied to that t directly,
  with t_min = 0: the smallest σ of the training grid, σ_min = σ_0 (0.01 for the linear schedule
  of T = 1000), has t = 0 exactly, so c_skip = 1, c_out = 0 and **f(x, σ_min) = x exactly**.
  (u = 10·(t − t_min) is the same thing, since t_min = 0.) Any σ below σ_min, σ = 0 included,
  also maps to t = 0 and returns x. Applying the formula to σ itself (u = 10·σ) would be the
  trap: c_skip(σ_min) = 0.25/(0.01 + 0.25) ≈ 0.96, and the boundary condition would not hold.
* **the skip term multiplies the VE point x**, not the paper's VP x_t = √ᾱ_t·x: then the
  boundary reads f(x, σ_min) = x in the space the samplers walk. The two differ by the factor
  √ᾱ_t on a term that matters only where c_skip is not tiny (t ≤ 1, where √ᾱ_t ≥ 0.9999).

Sampling (``samplers.sample_lcm``) then alternates x̂ ← f(x, σ) and re-noising to the next σ.
A distilled model is made by ``tinydiff.train.lcm``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backend import backend_of, to_device, to_numpy
from .noise import append_dims, predicted_x0
from .schedules import NoiseSchedule, sigma_to_t

SIGMA_DATA = 0.5  # σ_data of LCM (and of the consistency-models paper): the data's assumed std
TIMESTEP_SCALING = 10.0  # u = 10 · t (LCM's released code, ``timestep_scaling``)


def consistency_scalings(schedule: NoiseSchedule, sigma, *, sigma_data: float = SIGMA_DATA,
                         timestep_scaling: float = TIMESTEP_SCALING) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) at noise level(s) ``sigma`` (float or (B,)), as float64 arrays of its shape.

    t = sigma_to_t(σ) (0 at σ_min and below), u = timestep_scaling · t (LCM eq. 9, module docstring):

        c_skip = σ_data²/(u² + σ_data²),      c_out = u/√(u² + σ_data²)
    """
    u = timestep_scaling * sigma_to_t(schedule, to_numpy(sigma))  # the paper's scaled timestep
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / np.sqrt(u**2 + sigma_data**2)
    return c_skip, c_out


def x0_output_coefficient(sigma, prediction_type: str):
    """∂x̂0/∂F: how the denoiser's x̂0 moves with the network output F at noise level σ (float or (B,)).

    The denoiser computes x̂0 = ``predicted_x0``(F, x_t, ᾱ) with ᾱ = 1/(1 + σ²), which is linear
    in (F, x_t) jointly (noise.py), so its coefficient on F is x̂0 at F = 1, x_t = 0:
    −σ for 'epsilon' (x̂0 = x − σ ε̂), −√(1 − ᾱ) for 'v', 1 for 'sample'. Float64, σ's shape.
    """
    alpha_bar = 1 / (1 + np.asarray(to_numpy(sigma), dtype=np.float64) ** 2)
    one = np.ones_like(alpha_bar)
    return predicted_x0(one, 0 * one, alpha_bar, prediction_type)


@dataclass(frozen=True, eq=False)
class ConsistencyFunction:
    """f(x, σ) = c_skip(σ)·x + c_out(σ)·D(x, σ) for a denoiser D (CM eq. 5, LCM eq. 9).

    denoiser   D(x, σ) → x̂0, e.g. a ``Denoiser`` around a distilled network (one call per use)
    schedule   the training schedule, which fixes the timestep t of each σ

    Calling it: ``f(x, sigma)`` with x (B, C, H, W) and sigma a float or a (B,) array; at
    σ ≤ σ_min it returns x itself and does not call D.
    """

    denoiser: Callable
    schedule: NoiseSchedule

    def scalings(self, sigma, like):
        """(c_skip, c_out) as (B, 1, …, 1) arrays on the device and dtype of ``like`` (B, …)."""
        c_skip, c_out = consistency_scalings(self.schedule, sigma)
        batch = np.zeros(like.shape[0])  # float or (B,) → (B,)
        return tuple(append_dims(to_device(batch + c, backend_of(like), dtype=like.dtype), like.ndim)
                     for c in (c_skip, c_out))

    def __call__(self, x, sigma):
        if np.all(to_numpy(sigma) <= self.schedule.sigma_min):  # the boundary: t = 0, f = x exactly
            return x
        c_skip, c_out = self.scalings(sigma, x)
        return c_skip * x + c_out * self.denoiser(x, sigma)
