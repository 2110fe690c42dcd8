"""The forward (noising) process, what a network predicts, how losses are weighted, and seeds.

Forward process and posterior (DDPM, Ho et al. 2020), at an integer timestep t:

    q(x_t | x0)          = N(√ᾱ_t · x0, (1 − ᾱ_t) I)                              (eq. 4)
    q(x_{t−1} | x_t, x0) = N(μ̃_t, β̃_t I)                                          (eq. 6)
    μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) · x0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) · x_t       (eq. 7)
    β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t,   with ᾱ_{−1} = 1                        (eq. 7)

Prediction types. Given x_t = √ᾱ x0 + √(1 − ᾱ) ε, a network predicts one of

    'epsilon'   ε                                   (DDPM eq. 14)
    'v'         v = √ᾱ ε − √(1 − ᾱ) x0               (Salimans & Ho 2022, §4)
    'sample'    x0

and any one determines the other two, exactly (a rotation by the angle φ with cos φ = √ᾱ):

    x0 = (x_t − √(1 − ᾱ) ε)/√ᾱ      ε = (x_t − √ᾱ x0)/√(1 − ᾱ)
    x0 = √ᾱ x_t − √(1 − ᾱ) v        ε = √(1 − ᾱ) x_t + √ᾱ v

(The ε → x0 form divides by √ᾱ, which is 0 at a zero-terminal-SNR last step: diffusers #3851.)

Loss weights. With SNR = ᾱ/(1 − ᾱ), the three squared errors are multiples of the x0 error:

    ‖ε − ε̂‖² = SNR · ‖x0 − x̂0‖²         (x̂0 − x0 = −(ε̂ − ε)/√SNR)
    ‖v − v̂‖² = (SNR + 1) · ‖x0 − x̂0‖²   (x̂0 − x0 = −√(1 − ᾱ)(v̂ − v), 1/(1 − ᾱ) = SNR + 1)

Min-SNR-γ (Hang et al. 2023) weights the x0 error by min(SNR, γ); the same loss written for
each prediction type therefore needs the per-timestep weight

    'sample':  min(SNR, γ)      'epsilon':  min(SNR, γ)/SNR      'v':  min(SNR, γ)/(SNR + 1)

Seeds. Image i of a batch drawn with seed s uses ``np.random.default_rng(s + i)``, so a batch of
4 with seed s equals 4 runs of 1 with seeds s … s+3, whatever the batch size (k-diffusion #25).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backend import DEFAULT_DTYPE, backend_of, get_xp, rng as make_rng, to_device, to_numpy
from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v", "sample")
LOSS_WEIGHTINGS = ("plain", "min_snr")


def append_dims(a, ndim: int):
    """(B,) → (B, 1, …, 1) with ``ndim`` dimensions, to broadcast a per-sample value over x."""
    if a.ndim > ndim:
        raise ValueError(f"cannot append dimensions to an array of {a.ndim} dims to reach {ndim}")
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; valid types: {', '.join(PREDICTION_TYPES)}")


def alphas_cumprod_at(schedule: NoiseSchedule, t, like):
    """ᾱ_t for integer timesteps t (B,), as a (B, 1, …, 1) array on the device and dtype of ``like``."""
    ab = schedule.alphas_cumprod[to_numpy(t)]  # (B,) gathered on the CPU
    return append_dims(to_device(ab, backend_of(like), dtype=like.dtype), like.ndim)


# ---------------------------------------------------------------------------------------------
# Forward process and posterior
# ---------------------------------------------------------------------------------------------


def q_sample(x0, t, noise, schedule: NoiseSchedule):
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε (DDPM eq. 4). x0, noise (B, …); t integer (B,)."""
    xp = get_xp(x0, noise)
    ab = alphas_cumprod_at(schedule, t, x0)  # (B, 1, …, 1)
    return xp.sqrt(ab) * x0 + xp.sqrt(1 - ab) * noise


def q_posterior_mean_variance(x0, x_t, t, schedule: NoiseSchedule):
    """Mean μ̃_t (B, …) and variance β̃_t (B, 1, …, 1) of q(x_{t−1} | x_t, x0) (DDPM eq. 6–7).

    At t = 0 the "previous" step is clean data (ᾱ_{−1} = 1): mean x0, variance 0.
    """
    t = to_numpy(t)
    ab = schedule.alphas_cumprod[t]  # ᾱ_t
    ab_prev = np.where(t > 0, schedule.alphas_cumprod[np.maximum(t - 1, 0)], 1.0)  # ᾱ_{t−1}
    beta = schedule.betas[t]
    coef_x0 = np.sqrt(ab_prev) * beta / (1 - ab)
    coef_xt = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
    variance = (1 - ab_prev) / (1 - ab) * beta

    def per_sample(a):  # (B,) float64 on the CPU → (B, 1, …, 1) beside x0
        return append_dims(to_device(a, backend_of(x0), dtype=x0.dtype), x0.ndim)

    mean = per_sample(coef_x0) * x0 + per_sample(coef_xt) * x_t
    return mean, per_sample(variance)


# ---------------------------------------------------------------------------------------------
# Prediction types: ε, v, x0 (alpha_bar is ᾱ broadcastable against x_t, e.g. (B, 1, 1, 1))
# ---------------------------------------------------------------------------------------------


