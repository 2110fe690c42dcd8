"""Losses (values against direct formulas, gradients by finite differences) and the optimisation
pieces (AdamW against a hand-computed reference, decoupled decay, exact resume, clipping, the
learning-rate schedule and the EMA)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinydiff.backend import to_device, to_numpy
from tinydiff.io import load_checkpoint, save_checkpoint
from tinydiff.nn import (
    EMA,
    AdamW,
    Linear,
    Parameter,
    clip_grad_norm,
    cross_entropy,
    gaussian_kl,
    gradcheck,
    info_nce_loss,
    mse_loss,
    warmup_cosine_lr,
)
from tinydiff.nn.losses import LOGIT_SCALE_MAX

TOL = 1e-6


def randn(shape, backend, seed=10, scale=1.0):
    return to_device(scale * np.random.default_rng(seed).standard_normal(shape), backend)


def check_loss(loss_fn, tensors: dict):
    """gradcheck for a scalar loss: ``loss_fn(**tensors) -> (loss, {name: dloss/dname})``."""

    def forward():
        return np.asarray(loss_fn(**tensors)[0], dtype=np.float64)  # a 0-d output

    def backward(dout):
        _, grads = loss_fn(**tensors)
        return {k: g * float(dout) for k, g in grads.items()}

    errors = gradcheck(forward, backward, tensors, num_samples=16, seed=2024)
    assert max(errors.values()) < TOL, errors


# --------------------------------------------------------------------------- losses


def test_mse_with_per_sample_weights_matches_formula_and_gradchecks(backends):
    pred, target = randn((3, 2, 4), backends, 1), randn((3, 2, 4), backends, 2)
    weight = to_device(np.array([0.5, 2.0, 1.0]), backends)
    loss, _ = mse_loss(pred, target, weight)
    p, t = to_numpy(pred), to_numpy(target)
    direct = sum(w * ((p[b] - t[b]) ** 2).sum() for b, w in enumerate([0.5, 2.0, 1.0])) / p.size
    assert math.isclose(loss, direct, rel_tol=1e-12)
    check_loss(lambda pred: (lambda r: (r[0], {"pred": r[1]}))(mse_loss(pred, target, weight)), {"pred": pred})


def test_mse_without_weights_is_the_plain_mean(backends):
    pred, target = randn((4, 5), backends, 1), randn((4, 5), backends, 2)
    loss, grad = mse_loss(pred, target)
    assert math.isclose(loss, float(((to_numpy(pred) - to_numpy(target)) ** 2).mean()), rel_tol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), 2 * (to_numpy(pred) - to_numpy(target)) / 20)


def test_mse_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction \(2, 3\) and target \(3, 2\) differ in shape"):
        mse_loss(np.zeros((2, 3)), np.zeros((3, 2)))


def test_cross_entropy_matches_negative_log_softmax_and_gradchecks(backends):
    logits = randn((4, 5), backends, 3, scale=3.0)
    labels = to_device(np.array([0, 4, 4, 2]), backends)
    loss, _ = cross_entropy(logits, labels)
    z = to_numpy(logits)
    direct = -np.mean([math.log(math.exp(z[b, y]) / sum(math.exp(v) for v in z[b])) for b, y in enumerate([0, 4, 4, 2])])
    assert math.isclose(loss, direct, rel_tol=1e-12)
    check_loss(lambda logits: (lambda r: (r[0], {"logits": r[1]}))(cross_entropy(logits, labels)), {"logits": logits})


def test_cross_entropy_is_finite_for_huge_logits(backends):
    loss, grad = cross_entropy(to_device(np.array([[1000.0, -1000.0]]), backends), to_device(np.array([1]), backends))
    assert math.isclose(loss, 2000.0) and np.isfinite(to_numpy(grad)).all()


def direct_info_nce(a, b, log_scale):
    """½ [CE over rows + CE over columns] of s·cos-similarity, with s = min(e^log_scale, 100)."""
    u = a / np.linalg.norm(a, axis=1, keepdims=True)
    w = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = min(math.exp(log_scale), 100.0) * (u @ w.T)
    n = len(a)
    rows = -np.mean([logits[i, i] - math.log(np.exp(logits[i]).sum()) for i in range(n)])
    cols = -np.mean([logits[i, i] - math.log(np.exp(logits[:, i]).sum()) for i in range(n)])
    return 0.5 * (rows + cols)


def test_info_nce_value_matches_direct_formula(backends):
    a, b = randn((5, 3), backends, 1), randn((5, 3), backends, 2)
    loss = info_nce_loss(a, b, math.log(1 / 0.07))[0]
    assert math.isclose(loss, direct_info_nce(to_numpy(a), to_numpy(b), math.log(1 / 0.07)), rel_tol=1e-12)


def info_nce_with_scale_array(image, text, log_scale):
    loss, di, dt, dls = info_nce_loss(image, text, float(log_scale[0]))
    return loss, {"image": di, "text": dt, "log_scale": np.array([dls])}


def test_info_nce_gradcheck_including_log_scale(backends):
    tensors = {"image": randn((4, 3), backends, 1), "text": randn((4, 3), backends, 2),
               "log_scale": np.array([math.log(5.0)])}  # the scale is a CPU float in the API
    check_loss(info_nce_with_scale_array, tensors)


def test_info_nce_clip_at_100_zeroes_d_log_scale(backends):
    a, b = randn((4, 3), backends, 1), randn((4, 3), backends, 2)
    clipped = math.log(2 * LOGIT_SCALE_MAX)
    loss, _, _, d_log_scale = info_nce_loss(a, b, clipped)
    assert d_log_scale == 0.0
    assert loss == info_nce_loss(a, b, clipped + 0.5)[0]  # flat in log_scale above the clip
    assert math.isclose(loss, direct_info_nce(to_numpy(a), to_numpy(b), math.log(LOGIT_SCALE_MAX)), rel_tol=1e-12)
    # and the image/text gradients above the clip still gradcheck
    check_loss(lambda image, text: (lambda r: (r[0], {"image": r[1], "text": r[2]}))(info_nce_loss(image, text, clipped)),
               {"image": a, "text": b})


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"image \(2, 3\) and text \(2, 4\) embeddings differ"):
        info_nce_loss(np.ones((2, 3)), np.ones((2, 4)), 0.0)


def test_gaussian_kl_matches_closed_form_per_dimension_and_gradchecks(backends):
    mean, logvar = randn((3, 4), backends, 1), randn((3, 4), backends, 2, scale=0.5)
    kl, _, _ = gaussian_kl(mean, logvar)
    mu, sigma = to_numpy(mean), np.exp(0.5 * to_numpy(logvar))
    # KL(N(μ,σ²) ‖ N(0,1)) = log(1/σ) + (σ² + μ²)/2 − 1/2, summed over dimensions, averaged over the batch
    direct = sum(math.log(1 / s) + (s * s + m * m) / 2 - 0.5 for m, s in zip(mu.ravel(), sigma.ravel())) / 3
    assert math.isclose(kl, direct, rel_tol=1e-12)
    check_loss(lambda mean, logvar: (lambda r: (r[0], {"mean": r[1], "logvar": r[2]}))(gaussian_kl(mean, logvar)),
               {"mean": mean, "logvar": logvar})


def test_gaussian_kl_is_zero_for_the_standard_normal(backends):
    kl, dmean, dlogvar = gaussian_kl(to_device(np.zeros((2, 3)), backends), to_device(np.zeros((2, 3)), backends))
    assert kl == 0.0 and not to_numpy(dmean).any() and not to_numpy(dlogvar).any()


# --------------------------------------------------------------------------- AdamW


def adamw_reference(theta, grads, lr, b1, b2, eps, wd):
    """Loshchilov & Hutter's AdamW written element by element with plain floats."""
    theta = list(theta)
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    for t, g in enumerate(grads, start=1):
        for i in range(len(theta)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            theta[i] = theta[i] - lr * wd * theta[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return theta


@pytest.mark.parametrize("steps", [1, 2])
def test_adamw_matches_hand_computed_reference(backends, steps):
    theta0 = [0.5, -1.0, 2.0]
    grads = [[0.1, -0.3, 0.0], [-0.2, 0.4, 1.0]][:steps]
    p = Parameter(to_device(np.array(theta0), backends))
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    for g in grads:
        p.grad[...] = to_device(np.array(g), backends)
        opt.step()
    np.testing.assert_allclose(to_numpy(p.data), adamw_reference(theta0, grads, 0.1, 0.9, 0.99, 1e-8, 0.05), rtol=1e-13)


def test_adamw_first_step_moves_each_weight_by_about_lr_times_sign_of_grad():
    p = Parameter(np.array([1.0, 1.0]))
    p.grad[...] = [3.0, -0.001]
    AdamW([p], lr=0.01, weight_decay=0.0).step()
    np.testing.assert_allclose(p.data, [0.99, 1.01], rtol=1e-6)  # m̂/√v̂ = g/|g| at t = 1


def test_adamw_weight_decay_is_decoupled_from_the_gradient_moments():
    p = Parameter(np.array([2.0, -4.0]))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    opt.step()  # zero gradient: only the decay acts, θ ← (1 − lr·λ) θ
    np.testing.assert_allclose(p.data, [2.0 * 0.95, -4.0 * 0.95], rtol=1e-15)
    assert not opt.m[0].any() and not opt.v[0].any()  # the decay never enters m or v (unlike L2 in Adam)


def test_adamw_step_accepts_a_scheduled_lr():
    p = Parameter(np.array([1.0]))
    p.grad[...] = 1.0
    AdamW([p], lr=1.0, weight_decay=0.0).step(lr=0.001)
    np.testing.assert_allclose(p.data, [0.999], rtol=1e-6)


def make_params(seed):
    g = np.random.default_rng(seed)
    return [Parameter(g.standard_normal((3, 2))), Parameter(g.standard_normal(4))]


def set_grads(params, step):
    g = np.random.default_rng(1000 + step)
    for p in params:
        p.grad[...] = g.standard_normal(p.shape)


def test_adamw_state_dict_round_trip_continues_identically(tmp_path):
    params = make_params(0)
    opt = AdamW(params, lr=0.01)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    save_checkpoint(tmp_path / "opt.npz", {**opt.state_dict(), **{f"p{i}": p.data for i, p in enumerate(params)}},
                    kind="optimizer")
    arrays, _ = load_checkpoint(tmp_path / "opt.npz", kind="optimizer")
    resumed = [Parameter(arrays[f"p{i}"].copy()) for i in range(2)]
    opt2 = AdamW(resumed, lr=0.01)
    opt2.load_state_dict(arrays)
    assert opt2.step_count == 3
    for step in range(3, 5):
        set_grads(params, step)
        set_grads(resumed, step)
        opt.step()
        opt2.step()
    for a, b in zip(params, resumed):
        np.testing.assert_array_equal(a.data, b.data)


def test_adamw_load_state_dict_copies_instead_of_aliasing_the_state():
    # regression: loaded moments used to alias the caller's arrays, so step() wrote into the state
    params = make_params(0)
    opt = AdamW(params)
    set_grads(params, 0)
    opt.step()
    state = opt.state_dict()
    before = {k: np.array(v, copy=True) for k, v in state.items()}
    other = AdamW(make_params(0))
    other.load_state_dict(state)
    set_grads(other.params, 1)
    other.step()
    for k in before:
        np.testing.assert_array_equal(state[k], before[k])


def test_adamw_rejects_state_of_another_model():
    with pytest.raises(ValueError, match="does not match the model's parameters"):
        AdamW(make_params(0)).load_state_dict(AdamW([Parameter(np.zeros(2))]).state_dict())


def test_adamw_rejects_empty_parameter_list():
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])


