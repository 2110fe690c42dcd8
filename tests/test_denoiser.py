"""The VP-network → D(x, σ) wrapper and classifier-free guidance, against closed-form denoisers.

The "network" below is exact: for data from a Gaussian mixture it returns the ideal ε, v or x0
prediction for its VP input at timestep t. Wrapped by `Denoiser`, it must give back the mixture's
closed-form E[x0 | x] at σ, which checks c_in, σ → t and every output → x0 conversion at once.
"""

import dataclasses

import numpy as np
import pytest
from mixture import GaussianMixture

from tinydiff.backend import backend_of, to_device, to_numpy
from tinydiff.diffusion import (
    PREDICTION_TYPES,
    Denoiser,
    append_dims,
    make_schedule,
    prediction_target,
    rescale_guidance,
    sigma_to_t,
    t_to_sigma,
)

SCHEDULE = make_schedule("scaled_linear", 1000)
SHAPE = (3, 1, 4, 4)  # (B, C, H, W)
_rng = np.random.default_rng(0)
# One data distribution per context label: 0 = unconditional, 1 = the prompt, 2 = a negative prompt.
MIXTURES = {
    label: GaussianMixture([0.4, 0.6], _rng.normal(size=(2,) + SHAPE[1:]), [0.3, 0.5]) for label in range(3)
}
UNCOND, COND, NEGATIVE = (np.full((SHAPE[0], 1, 1), label, dtype=np.float64) for label in range(3))


def ideal_network(prediction_type):
    """model(x_in, t, context): the exact VP prediction for the mixture named by the context label."""

    def model(x_in, t, context):
        backend, dtype = backend_of(x_in), x_in.dtype
        x_in, t = to_numpy(x_in).astype(np.float64), to_numpy(t).astype(np.float64)
        sigma = t_to_sigma(SCHEDULE, t)  # (B,)
        alpha_bar = append_dims(1 / (1 + sigma**2), 4)  # (B, 1, 1, 1)
        x = x_in / np.sqrt(alpha_bar)  # VP → VE
        labels = np.zeros(len(x)) if context is None else to_numpy(context)[:, 0, 0]
        x0 = np.concatenate([MIXTURES[int(k)].denoise(x[i : i + 1], sigma[i : i + 1]) for i, k in enumerate(labels)])
        noise = (x - x0) / append_dims(sigma, 4)
        return to_device(prediction_target(x0, noise, alpha_bar, prediction_type), backend, dtype=dtype)

    return model


def exact(label, x, sigma):
    return MIXTURES[label].denoise(x, sigma)


def noisy_input(sigma, seed=1):
    """x = x0 + σ ε with x0 near the prompt's mixture; sigma a float or (B,)."""
    rng = np.random.default_rng(seed)
    x0 = MIXTURES[1].means[rng.integers(0, 2, SHAPE[0])] + 0.4 * rng.standard_normal(SHAPE)
    sigma = append_dims(np.broadcast_to(np.asarray(sigma, dtype=np.float64), (SHAPE[0],)), 4)  # (B, 1, 1, 1)
    return x0 + sigma * rng.standard_normal(SHAPE)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sigma", [SCHEDULE.sigma_min, 0.1, 1.0, 5.0, SCHEDULE.sigma_max])
