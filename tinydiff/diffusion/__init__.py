"""The diffusion machinery: no neural network inside, only the maths around one.

    schedules   β/ᾱ/σ of a training schedule, σ ↔ t, the σ sequences samplers walk down
    noise       forward process q(x_t | x0), posterior, ε/v/x0 conversions, loss weights, seeds
    denoiser    network → D(x, σ) ≈ E[x0 | x]: VP↔VE preconditioning and classifier-free guidance
    config      DiffusionConfig: schedule, T and prediction type, recorded with a trained model
    samplers    Euler, Heun, DPM-Solver++ 2M, DDIM, DDPM, Euler ancestral, LCM: D → sample

A sampling loop in four lines:

    schedule = make_schedule("scaled_linear")
    denoiser = Denoiser(model, schedule, "epsilon", context=c, uncond_context=u, guidance_scale=5.0)
    sigmas = get_sigmas(schedule, 20, "karras")
    gens = per_sample_generators(seed, batch)
    x0 = get_sampler("dpmpp_2m")(denoiser, randn_per_sample(gens, shape) * sigmas[0], sigmas, rng=gens)
"""

from .config import DiffusionConfig
from .denoiser import Denoiser, rescale_guidance
from .noise import (
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    alphas_cumprod_at,
    append_dims,
    convert_prediction,
    loss_weights,
    per_sample_generators,
    predicted_noise,
    predicted_x0,
    prediction_target,
    q_posterior_mean_variance,
    q_sample,
    randn_per_sample,
)
from .samplers import (
    SAMPLERS,
    ancestral_step,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    to_d,
    validate_sigmas,
)
from .schedules import (
    SCHEDULES,
    SPACINGS,
    NoiseSchedule,
    get_sigmas,
    karras_sigmas,
    make_schedule,
    sigma_to_t,
    spaced_timesteps,
    t_to_sigma,
    timestep_sigmas,
)

__all__ = [
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "Denoiser",
    "DiffusionConfig",
    "NoiseSchedule",
    "alphas_cumprod_at",
    "ancestral_step",
    "append_dims",
    "convert_prediction",
    "get_sampler",
    "get_sigmas",
    "karras_sigmas",
    "loss_weights",
    "make_schedule",
    "per_sample_generators",
    "predicted_noise",
    "predicted_x0",
    "prediction_target",
    "q_posterior_mean_variance",
    "q_sample",
    "randn_per_sample",
    "rescale_guidance",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sigma_to_t",
    "spaced_timesteps",
    "t_to_sigma",
    "timestep_sigmas",
    "to_d",
    "validate_sigmas",
]