# --------------------------------------------------------------------------- clipping, schedule


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_original_norm(backends):
    a, b = Parameter(to_device(np.zeros(2), backends)), Parameter(to_device(np.zeros(1), backends))
    a.grad[...] = to_device(np.array([3.0, 0.0]), backends)
    b.grad[...] = to_device(np.array([4.0]), backends)
    assert math.isclose(clip_grad_norm([a, b], 1.0), 5.0)
    np.testing.assert_allclose(to_numpy(a.grad), [0.6, 0.0])
    np.testing.assert_allclose(to_numpy(b.grad), [0.8])
    assert math.isclose(clip_grad_norm([a, b], 10.0), 1.0, rel_tol=1e-9)  # below the limit: untouched
    np.testing.assert_allclose(to_numpy(b.grad), [0.8])


def test_clip_grad_norm_leaves_non_finite_gradients_for_the_caller_to_see():
    p = Parameter(np.zeros(2))
    p.grad[...] = [np.inf, 1.0]
    assert clip_grad_norm([p], 1.0) == math.inf
    assert p.grad[1] == 1.0


def test_warmup_cosine_lr_endpoints():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert math.isclose(warmup_cosine_lr(0, **kw), 0.1)  # (step + 1)/warmup
    assert math.isclose(warmup_cosine_lr(9, **kw), 1.0)  # warm-up reaches the base rate
    assert math.isclose(warmup_cosine_lr(10, **kw), 1.0)  # cosine starts at the top
    assert math.isclose(warmup_cosine_lr(60, **kw), 0.55)  # halfway: (base + min)/2
    assert math.isclose(warmup_cosine_lr(110, **kw), 0.1)  # ends at min_lr
    assert math.isclose(warmup_cosine_lr(500, **kw), 0.1)  # and stays there
    assert math.isclose(warmup_cosine_lr(0, base_lr=2.0, total_steps=10), 2.0)  # no warm-up