def test_wrapper_recovers_the_ideal_denoiser(prediction_type, sigma):
    denoiser = Denoiser(ideal_network(prediction_type), SCHEDULE, prediction_type)
    x = noisy_input(sigma)
    np.testing.assert_allclose(denoiser(x, sigma), exact(0, x, sigma), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_per_sample_sigmas_equal_separate_calls(prediction_type):
    denoiser = Denoiser(ideal_network(prediction_type), SCHEDULE, prediction_type, context=COND)
    sigmas = np.array([0.05, 0.8, 9.0])
    x = noisy_input(sigmas)
    together = denoiser(x, sigmas)
    single = Denoiser(ideal_network(prediction_type), SCHEDULE, prediction_type, context=COND[:1])
    for i in range(3):
        np.testing.assert_allclose(together[i : i + 1], single(x[i : i + 1], float(sigmas[i])), rtol=1e-12)
    np.testing.assert_allclose(together, exact(1, x, sigmas), rtol=1e-8, atol=1e-8)


def test_network_sees_scaled_input_and_continuous_timesteps():
    calls = []
    denoiser = Denoiser(ideal_network("epsilon"), SCHEDULE, on_model_call=calls.append)
    x = noisy_input(2.0)
    denoiser(x, 2.0)
    (call,) = calls
    np.testing.assert_allclose(call["x_in"], x / np.sqrt(1 + 2.0**2), rtol=1e-14)  # c_in = 1/√(1+σ²)
    assert call["t"].shape == (3,) and call["t"].dtype == x.dtype
    np.testing.assert_allclose(call["t"], sigma_to_t(SCHEDULE, 2.0), rtol=1e-14)
    assert call["t"][0] != np.round(call["t"][0])  # not rounded to an integer timestep
    assert call["context"] is None and call["output"].shape == SHAPE


def test_float32_input_gives_float32_output():
    denoiser = Denoiser(ideal_network("v"), SCHEDULE, "v")
    x = noisy_input(1.0).astype(np.float32)
    out = denoiser(x, 1.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, exact(0, x.astype(np.float64), 1.0), rtol=1e-4, atol=1e-4)


# --- classifier-free guidance -----------------------------------------------------------------


def guided(prediction_type, scale, calls=None, **options):
    return Denoiser(
        ideal_network(prediction_type),
        SCHEDULE,
        prediction_type,
        context=COND,
        uncond_context=options.pop("uncond_context", UNCOND),
        guidance_scale=scale,
        on_model_call=None if calls is None else calls.append,
        **options,
    )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(prediction_type):
    x = noisy_input(1.5)
    calls = []
    np.testing.assert_allclose(guided(prediction_type, 1.0, calls)(x, 1.5), exact(1, x, 1.5), rtol=1e-8, atol=1e-8)
    assert [c["x_in"].shape[0] for c in calls] == [3]  # scale 1 skips the unconditional pass
    np.testing.assert_allclose(guided(prediction_type, 0.0)(x, 1.5), exact(0, x, 1.5), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_guidance_is_one_batched_call_combined_on_x0(prediction_type):
    sigma, scale = 3.0, 4.5
    x = noisy_input(sigma)
    calls = []
    out = guided(prediction_type, scale, calls)(x, sigma)
    (call,) = calls  # ONE model call ...
    assert call["x_in"].shape == (6,) + SHAPE[1:]  # ... on 2B samples,
    np.testing.assert_array_equal(call["context"][:, 0, 0], [0, 0, 0, 1, 1, 1])  # unconditional half first
    x0_uncond, x0_cond = exact(0, x, sigma), exact(1, x, sigma)
    np.testing.assert_allclose(out, x0_uncond + scale * (x0_cond - x0_uncond), rtol=1e-8, atol=1e-8)


def test_guidance_on_x0_equals_guidance_on_the_network_output():
    """D is affine in the network output F, so guiding x̂0 or guiding ε (or v) gives the same x̂0."""
    sigma, scale = 0.7, 3.0
    x = noisy_input(sigma)
    alpha_bar = 1 / (1 + sigma**2)
    for prediction_type in ("epsilon", "v"):
        outputs = [
            prediction_target(exact(k, x, sigma), (x - exact(k, x, sigma)) / sigma, alpha_bar, prediction_type)
            for k in (0, 1)
        ]
        guided_output = outputs[0] + scale * (outputs[1] - outputs[0])
        wrapper = Denoiser(lambda *_: guided_output, SCHEDULE, prediction_type)  # a network that outputs F_cfg
        np.testing.assert_allclose(wrapper(x, sigma), guided(prediction_type, scale)(x, sigma), rtol=1e-8, atol=1e-8)


def test_negative_prompt_replaces_the_unconditional_context():
    sigma, scale = 1.0, 2.0
    x = noisy_input(sigma)
    out = guided("epsilon", scale, uncond_context=NEGATIVE)(x, sigma)
    x0_negative, x0_cond = exact(2, x, sigma), exact(1, x, sigma)
    np.testing.assert_allclose(out, x0_negative + scale * (x0_cond - x0_negative), rtol=1e-8, atol=1e-8)


def test_guidance_rescale_matches_the_std_of_the_conditional_estimate():
    sigma, scale = 2.0, 7.5
    x = noisy_input(sigma)
    plain = guided("v", scale)(x, sigma)
    full = guided("v", scale, guidance_rescale=1.0)(x, sigma)
    x0_cond = exact(1, x, sigma)
    np.testing.assert_allclose(full.std(axis=(1, 2, 3)), x0_cond.std(axis=(1, 2, 3)), rtol=1e-8)
    ratio = x0_cond.std(axis=(1, 2, 3)) / plain.std(axis=(1, 2, 3))  # (B,): one factor per sample
    np.testing.assert_allclose(full, append_dims(ratio, 4) * plain, rtol=1e-8)
    half = guided("v", scale, guidance_rescale=0.5)(x, sigma)
    np.testing.assert_allclose(half, (plain + full) / 2, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(rescale_guidance(plain, x0_cond, 0.0), plain)


def test_context_of_batch_one_is_repeated():
    x = noisy_input(1.0)
    out = guided("epsilon", 2.0, uncond_context=UNCOND[:1])(x, 1.0)
    np.testing.assert_allclose(out, guided("epsilon", 2.0)(x, 1.0), rtol=1e-12)


def test_denoiser_errors_are_clear():
    model = ideal_network("epsilon")
    with pytest.raises(ValueError, match="uncond_context"):
        Denoiser(model, SCHEDULE, context=COND, guidance_scale=3.0)
    with pytest.raises(ValueError, match="epsilon, v, sample"):
        Denoiser(model, SCHEDULE, "eps")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Denoiser(model, SCHEDULE, guidance_rescale=1.5)
    with pytest.raises(ValueError, match="batch 2, expected 3 or 1"):
        Denoiser(model, SCHEDULE, context=COND[:2])(noisy_input(1.0), 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        Denoiser(model, SCHEDULE)(noisy_input(1.0), 100.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Denoiser(model, SCHEDULE).guidance_scale = 2.0


def test_denoiser_runs_on_every_backend(backends):
    denoiser = guided("v", 3.0)
    contexts = {"context": to_device(COND, backends), "uncond_context": to_device(UNCOND, backends)}
    x = noisy_input(1.0)
    out = dataclasses.replace(denoiser, **contexts)(to_device(x, backends), 1.0)
    assert backend_of(out) == backends
    np.testing.assert_allclose(to_numpy(out), denoiser(x, 1.0), rtol=1e-10)
