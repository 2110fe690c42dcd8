"""Samplers against closed forms: the exact ODE solution for Gaussian data, the data distribution
for a Gaussian mixture, DDPM's Algorithm 2, and the known traps of sampler implementations."""

import math

import numpy as np
import pytest
from mixture import GaussianMixture, gaussian, gaussian_ode_solution

from tinydiff.backend import backend_of, to_device, to_numpy
from tinydiff.diffusion import (
    SAMPLERS,
    Denoiser,
    append_dims,
    get_sampler,
    karras_sigmas,
    make_schedule,
    per_sample_generators,
    randn_per_sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    timestep_sigmas,
)

MU, S = 0.3, 0.5  # Gaussian data N(μ, s²), every element independent
GAUSSIAN = gaussian(MU, S)
MIXTURE = GaussianMixture([0.3, 0.7], [-1.0, 1.0], [0.25, 0.4])  # bimodal, elementwise
STOCHASTIC = ["euler_ancestral", "ddpm", "lcm", "ddim_eta1"]


def run(name, denoiser, x, sigmas, **kwargs):
    """Call a sampler by name; 'ddim_eta1' is DDIM with η = 1."""
    if name == "ddim_eta1":
        return sample_ddim(denoiser, x, sigmas, eta=1.0, **kwargs)
    return get_sampler(name)(denoiser, x, sigmas, **kwargs)


def gaussian_denoiser(x, sigma):
    """Exact D for N(μ, s²) data on either backend (the closed form is computed with NumPy)."""
    return to_device(GAUSSIAN.denoise(to_numpy(x), sigma), backend_of(x))


def mixture_denoiser(x, sigma):
    return MIXTURE.denoise(x, sigma)


# --- convergence to the exact probability-flow ODE solution -----------------------------------

SIGMA_MIN, SIGMA_MAX = 0.002, 20.0
X_START = MU + np.linspace(-3, 3, 32).reshape(32, 1) * math.sqrt(S**2 + SIGMA_MAX**2)  # (B, 1) points at σ_max


def ode_error(name, n):
    """RMS distance between a sampler's output and the exact ODE solution x(0) after n Karras steps."""
    out = get_sampler(name)(gaussian_denoiser, X_START.copy(), karras_sigmas(n, SIGMA_MIN, SIGMA_MAX))
    exact = gaussian_ode_solution(X_START, SIGMA_MAX, 0.0, MU, S)
    return float(np.sqrt(np.mean((out - exact) ** 2)))


@pytest.mark.parametrize(
    "name, low, high", [("euler", 0.8, 1.3), ("ddim", 0.8, 1.3), ("heun", 1.7, 2.6), ("dpmpp_2m", 1.7, 2.6)]
)
def test_deterministic_samplers_converge_with_their_order(name, low, high):
    steps = np.array([16, 32, 64, 128])
    errors = np.array([ode_error(name, n) for n in steps])
    assert np.all(np.diff(errors) < 0)
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]  # error ∝ n^(−order)
    assert low <= order <= high, (name, order, errors)


def test_ddim_eta0_is_euler_in_sigma_space():
    sigmas = karras_sigmas(12, 0.01, 10.0)
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 3)) * 10.0
    euler = sample_euler(mixture_denoiser, x, sigmas)
    np.testing.assert_allclose(sample_ddim(mixture_denoiser, x, sigmas), euler, rtol=1e-12, atol=1e-12)
    ancestral = sample_euler_ancestral(mixture_denoiser, x, sigmas, eta=0.0)
    np.testing.assert_allclose(ancestral, euler, rtol=1e-12, atol=1e-12)


def test_ddim_eta1_ddpm_and_euler_ancestral_are_the_same_sampler():
    sigmas = karras_sigmas(12, 0.01, 10.0)
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 3)) * 10.0
    outs = [run(name, mixture_denoiser, x, sigmas, rng=5) for name in ("ddim_eta1", "ddpm", "euler_ancestral")]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(outs[2], outs[1], rtol=1e-10, atol=1e-12)


