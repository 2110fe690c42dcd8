"""Training schedules, σ ↔ t conversions and sampling σ sequences, against closed forms and traps."""

import dataclasses

import numpy as np
import pytest

from tinydiff.diffusion import (
    SCHEDULES,
    NoiseSchedule,
    get_sigmas,
    karras_sigmas,
    make_schedule,
    sigma_to_t,
    spaced_timesteps,
    t_to_sigma,
    validate_sigmas,
)
from tinydiff.diffusion.schedules import cosine_betas

T = 1000


# --- β schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_alphas_cumprod_is_a_decreasing_product_of_one_minus_beta(name, zero_terminal_snr):
    s = make_schedule(name, T, zero_terminal_snr=zero_terminal_snr)
    assert s.betas.shape == s.alphas_cumprod.shape == (T,)
    assert s.betas.dtype == np.float64
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=1e-12, atol=0)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert np.all(np.diff(s.sigmas) > 0)


def test_linear_schedule_end_values():
    s = make_schedule("linear", T)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(s.betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
    assert s.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)  # DDPM: σ_max ≈ 157
    assert s.sigma_max == pytest.approx(157.41, rel=1e-4)


def test_scaled_linear_is_linear_in_sqrt_beta_not_in_beta():
    s = make_schedule("scaled_linear", T)
    assert s.betas[0] == pytest.approx(0.00085) and s.betas[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(s.betas)), (0.012**0.5 - 0.00085**0.5) / (T - 1), rtol=1e-9)
    assert not np.allclose(np.diff(s.betas), np.diff(s.betas)[0])  # the LDM "linear" naming trap
    assert s.sigma_min == pytest.approx(0.029167, rel=1e-4)  # Stable Diffusion's σ range
    assert s.sigma_max == pytest.approx(14.6146, rel=1e-4)


def test_cosine_schedule_matches_eq_17_and_clips_beta():
    s = make_schedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    unclipped = s.betas < 0.999
    np.testing.assert_allclose(s.alphas_cumprod[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-10)
    assert s.betas.max() == 0.999  # only the last step hits the clip
    assert s.alphas_cumprod[-1] == pytest.approx(2.4e-9, rel=0.02)  # σ_max ≈ 2·10⁴: the cosine trap
    assert s.sigma_max > 1e4
    assert np.all(cosine_betas(10) <= 0.999)


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_gives_exactly_zero_and_keeps_the_first_value(name):
    plain, zero = make_schedule(name, T), make_schedule(name, T, zero_terminal_snr=True)
    assert zero.alphas_cumprod[-1] == 0.0
    assert zero.betas[-1] == 1.0
    assert zero.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-12)
    assert zero.log_snr[-1] == -np.inf
    # σ_{T−1} = ∞ gets a finite stand-in, log σ extrapolated linearly; every other σ is exact.
    log_sigmas = np.log(zero.sigmas)
    assert log_sigmas[-1] - log_sigmas[-2] == pytest.approx(log_sigmas[-2] - log_sigmas[-3], rel=1e-12)
    np.testing.assert_allclose(zero.log_snr[:-1], -2 * np.log(zero.sigmas[:-1]), rtol=1e-10)
    # Lin et al. Alg. 1 is an affine map of √ᾱ.
    sqrt_plain, sqrt_zero = np.sqrt(plain.alphas_cumprod), np.sqrt(zero.alphas_cumprod)
    expected = (sqrt_plain - sqrt_plain[-1]) * sqrt_plain[0] / (sqrt_plain[0] - sqrt_plain[-1])
    np.testing.assert_allclose(sqrt_zero, expected, rtol=1e-9, atol=1e-15)


def test_log_snr_and_sigma_agree():
    s = make_schedule("linear", T)
    np.testing.assert_allclose(s.log_snr, -2 * np.log(s.sigmas), rtol=1e-12)
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - s.alphas_cumprod) / s.alphas_cumprod), rtol=1e-14)


def test_schedule_is_frozen_and_read_only():
    s = make_schedule("linear", 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.betas = np.ones(10)
    with pytest.raises(ValueError):
        s.betas[0] = 0.5
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule.from_betas([0.1, 0.0])
    with pytest.raises(ValueError, match="only the last may be 0"):
        NoiseSchedule.from_betas([0.1, 1.0, 0.5])


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        make_schedule("linear", 0)


# --- σ ↔ t ------------------------------------------------------------------------------------


def test_sigma_t_round_trip_and_log_interpolation():
    s = make_schedule("scaled_linear", T)
    t = np.array([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0])
    np.testing.assert_allclose(sigma_to_t(s, t_to_sigma(s, t)), t, atol=1e-9)
    np.testing.assert_allclose(t_to_sigma(s, np.arange(T)), s.sigmas, rtol=1e-13)  # integers: the table
    # Half way between two timesteps: the geometric mean of their σ (linear in log σ).
    assert t_to_sigma(s, 10.5) == pytest.approx(np.sqrt(s.sigmas[10] * s.sigmas[11]), rel=1e-13)


def test_sigma_to_t_edges_are_explicit():
    s = make_schedule("linear", T)
    assert sigma_to_t(s, 0.0) == 0.0  # σ = 0 and anything below σ_min map to the first timestep
    assert sigma_to_t(s, s.sigma_min / 2) == 0.0
    assert sigma_to_t(s, s.sigma_max) == T - 1
    assert sigma_to_t(s, s.sigma_max * (1 + 1e-12)) == T - 1  # rounding of a karras σ_0 is fine
    with pytest.raises(ValueError, match="exceeds the schedule's largest sigma"):
        sigma_to_t(s, s.sigma_max * 1.01)
    with pytest.raises(ValueError, match=">= 0"):
        sigma_to_t(s, -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        sigma_to_t(s, np.nan)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        t_to_sigma(s, 999.5)


def test_karras_sigmas_have_no_rounded_duplicates():
    # Continuous t (no rounding to integers) keeps every step distinct (diffusers #4122).
    s = make_schedule("scaled_linear", T)
    sigmas = get_sigmas(s, 200, "karras")
    t = sigma_to_t(s, sigmas[:-1])
    assert np.all(np.diff(t) < 0)


# --- sampling σ sequences --------------------------------------------------------------------


def test_karras_sigmas_formula_and_ends():
    sigmas = karras_sigmas(5, 0.002, 80.0, rho=7.0)
    i = np.arange(5)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM eq. 5
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-14)
    assert sigmas.shape == (6,) and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0, rel=1e-14) and sigmas[-2] == pytest.approx(0.002, rel=1e-14)
    np.testing.assert_array_equal(karras_sigmas(1, 0.002, 80.0), [80.0, 0.0])  # one step: σ_max → 0


