"""The consistency parameterisation (LCM eq. 9 on tinydiff's σ), its boundary, and the LCM sampler."""

import numpy as np
import pytest

from tinydiff.diffusion import make_schedule, per_sample_generators, predicted_x0, randn_per_sample
from tinydiff.diffusion.consistency import ConsistencyFunction, consistency_scalings, x0_output_coefficient
from tinydiff.diffusion.samplers import ddim_step, sample_ddim, sample_lcm
from tinydiff.diffusion.schedules import t_to_sigma

SCHEDULE = make_schedule("linear", 1000)


def paper_scalings(t):
    """Luo et al. 2023 (LCM), eq. 9 with the released code's constants: σ_data = 0.5, u = 10·t."""
    u = 10.0 * np.asarray(t, dtype=np.float64)
    return 0.25 / (u**2 + 0.25), u / np.sqrt(u**2 + 0.25)


# Integer timesteps where both terms are alive (t = 1: c_skip = 0.0025), one far out, and
# fractional ones between grid points where c_skip is large (t = 0.05: c_skip = 0.5).
@pytest.mark.parametrize("t", [0.02, 0.05, 0.3, 1.0, 3.0, 47.0, 512.0])
def test_scalings_are_the_papers_formula_at_the_timestep_of_sigma(t):
    sigma = t_to_sigma(SCHEDULE, t)
    c_skip, c_out = consistency_scalings(SCHEDULE, sigma)
    expected_skip, expected_out = paper_scalings(t)
    np.testing.assert_allclose(c_skip, expected_skip, rtol=1e-9)
    np.testing.assert_allclose(c_out, expected_out, rtol=1e-9)


def test_scalings_per_sample_and_at_the_boundary():
    sigmas = np.array([SCHEDULE.sigma_min, SCHEDULE.sigmas[1], SCHEDULE.sigmas[20], 0.0])
    c_skip, c_out = consistency_scalings(SCHEDULE, sigmas)
    np.testing.assert_allclose(c_skip[1:3], paper_scalings([1, 20])[0], rtol=1e-9)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # σ_min ↔ t = 0: exactly the boundary
    assert c_skip[3] == 1.0 and c_out[3] == 0.0  # σ = 0 (below σ_min) is the boundary too


def noisy_denoiser(x, sigma):
    """A stand-in for D(x, σ) whose output depends on both x and σ (σ float or (B,))."""
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return np.tanh(x) * 0.7 - 0.1 * np.log(sigma + 1.0)


def test_consistency_function_is_c_skip_x_plus_c_out_d_per_sample():
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 2))
    f = ConsistencyFunction(noisy_denoiser, SCHEDULE)
    sigmas = t_to_sigma(SCHEDULE, np.array([0.05, 2.0, 300.0]))
    c_skip, c_out = paper_scalings([0.05, 2.0, 300.0])
    expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * noisy_denoiser(x, sigmas)
    np.testing.assert_allclose(f(x, sigmas), expected, rtol=1e-12)


def test_boundary_condition_is_exact():
    """f(x, σ_min) = x bit for bit, whatever the network says, alone or beside other σ in a batch."""
    x = np.random.default_rng(1).standard_normal((2, 4, 3, 3))
    garbage = lambda x, sigma: x * 1e3 + 17.0  # noqa: E731
    f = ConsistencyFunction(garbage, SCHEDULE)
    np.testing.assert_array_equal(f(x, SCHEDULE.sigma_min), x)
    mixed = f(x, np.array([SCHEDULE.sigma_min, SCHEDULE.sigmas[5]]))  # the formula, not the shortcut
    np.testing.assert_array_equal(mixed[0], x[0])
    assert not np.allclose(mixed[1], x[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_x0_output_coefficient_is_the_derivative_of_the_denoisers_x0(prediction_type):
    sigma = np.array([0.3, 2.0, 9.0])
    alpha_bar = (1 / (1 + sigma**2))[:, None]
    x_t, output = np.array([[0.4], [-1.2], [2.0]]), np.array([[0.7], [0.1], [-0.5]])
    eps = 1e-6
    numeric = (predicted_x0(output + eps, x_t, alpha_bar, prediction_type)
               - predicted_x0(output - eps, x_t, alpha_bar, prediction_type)) / (2 * eps)
    np.testing.assert_allclose(x0_output_coefficient(sigma, prediction_type), numeric[:, 0], rtol=1e-7)


def test_ddim_step_is_the_samplers_step_and_takes_per_sample_sigmas():
    x = np.random.default_rng(2).standard_normal((2, 1, 2, 2)) * 5
    steps = []
    sample_ddim(noisy_denoiser, x, np.array([5.0, 1.5, 0.0]), callback=steps.append)
    denoised = noisy_denoiser(x, 5.0)
    np.testing.assert_allclose(ddim_step(x, denoised, 5.0, 1.5), steps[1]["x"], rtol=1e-14)
    np.testing.assert_allclose(steps[1]["x"], denoised + 1.5 * (x - denoised) / 5.0, rtol=1e-13)  # DDIM eq. 12
    sigma, sigma_next = np.array([5.0, 2.0])[:, None, None, None], np.array([1.5, 0.5])[:, None, None, None]
    per_sample = ddim_step(x, noisy_denoiser(x, sigma.ravel()), sigma, sigma_next)
    for i in range(2):
        alone = ddim_step(x[i:i + 1], noisy_denoiser(x[i:i + 1], sigma[i, 0, 0, 0]), sigma[i, 0, 0, 0],
                          sigma_next[i, 0, 0, 0])
        np.testing.assert_allclose(per_sample[i:i + 1], alone, rtol=1e-14)


def test_lcm_sampler_renoises_above_the_boundary_level():
    """CM Algorithm 1: x ← f(x, σ) + √(σ'² − σ_min²) z, with fresh per-sample noise z."""
    sigma_min = 0.8
    sigmas = np.array([10.0, 3.0, 1.0, 0.0])
    x = np.full((2, 1, 2, 2), 10.0)
    steps = []
    out = sample_lcm(noisy_denoiser, x, sigmas, rng=4, callback=steps.append, sigma_min=sigma_min)
    generators = per_sample_generators(4, 2)
    for before, after in zip(steps, steps[1:]):
        noise = randn_per_sample(generators, x.shape, dtype=np.float64)
        level = np.sqrt(before["sigma_next"] ** 2 - sigma_min**2)
        np.testing.assert_allclose(after["x"], before["denoised"] + level * noise, rtol=1e-13)
    np.testing.assert_array_equal(out, steps[-1]["denoised"])