def test_ddpm_over_all_training_sigmas_is_ho_algorithm_2():
    """Over the T training σ, sample_ddpm through the Denoiser equals Algorithm 2 run in VP form."""
    schedule = make_schedule("linear", 1000)
    shape = (2, 1, 3, 3)

    def eps_network(x_vp, t, context):  # the exact ε-prediction for N(μ, s²) data at integer t
        index = np.round(t).astype(int)
        np.testing.assert_allclose(t, index, atol=1e-9)  # table σ map back to integer timesteps
        alpha_bar = append_dims(schedule.alphas_cumprod[index], 4)
        sigma = np.sqrt((1 - alpha_bar) / alpha_bar)
        x = x_vp / np.sqrt(alpha_bar)
        return (x - GAUSSIAN.denoise(x, sigma[:, 0, 0, 0])) / sigma

    # Algorithm 2: x_T ~ N(0, I); x_{t−1} = (x_t − β_t/√(1−ᾱ_t) ε_θ)/√α_t + √β̃_t z, no z at the end.
    generators = per_sample_generators(3, 2)
    x_vp = randn_per_sample(generators, shape, dtype=np.float64)
    x_start_ve = x_vp / math.sqrt(schedule.alphas_cumprod[-1])  # the same point in VE coordinates
    for t in reversed(range(1000)):
        beta, ab = schedule.betas[t], schedule.alphas_cumprod[t]
        ab_prev = schedule.alphas_cumprod[t - 1] if t > 0 else 1.0
        eps = eps_network(x_vp, np.full(2, float(t)), None)
        x_vp = (x_vp - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)
        if t > 0:
            z = randn_per_sample(generators, shape, dtype=np.float64)
            x_vp = x_vp + math.sqrt((1 - ab_prev) / (1 - ab) * beta) * z  # √β̃_t z
    algorithm_2 = x_vp

    generators = per_sample_generators(3, 2)
    randn_per_sample(generators, shape, dtype=np.float64)  # advance past the initial noise, as above
    sigmas = timestep_sigmas(schedule, np.arange(1000)[::-1])
    ours = sample_ddpm(Denoiser(eps_network, schedule, "epsilon"), x_start_ve, sigmas, rng=generators)
    np.testing.assert_allclose(ours, algorithm_2, rtol=1e-7, atol=1e-9)


# --- the right distribution --------------------------------------------------------------------


def mixture_positive_fraction():
    """P(x0 > 0) = Σ π_k Φ(μ_k/s_k)."""
    components = zip(MIXTURE.weights, MIXTURE.means, MIXTURE.stds)
    return sum(w * 0.5 * (1 + math.erf(m / (s * math.sqrt(2)))) for w, m, s in components)


@pytest.mark.parametrize("name, n", [("ddpm", 1000), ("heun", 40), ("dpmpp_2m", 60)])
def test_samplers_draw_from_the_data_distribution(name, n):
    """16 384 independent elements; mean, variance and mode weight within 5 Monte-Carlo std errors.

    (Euler ancestral and DDIM η = 1 are the same sampler as DDPM, checked above. With an exact D,
    ancestral sampling has an O(1/n) variance deficit, hence 1000 steps.)
    """
    sigmas = karras_sigmas(n, 0.002, 80.0)
    generators = per_sample_generators(0, 4)
    x = randn_per_sample(generators, (4, 1, 64, 64), dtype=np.float64) * sigmas[0]
    out = get_sampler(name)(mixture_denoiser, x, sigmas, rng=generators).ravel()
    N, mean, var = out.size, out.mean(), out.var()
    p, p_true = np.mean(out > 0), mixture_positive_fraction()
    assert abs(mean - MIXTURE.mean()) < 5 * math.sqrt(var / N)
    assert abs(var - MIXTURE.variance()) < 5 * math.sqrt(np.mean((out - mean) ** 4) - var**2) / math.sqrt(N)
    assert abs(p - p_true) < 5 * math.sqrt(p_true * (1 - p_true) / N)