@pytest.mark.parametrize(
    "spacing, offset, first, last",
    [
        ("leading", 0, 980, 0),  # never reaches T − 1 = 999 (diffusers #2585)
        ("leading", 1, 981, 1),  # Stable Diffusion's steps_offset = 1
        ("trailing", 0, 999, 19),  # Lin et al. §3.3: starts at the last timestep
        ("linspace", 0, 999, 0),
    ],
)
def test_spacing_first_and_last_timestep(spacing, offset, first, last):
    timesteps = spaced_timesteps(T, 50, spacing, offset)
    assert timesteps[0] == first and timesteps[-1] == last and len(timesteps) == 50
    s = make_schedule("scaled_linear", T)
    sigmas = get_sigmas(s, 50, spacing, steps_offset=offset)
    np.testing.assert_array_equal(sigmas, np.append(s.sigmas[timesteps], 0.0))


def test_trailing_matches_diffusers_definition():
    np.testing.assert_array_equal(spaced_timesteps(T, 3, "trailing"), [999, 666, 332])
    for n in (7, 30, 333):
        diffusers = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        np.testing.assert_array_equal(spaced_timesteps(T, n, "trailing"), diffusers)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacings_never_repeat_a_timestep(spacing):
    for n in list(range(1, 60)) + [99, 101, 250, 333, 499, 500, 501, 666, 999, 1000]:
        timesteps = spaced_timesteps(T, n, spacing)
        assert len(timesteps) == n
        assert np.all(np.diff(timesteps) < 0), (spacing, n)  # diffusers #4122
        assert 0 <= timesteps[-1] and timesteps[0] <= T - 1


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_all_training_steps_stay_inside_the_schedule(spacing):
    np.testing.assert_array_equal(spaced_timesteps(T, T, spacing), np.arange(T)[::-1])
    sigmas = get_sigmas(make_schedule("linear", T), T, spacing)
    assert len(sigmas) == T + 1


def test_offset_past_the_schedule_is_an_error():
    with pytest.raises(ValueError, match="outside"):  # diffusers #10003: t = 1000 does not exist
        spaced_timesteps(T, T, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="leading"):
        spaced_timesteps(T, 10, "trailing", steps_offset=1)


@pytest.mark.parametrize("spacing", ["karras", "leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_sequence_is_a_valid_sampler_input(spacing, name):
    for zero_terminal_snr in (False, True):
        s = make_schedule(name, T, zero_terminal_snr=zero_terminal_snr)
        for n in (1, 2, 10, 50):
            sigmas = get_sigmas(s, n, spacing)
            assert len(sigmas) == n + 1 and sigmas[-1] == 0
            validate_sigmas(sigmas)
            sigma_to_t(s, sigmas)  # in range for the schedule's own denoiser


def test_get_sigmas_errors_are_clear():
    s = make_schedule("linear", T)
    with pytest.raises(ValueError, match="karras, leading, trailing, linspace"):
        get_sigmas(s, 10, "uniform")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="integer >= 1"):
            get_sigmas(s, bad)
        with pytest.raises(ValueError, match="integer >= 1"):
            get_sigmas(s, bad, "trailing")
    with pytest.raises(ValueError, match="at most 1000"):
        get_sigmas(s, 1001, "linspace")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(10, 1.0, 0.5)


@pytest.mark.parametrize("spacing", ["karras", "leading", "trailing", "linspace"])
def test_sigma_max_caps_where_sampling_starts(spacing):
    schedule = make_schedule("linear")
    sigmas = get_sigmas(schedule, 20, spacing, sigma_max=14.6)
    assert sigmas[0] <= 14.6 * (1 + 1e-9) and sigmas[-1] == 0
    assert np.all(np.diff(sigmas) < 0) and len(sigmas) == 21
    if spacing == "karras":
        assert sigmas[0] == pytest.approx(14.6)
    elif spacing in ("trailing", "linspace"):  # they start at the largest training σ not above the cap
        assert sigmas[0] == schedule.sigmas[schedule.sigmas <= 14.6].max()
    assert np.array_equal(get_sigmas(schedule, 20, spacing, sigma_max=1e6), get_sigmas(schedule, 20, spacing))


def test_sigma_max_below_the_schedule_is_a_clear_error():
    schedule = make_schedule("linear")
    with pytest.raises(ValueError, match="must exceed the schedule's smallest sigma"):
        get_sigmas(schedule, 10, "karras", sigma_max=schedule.sigma_min / 2)