def test_warmup_cosine_lr_is_monotone_after_warmup():
    lrs = [warmup_cosine_lr(s, base_lr=1.0, total_steps=50, warmup_steps=5) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# --------------------------------------------------------------------------- EMA


def test_ema_update_formula_and_copy_to(backends):
    model = Linear(2, 2).double().to(backends)
    start = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.9)
    for p in model.parameters():
        p.data += 1.0
    ema.update(model)
    for k, v in ema.shadow.items():
        np.testing.assert_allclose(to_numpy(v), 0.9 * start[k] + 0.1 * (start[k] + 1.0), rtol=1e-14)
    target = Linear(2, 2).double().to(backends)
    ema.copy_to(target)
    for k, v in target.state_dict().items():
        np.testing.assert_allclose(to_numpy(v), start[k] + 0.1, rtol=1e-14)


def test_ema_shadow_is_a_copy_not_the_live_weights():
    model = Linear(2, 2)
    ema = EMA(model, 0.5)
    model.weight.data += 10.0
    assert not np.allclose(ema.shadow["weight"], model.weight.data)


def test_ema_state_round_trip_continues_identically():
    model = Linear(3, 2).double()
    ema = EMA(model, 0.8)
    ema.update(model)
    state = ema.state_dict()
    assert set(state) == {"ema.weight", "ema.bias"}
    other = EMA(Linear(3, 2).double(), 0.8)
    other.load_state_dict(state)
    for p in model.parameters():
        p.data *= 2.0
    ema.update(model)
    other.update(model)
    for k in ema.shadow:
        np.testing.assert_array_equal(ema.shadow[k], other.shadow[k])