# --- traps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS) + ["ddim_eta1"])
def test_last_step_lands_on_the_denoised_image_with_no_noise_left(name):
    """D ignores x: every sampler must return exactly D's output (diffusers #5689 left noise)."""
    target = np.linspace(-1, 1, 8).reshape(2, 1, 2, 2)
    sigmas = karras_sigmas(5, 0.1, 10.0)
    out = run(name, lambda x, sigma: target, np.full((2, 1, 2, 2), 7.0), sigmas, rng=0)
    np.testing.assert_allclose(out, target, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_is_first_order_on_the_first_and_last_steps():
    sigmas = np.array([8.0, 2.0, 0.5, 0.0])
    x = np.random.default_rng(1).standard_normal((3, 1, 2, 2)) * 8.0
    steps = []
    out = sample_dpmpp_2m(mixture_denoiser, x, sigmas, callback=steps.append)
    first, second, last = steps
    ratio = 2.0 / 8.0  # first step: DPM-Solver++ 1 (= DDIM) x ← (σ'/σ) x + (1 − σ'/σ) D
    first_order_step = ratio * first["x"] + (1 - ratio) * first["denoised"]
    np.testing.assert_allclose(second["x"], first_order_step, rtol=1e-13)
    np.testing.assert_array_equal(out, last["denoised"])  # final step to σ = 0: x ← D
    # The middle step is second order: it differs from the first-order update.
    first_order = 0.25 * second["x"] + 0.75 * second["denoised"]
    assert not np.allclose(last["x"], first_order)


def test_callback_reports_every_step_of_a_non_uniform_sequence():
    sigmas = karras_sigmas(6, 0.05, 5.0)
    x = np.ones((2, 1, 2, 2)) * 5.0
    steps = []
    out = sample_euler(mixture_denoiser, x, sigmas, callback=steps.append)
    assert [s["i"] for s in steps] == list(range(6))
    # σ' comes from the sequence itself, never from "t − T/n" arithmetic (diffusers #9261).
    assert [(s["sigma"], s["sigma_next"]) for s in steps] == list(zip(sigmas[:-1], sigmas[1:]))
    for before, after in zip(steps, steps[1:] + [{"x": out}]):
        d = (before["x"] - before["denoised"]) / before["sigma"]
        euler_step = before["x"] + d * (before["sigma_next"] - before["sigma"])
        np.testing.assert_allclose(after["x"], euler_step, rtol=1e-13)


def test_number_of_denoiser_calls():
    sigmas = karras_sigmas(10, 0.01, 10.0)
    x = np.ones((1, 1))
    for name, expected in [("euler", 10), ("heun", 19), ("dpmpp_2m", 10), ("ddim", 10), ("ddpm", 10), ("lcm", 10)]:
        calls = []
        get_sampler(name)(lambda x, s: calls.append(s) or mixture_denoiser(x, s), x, sigmas, rng=0)
        assert len(calls) == expected, name  # Heun: two per step, one on the last (Euler) step


def test_lcm_jumps_to_x0_and_renoises_with_fresh_noise():
    sigmas = np.array([10.0, 3.0, 1.0, 0.0])
    x = np.full((2, 1, 2, 2), 10.0)
    steps = []
    out = sample_lcm(mixture_denoiser, x, sigmas, rng=4, callback=steps.append)
    generators = per_sample_generators(4, 2)
    for before, after in zip(steps, steps[1:]):
        noise = randn_per_sample(generators, x.shape, dtype=np.float64)
        np.testing.assert_allclose(after["x"], before["denoised"] + before["sigma_next"] * noise, rtol=1e-13)
    np.testing.assert_array_equal(out, steps[-1]["denoised"])
    one_step = sample_lcm(mixture_denoiser, x, np.array([10.0, 0.0]))
    np.testing.assert_array_equal(one_step, mixture_denoiser(x, 10.0))


# --- reproducibility --------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_sample_and_batch_of_four_equals_four_runs(name):
    sigmas = karras_sigmas(8, 0.01, 10.0)
    shape = (4, 1, 3, 3)

    def sample(seed, batch):
        generators = per_sample_generators(seed, batch)
        x = randn_per_sample(generators, (batch,) + shape[1:], dtype=np.float64) * sigmas[0]
        return run(name, gaussian_denoiser, x, sigmas, rng=generators)

    batch = sample(21, 4)
    np.testing.assert_array_equal(batch, sample(21, 4))
    assert not np.allclose(batch, sample(22, 4))
    singles = np.concatenate([sample(21 + i, 1) for i in range(4)])
    np.testing.assert_allclose(batch, singles, rtol=1e-13, atol=1e-13)
    # An int seed given to the sampler means the same per-sample streams.
    x = np.ones(shape) * sigmas[0]
    from_seed = run(name, gaussian_denoiser, x, sigmas, rng=21)
    np.testing.assert_array_equal(from_seed, run(name, gaussian_denoiser, x, sigmas, rng=per_sample_generators(21, 4)))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_run_on_every_backend(backends, name):
    sigmas = karras_sigmas(4, 0.01, 10.0)
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 3)) * 10.0
    sampler = get_sampler(name)
    out = sampler(gaussian_denoiser, to_device(x, backends), sigmas, rng=8)
    assert backend_of(out) == backends and out.shape == x.shape
    # Same seed, same numbers: the noise is drawn on the CPU whatever the backend.
    np.testing.assert_allclose(to_numpy(out), sampler(gaussian_denoiser, x, sigmas, rng=8), rtol=1e-10, atol=1e-12)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([2.0, 1.0, 1.0, 0.0], "strictly decreasing"),  # a repeated σ is a zero-length step
        ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([2.0, 1.0], "end with 0"),
        ([np.inf, 1.0, 0.0], "finite"),
        ([np.nan, 0.0], "finite"),
        ([[1.0, 0.0]], "1-D"),
        ([0.0], "at least 2"),
    ],
)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_bad_sigmas_are_clear_errors(name, sigmas, message):
    with pytest.raises(ValueError, match=message):
        get_sampler(name)(gaussian_denoiser, np.ones((1, 1)), np.array(sigmas), rng=0)