def prediction_target(x0, noise, alpha_bar, prediction_type: str):
    """What a network of this prediction type should output for x_t = √ᾱ x0 + √(1 − ᾱ) ε."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    xp = get_xp(x0, noise)
    return xp.sqrt(alpha_bar) * noise - xp.sqrt(1 - alpha_bar) * x0  # v


def predicted_x0(prediction, x_t, alpha_bar, prediction_type: str):
    """x̂0 from a network output (see the module docstring for the equations)."""
    check_prediction_type(prediction_type)
    xp = get_xp(prediction, x_t)
    if prediction_type == "epsilon":
        return (x_t - xp.sqrt(1 - alpha_bar) * prediction) / xp.sqrt(alpha_bar)
    if prediction_type == "v":
        return xp.sqrt(alpha_bar) * x_t - xp.sqrt(1 - alpha_bar) * prediction
    return prediction


def predicted_noise(prediction, x_t, alpha_bar, prediction_type: str):
    """ε̂ from a network output (see the module docstring for the equations)."""
    check_prediction_type(prediction_type)
    xp = get_xp(prediction, x_t)
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v":
        return xp.sqrt(1 - alpha_bar) * x_t + xp.sqrt(alpha_bar) * prediction
    return (x_t - xp.sqrt(alpha_bar) * prediction) / xp.sqrt(1 - alpha_bar)


def convert_prediction(prediction, x_t, alpha_bar, source: str, target: str):
    """A network output of type ``source`` re-expressed as type ``target``, at the same x_t, ᾱ."""
    x0 = predicted_x0(prediction, x_t, alpha_bar, source)
    noise = predicted_noise(prediction, x_t, alpha_bar, source)
    return prediction_target(x0, noise, alpha_bar, target)


# ---------------------------------------------------------------------------------------------
# Loss weights
# ---------------------------------------------------------------------------------------------


def loss_weights(schedule: NoiseSchedule, t, prediction_type: str, weighting: str = "plain", gamma: float = 5.0):
    """Per-sample weights (B,) for the MSE on the network output at integer timesteps t.

    'plain' is 1 everywhere (DDPM eq. 14). 'min_snr' is min(SNR, γ) on the x0 error, converted
    to the given prediction type (module docstring). The ε weight min(SNR, γ)/SNR is written
    min(1, γ/SNR) so that SNR = 0 (zero terminal SNR) gives its limit, 1.
    Returned on the backend of ``t``, float64.
    """
    check_prediction_type(prediction_type)
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; valid weightings: {', '.join(LOSS_WEIGHTINGS)}")
    ab = schedule.alphas_cumprod[to_numpy(t)]
    if weighting == "plain":
        weights = np.ones_like(ab)
    else:
        snr = ab / (1 - ab)
        with np.errstate(divide="ignore"):
            weights = {
                "sample": np.minimum(snr, gamma),
                "epsilon": np.minimum(1.0, gamma / snr),
                "v": np.minimum(snr, gamma) / (snr + 1),
            }[prediction_type]
    return to_device(weights, backend_of(t))


# ---------------------------------------------------------------------------------------------
# Per-sample randomness
# ---------------------------------------------------------------------------------------------


def per_sample_generators(rng, batch_size: int) -> list[np.random.Generator]:
    """One NumPy Generator per batch element, from any of the accepted ``rng`` forms.

    None                   fresh, unseeded generators (not reproducible)
    int seed s             ``default_rng(s + i)`` for element i: a batch equals separate runs
    a Generator            that one generator for every element: the batch draws from one
                           stream in order (reproducible, but depends on the batch size)
    a sequence of B        used as given, one per element
    Generators

    To make a whole sample reproducible from one seed, make the generators once, draw the
    initial noise from them, and pass the same list to the sampler: passing the bare seed to a
    sampler again would restart the streams and reuse the initial noise as step noise.
    """
    if rng is None:
        return [make_rng() for _ in range(batch_size)]
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"seed must be >= 0; got {rng}")
        return [make_rng(int(rng) + i) for i in range(batch_size)]
    if isinstance(rng, np.random.Generator):
        return [rng] * batch_size
    if isinstance(rng, Sequence) and all(isinstance(g, np.random.Generator) for g in rng):
        if len(rng) != batch_size:
            raise ValueError(f"got {len(rng)} generators for a batch of {batch_size}")
        return list(rng)
    raise TypeError(
        "rng must be None, an int seed, a numpy.random.Generator or a sequence of Generators "
        f"(one per batch element); got {type(rng).__name__}"
    )


def randn_per_sample(generators: Sequence[np.random.Generator], shape, *, dtype=DEFAULT_DTYPE, backend=None):
    """Standard normal noise of ``shape`` = (B, …): element i drawn by ``generators[i]`` on the CPU.

    Each element is drawn exactly as ``tinydiff.backend.randn(generators[i], shape[1:])`` would
    (float64 draws, then cast), then the batch is moved to ``backend`` in one transfer.
    """
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
    noise = np.stack([g.standard_normal(tuple(shape[1:])) for g in generators])  # (B, …)
    return to_device(noise.astype(dtype), backend)
