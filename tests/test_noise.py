"""Forward process, posterior, prediction types, loss weights and per-sample seeds."""

import numpy as np
import pytest

from tinydiff.backend import randn
from tinydiff.diffusion import (
    PREDICTION_TYPES,
    append_dims,
    convert_prediction,
    loss_weights,
    make_schedule,
    per_sample_generators,
    predicted_noise,
    predicted_x0,
    prediction_target,
    q_posterior_mean_variance,
    q_sample,
    randn_per_sample,
)

SCHEDULE = make_schedule("linear", 1000)


def test_append_dims():
    assert append_dims(np.zeros(3), 4).shape == (3, 1, 1, 1)
    assert append_dims(np.zeros((3, 2)), 2).shape == (3, 2)
    with pytest.raises(ValueError):
        append_dims(np.zeros((3, 2)), 1)


def test_q_sample_moments_match_eq_4():
    # Three samples with constant images x0 = c_b at t = 0, 500, 999, each 40 000 noisy pixels.
    rng = np.random.default_rng(0)
    t = np.array([0, 500, 999])
    c = np.array([1.5, -0.7, 2.0])
    x0 = np.broadcast_to(c[:, None, None, None], (3, 1, 200, 200))
    x_t = q_sample(x0, t, rng.standard_normal(x0.shape), SCHEDULE)
    ab = SCHEDULE.alphas_cumprod[t]
    n = 200 * 200
    mean, var = x_t.mean(axis=(1, 2, 3)), x_t.var(axis=(1, 2, 3))
    np.testing.assert_array_less(np.abs(mean - np.sqrt(ab) * c), 5 * np.sqrt((1 - ab) / n))
    np.testing.assert_array_less(np.abs(var - (1 - ab)), 5 * (1 - ab) * np.sqrt(2 / n))


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule_on_a_grid(t):
    """q(x_{t−1} | x_t, x0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x0), normalised numerically."""
    x0, x_t = 0.8, -0.3
    beta, ab_prev = SCHEDULE.betas[t], SCHEDULE.alphas_cumprod[t - 1]
    prior_mean, prior_var = np.sqrt(ab_prev) * x0, 1 - ab_prev  # q(x_{t−1} | x0), eq. 4
    centres = sorted([prior_mean, x_t / np.sqrt(1 - beta)])  # the posterior lies between the two
    margin = 12 * np.sqrt(max(prior_var, beta))
    grid = np.linspace(centres[0] - margin, centres[1] + margin, 400_001)
    log_p = -((x_t - np.sqrt(1 - beta) * grid) ** 2) / (2 * beta) - (grid - prior_mean) ** 2 / (2 * prior_var)
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    bayes_mean = np.sum(p * grid)
    bayes_var = np.sum(p * (grid - bayes_mean) ** 2)
    mean, var = q_posterior_mean_variance(np.full((1, 1), x0), np.full((1, 1), x_t), np.array([t]), SCHEDULE)
    assert mean.shape == (1, 1) and var.shape == (1, 1)
    assert mean[0, 0] == pytest.approx(bayes_mean, rel=1e-6, abs=1e-9)
    assert var[0, 0] == pytest.approx(bayes_var, rel=1e-5)


def test_posterior_at_t0_is_the_clean_image():
    x0, x_t = np.full((2, 3), 0.4), np.full((2, 3), 1.0)
    mean, var = q_posterior_mean_variance(x0, x_t, np.array([0, 0]), SCHEDULE)
    np.testing.assert_allclose(mean, x0, rtol=1e-12)
    np.testing.assert_array_equal(var, 0.0)