def test_unknown_sampler_and_bad_options():
    with pytest.raises(ValueError, match="euler, euler_ancestral, heun, dpmpp_2m, ddim, ddpm, lcm"):
        get_sampler("dpm++")
    with pytest.raises(ValueError, match="eta"):
        sample_euler_ancestral(gaussian_denoiser, np.ones((1, 1)), np.array([1.0, 0.0]), eta=-1.0)
    with pytest.raises(TypeError):
        sample_heun(gaussian_denoiser, np.ones((1, 1)), np.array([1.0, 0.0]), eta=1.0)


# --- one step pinned to the paper's formula on a non-uniform grid --------------------------------


def reference_dpmpp_2m(denoiser, x, sigmas):
    """DPM-Solver++ 2M (Lu et al. 2022, Algorithm 2) written from the paper in λ = −log σ, VE form:

        h_i = λ_{i+1} − λ_i,   r_i = h_{i−1}/h_i
        D̃_i = (1 + 1/(2 r_i))·D_i − (1/(2 r_i))·D_{i−1}     (D̃_0 = D_0: the first step is first order)
        x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h_i} − 1)·D̃_i

    and the final step to σ = 0 (λ = ∞, e^{−h} = 0) is x ← D. Returns every x_i, i = 0 … n."""
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    xs, denoised = [x], []
    for i in range(len(sigmas) - 1):
        denoised.append(denoiser(xs[i], sigmas[i]))
        if sigmas[i + 1] == 0:
            xs.append(denoised[i])
            continue
        h = lambdas[i + 1] - lambdas[i]
        if i == 0:
            mix = denoised[0]
        else:
            r = (lambdas[i] - lambdas[i - 1]) / h
            mix = (1 + 1 / (2 * r)) * denoised[i] - 1 / (2 * r) * denoised[i - 1]
        xs.append(sigmas[i + 1] / sigmas[i] * xs[i] - (math.exp(-h) - 1) * mix)
    return xs