def test_power_ema_decay_matches_its_closed_form():
    """β_t = min(decay, (1 − 1/t)^(γ+1)): 0 at t = 1, the power below the cap, the cap above it."""
    ema = EMA(Linear(1, 1), decay=0.9, power=3.0)
    assert ema.decay_at(1) == 0.0
    assert ema.decay_at(4) == pytest.approx((3 / 4) ** 4, rel=1e-15)
    assert ema.decay_at(20) == pytest.approx(0.95**4, rel=1e-15)  # 0.815, below the cap
    assert ema.decay_at(100) == 0.9  # (0.99)^4 = 0.961 > 0.9: capped
    assert EMA(Linear(1, 1), decay=0.9).decay_at(1) == 0.9  # a constant decay ignores the step
    with pytest.raises(ValueError, match="step t ≥ 1"):
        ema.decay_at(None)
    with pytest.raises(ValueError, match="must be positive"):
        EMA(Linear(1, 1), power=0.0)


def test_power_ema_weighs_step_tau_by_its_power_profile():
    """After T updates the average is Σ_τ w_τ θ_τ with w_τ = (1 − β_τ) ∏_{s>τ} β_s; uncapped that is
    (1 − β_τ)(τ/T)^(γ+1): the start's weights are forgotten (β_1 = 0) and the profile grows as τ^γ."""
    gamma, steps = 2.5, 40
    model = Linear(1, 1).double()
    ema = EMA(model, decay=0.9999, power=gamma)
    thetas = np.random.default_rng(0).standard_normal(steps)
    for tau, theta in enumerate(thetas, start=1):
        model.weight.data[...] = theta
        ema.update(model, step=tau)
    betas = np.array([(1 - 1 / tau) ** (gamma + 1) for tau in range(1, steps + 1)])
    weights = (1 - betas) * (np.arange(1, steps + 1) / steps) ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    assert float(ema.shadow["weight"][0, 0]) == pytest.approx(float(weights @ thetas), rel=1e-12)


def test_ema_rejects_decay_of_one():
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\)"):
        EMA(Linear(1, 1), 1.0)