def _noisy_batch(seed=0, shape=(5, 2, 3, 3)):
    rng = np.random.default_rng(seed)
    x0, noise = rng.standard_normal(shape), rng.standard_normal(shape)
    alpha_bar = append_dims(rng.uniform(1e-4, 1 - 1e-4, shape[0]), len(shape))  # (B, 1, 1, 1)
    x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise
    return x0, noise, alpha_bar, x_t


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_conversions_round_trip(prediction_type):
    x0, noise, alpha_bar, x_t = _noisy_batch()
    target = prediction_target(x0, noise, alpha_bar, prediction_type)
    np.testing.assert_allclose(predicted_x0(target, x_t, alpha_bar, prediction_type), x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(predicted_noise(target, x_t, alpha_bar, prediction_type), noise, rtol=1e-9, atol=1e-9)
    for other in PREDICTION_TYPES:
        converted = convert_prediction(target, x_t, alpha_bar, prediction_type, other)
        np.testing.assert_allclose(converted, prediction_target(x0, noise, alpha_bar, other), rtol=1e-9, atol=1e-9)


def test_v_is_a_rotation_of_x0_and_noise():
    x0, noise, alpha_bar, x_t = _noisy_batch(1)
    v = prediction_target(x0, noise, alpha_bar, "v")
    # (x_t, v) is (x0, ε) rotated: the norm is kept, pointwise.
    np.testing.assert_allclose(x_t**2 + v**2, x0**2 + noise**2, rtol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_give_the_same_x0_loss_for_every_prediction_type(prediction_type):
    """w · ‖F̂ − F‖² must equal min(SNR, γ) · ‖x̂0 − x0‖² whatever the network predicts (F)."""
    t = np.array([0, 50, 200, 500, 999])
    x0, noise, _, _ = _noisy_batch(2, (5, 1, 4, 4))
    alpha_bar = append_dims(SCHEDULE.alphas_cumprod[t], 4)
    x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise
    x0_hat = x0 + 0.1 * np.random.default_rng(3).standard_normal(x0.shape)  # a wrong estimate
    noise_hat = (x_t - np.sqrt(alpha_bar) * x0_hat) / np.sqrt(1 - alpha_bar)  # at the same x_t
    error = prediction_target(x0_hat, noise_hat, alpha_bar, prediction_type) - prediction_target(
        x0, noise, alpha_bar, prediction_type
    )
    snr = SCHEDULE.alphas_cumprod[t] / (1 - SCHEDULE.alphas_cumprod[t])
    weighted = loss_weights(SCHEDULE, t, prediction_type, "min_snr", gamma=5.0) * np.sum(error**2, axis=(1, 2, 3))
    np.testing.assert_allclose(weighted, np.minimum(snr, 5.0) * np.sum((x0_hat - x0) ** 2, axis=(1, 2, 3)), rtol=1e-6)


def test_loss_weights_plain_and_zero_terminal_snr_limits():
    t = np.array([0, 999])
    np.testing.assert_array_equal(loss_weights(SCHEDULE, t, "v"), [1.0, 1.0])
    zero = make_schedule("linear", 1000, zero_terminal_snr=True)
    assert loss_weights(zero, t, "epsilon", "min_snr")[1] == 1.0  # limit of min(SNR, γ)/SNR at SNR = 0
    assert loss_weights(zero, t, "v", "min_snr")[1] == 0.0
    with pytest.raises(ValueError, match="plain, min_snr"):
        loss_weights(SCHEDULE, t, "v", "snr")
    with pytest.raises(ValueError, match="epsilon, v, sample"):
        prediction_target(np.zeros(1), np.zeros(1), 0.5, "x0")


# --- per-sample randomness --------------------------------------------------------------------


def test_int_seed_means_seed_plus_index():
    generators = per_sample_generators(7, 4)
    for i, g in enumerate(generators):
        assert g.standard_normal() == np.random.default_rng(7 + i).standard_normal()


def test_batch_of_four_equals_four_runs_of_one():
    shape = (4, 2, 3, 3)
    batch = randn_per_sample(per_sample_generators(11, 4), shape, dtype=np.float64)
    for i in range(4):
        single = randn_per_sample(per_sample_generators(11 + i, 1), (1,) + shape[1:], dtype=np.float64)
        np.testing.assert_array_equal(batch[i : i + 1], single)
        # ... and each element is what backend.randn draws from that generator.
        np.testing.assert_array_equal(batch[i], randn(np.random.default_rng(11 + i), shape[1:], dtype=np.float64))
    assert randn_per_sample(per_sample_generators(11, 4), shape).dtype == np.float32


def test_rng_forms_are_normalised():
    g = np.random.default_rng(0)
    assert per_sample_generators(g, 3) == [g, g, g]  # one shared stream
    own = [np.random.default_rng(i) for i in range(3)]
    assert per_sample_generators(own, 3) == own
    fresh = per_sample_generators(None, 2)
    assert len(fresh) == 2 and fresh[0] is not fresh[1]
    assert len(per_sample_generators(np.int64(3), 2)) == 2


def test_bad_rng_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        per_sample_generators([np.random.default_rng(0)] * 2, 3)
    with pytest.raises(ValueError, match=">= 0"):
        per_sample_generators(-1, 2)
    for bad in (True, 1.5, "seed", [1, 2]):
        with pytest.raises(TypeError, match="sequence of Generators"):
            per_sample_generators(bad, 2)
    with pytest.raises(ValueError, match="generators for a batch"):
        randn_per_sample(per_sample_generators(0, 2), (3, 4))