def test_dpmpp_2m_multistep_matches_the_paper_on_a_non_uniform_grid():
    """Step sizes in λ of 0.92, 1.79, 0.69, 1.39 (r far from 1) and a denoiser whose output moves
    with σ, so that D_i ≠ D_{i−1} and the ratio r = h_{i−1}/h_i matters (r → 1/r would be wrong)."""
    sigmas = np.array([10.0, 4.0, 0.667, 0.333, 0.083, 0.0])
    h = -np.diff(np.log(sigmas[:-1]))
    assert np.all(np.abs(h[:-1] / h[1:] - 1) > 0.4)  # every multistep ratio far from 1
    x = np.random.default_rng(7).standard_normal((3, 1, 2, 2)) * 10.0
    steps = []
    out = sample_dpmpp_2m(mixture_denoiser, x, sigmas, callback=steps.append)
    reference = reference_dpmpp_2m(mixture_denoiser, x, sigmas)
    for i, step in enumerate(steps):
        np.testing.assert_allclose(step["x"], reference[i], rtol=1e-12, atol=1e-12, err_msg=f"x_{i}")
    np.testing.assert_allclose(out, reference[-1], rtol=1e-12, atol=1e-12)
    # the multistep correction is not negligible here: a first-order step lands elsewhere
    step = steps[2]
    ratio = step["sigma_next"] / step["sigma"]
    first_order = ratio * step["x"] + (1 - ratio) * step["denoised"]
    assert np.max(np.abs(steps[3]["x"] - first_order)) > 1e-2


@pytest.mark.parametrize("name", ["ddim", "euler_ancestral"])
def test_ddim_step_with_eta_between_0_and_1_has_the_closed_form_mean_and_variance(name):
    """DDIM eq. 12 with eq. 16 at η = 0.5, written in VP terms and mapped to VE (x = x_VP/√ᾱ):

        x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ_η²)·ε̂ + σ_η·z,   σ_η = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)

    with ᾱ = 1/(1 + σ²) and ε̂ = (x − x̂0)/σ. The step's noise z is drawn again from the same seeds,
    and the coefficients on x̂0, ε̂ and z are read back by least squares: the z coefficient squared
    is the step's variance σ_η²/ᾱ_s, the ε̂ one the deterministic direction √(1 − ᾱ_s − σ_η²)/√ᾱ_s.
    (Euler ancestral with η is the same step.)"""
    eta, sigma, sigma_next = 0.5, 3.0, 1.2
    sigmas = np.array([sigma, sigma_next, 0.0])
    x = np.random.default_rng(8).standard_normal((2, 1, 8, 8)) * sigma
    steps = []
    get_sampler(name)(mixture_denoiser, x, sigmas, rng=11, eta=eta, callback=steps.append)
    x_next, denoised = steps[1]["x"], steps[0]["denoised"]
    eps = (x - denoised) / sigma  # ε̂
    z = randn_per_sample(per_sample_generators(11, 2), x.shape, dtype=np.float64)  # the step's fresh noise

    ab_t, ab_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # ᾱ_t, ᾱ_s
    sigma_eta = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)  # eq. 16
    expected = np.array([1.0, math.sqrt(1 - ab_s - sigma_eta**2) / math.sqrt(ab_s), sigma_eta / math.sqrt(ab_s)])

    basis = np.stack([denoised.ravel(), eps.ravel(), z.ravel()], axis=1)  # (pixels, 3)
    coefficients, *_ = np.linalg.lstsq(basis, x_next.ravel(), rcond=None)
    np.testing.assert_allclose(basis @ coefficients, x_next.ravel(), rtol=0, atol=1e-12)  # exactly this form
    np.testing.assert_allclose(coefficients, expected, rtol=1e-10)
    assert 0.1 < expected[2] < expected[1]  # both the noise and the direction terms are present
