"""Tests for the KL autoencoder: gradient checks through every part, shapes, the latent scale,
training, checkpoints, PSNR and bad-input errors."""

import math

import numpy as np
import pytest

from tinydiff.backend import get_xp, rng, to_device, to_numpy
from tinydiff.metrics import evaluate_autoencoder, psnr
from tinydiff.models import AutoencoderConfig, AutoencoderKL
from tinydiff.models.autoencoder import (
    LOGVAR_MAX, LOGVAR_MIN, clamp_logvar_backward, clamp_logvar_forward, reparameterize_backward,
    reparameterize_forward, vae_loss,
)
from tinydiff.models.blocks import ResBlock
from tinydiff.nn import gradcheck, gradcheck_module
from tinydiff.train.autoencoder import load_autoencoder, load_digit_splits, train_autoencoder
from tinydiff.train.loop import LoopConfig

TOL = 1e-6
LATENT = 4


def tiny_config(**changes) -> AutoencoderConfig:
    return AutoencoderConfig(**({"block_channels": (4, 8, 8), "groups": 2} | changes))


def tiny_model(backend="numpy", **changes) -> AutoencoderKL:
    return AutoencoderKL(tiny_config(**changes)).double().to(backend)


def inputs(backend="numpy", batch=2, size=8):
    """Images (B, 1, size, size) in [−1, 1] and noise ε (B, 4, size/4, size/4), float64."""
    x = rng(1).uniform(-1, 1, (batch, 1, size, size))
    eps = rng(2).standard_normal((batch, LATENT, size // 4, size // 4))
    return to_device(x, backend), to_device(eps, backend)


def check_model(model, forward, backward, x):
    """gradcheck of ``forward()`` w.r.t. x and every parameter; ``backward(d)`` fills the grads and
    returns dx. Returns the errors (all must be < TOL)."""
    params = dict(model.named_parameters())

    def grads(d):
        model.zero_grad()
        forward()
        dx = backward(d)
        return {"x": dx} | {n: p.grad for n, p in params.items()}

    errors = gradcheck(forward, grads, {"x": x} | {n: p.data for n, p in params.items()})
    assert max(errors.values()) < TOL, {k: v for k, v in errors.items() if v >= TOL}
    return errors


# --------------------------------------------------------------------------- gradient checks


def test_forward_gradients_through_encoder_sample_and_decoder(backends):
    """(x̂, μ, log σ²) = forward(x, ε) with fixed ε: the reparameterisation's gradient reaches
    the encoder through both μ and log σ², and μ, log σ² also get direct upstream gradients."""
    model = tiny_model(backends)
    x, eps = inputs(backends)
    check_model(model, lambda: model(x, eps), lambda d: model.backward(*d), x)


def test_loss_gradients_with_kl_term(backends):
    """The whole objective, MSE + β·KL, with a large β so the KL's gradients matter."""
    model = tiny_model(backends)
    x, eps = inputs(backends)
    xp = get_xp(x)
    beta = 0.05

    def loss():
        x_hat, mean, logvar = model(x, eps)
        return xp.asarray(vae_loss(x, x_hat, mean, logvar, beta)[0])

    def backward(dloss):
        x_hat, mean, logvar = model(x, eps)
        _, grads, _ = vae_loss(x, x_hat, mean, logvar, beta)
        dx_hat, dmean, dlogvar = (float(dloss) * g for g in grads)
        # x is both the input and the target of (x̂ − x)²: the target's share is −dx̂.
        return model.backward(dx_hat, dmean, dlogvar) - dx_hat

    check_model(model, loss, backward, x)


def test_encode_and_decode_each_have_their_backward(backends):
    model = tiny_model(backends)
    x, eps = inputs(backends)
    check_model(model.encoder, lambda: model.encode(x), lambda d: model.encode_backward(*d), x)
    check_model(model.decoder, lambda: model.decode(eps), model.decode_backward, eps)


def test_clamp_passes_gradient_inside_and_blocks_it_outside():
    raw = np.array([-45.0, -30.5, -29.0, -1.0, 0.3, 19.5, 20.5, 60.0])
    logvar, inside = clamp_logvar_forward(raw)
    np.testing.assert_array_equal(logvar, np.clip(raw, LOGVAR_MIN, LOGVAR_MAX))
    errors = gradcheck(lambda: clamp_logvar_forward(raw)[0],
                       lambda d: {"raw": clamp_logvar_backward(d, clamp_logvar_forward(raw)[1])}, {"raw": raw})
    assert errors["raw"] < TOL
    np.testing.assert_array_equal(clamp_logvar_backward(np.ones(8), inside), [0, 0, 1, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("bias", [-45.0, 25.0])
def test_clamped_log_variance_sends_no_gradient_into_the_encoder(bias):
    """With every raw log σ² pushed beyond the clamp, the encoder rows producing it get exactly
    zero gradient, and the rest of the model still passes the gradient check."""
    model = tiny_model()
    model.encoder.conv_out.bias.data[LATENT:] = bias  # the log σ² half of the moments
    x, eps = inputs()
    _, logvar = model.encode(x)
    assert np.all(logvar == np.clip(bias, LOGVAR_MIN, LOGVAR_MAX))
    if bias > 0:  # σ = e^10: scale ε down so that the decoder sees moderate numbers
        eps = eps * 1e-4
    check_model(model, lambda: model(x, eps), lambda d: model.backward(*d), x)
    assert not model.encoder.conv_out.weight.grad[LATENT:].any()
    assert not model.encoder.conv_out.bias.grad[LATENT:].any()
    assert model.encoder.conv_out.bias.grad[:LATENT].any()


def test_reparameterisation_value_and_gradient():
    gen = rng(3)
    mean, logvar, eps = (gen.standard_normal((2, 4, 2, 2)) for _ in range(3))
    z, cache = reparameterize_forward(mean, logvar, eps)
    np.testing.assert_allclose(z, mean + np.exp(logvar / 2) * eps)
    errors = gradcheck(lambda: reparameterize_forward(mean, logvar, eps)[0],
                       lambda d: dict(zip(("mean", "logvar"), reparameterize_backward(d, cache))),
                       {"mean": mean, "logvar": logvar})
    assert max(errors.values()) < TOL


def test_resblock_without_time_embedding(backends):
    block = ResBlock(4, 8, None, 2).double().to(backends)
    assert block.time_emb_proj is None
    x = to_device(rng(4).standard_normal((2, 4, 5, 5)), backends)
    errors = gradcheck_module(block, x)
    assert max(errors.values()) < TOL, errors
    block(x)
    assert block.backward(to_device(np.ones((2, 8, 5, 5)), backends))[1] is None
    with pytest.raises(ValueError, match="without a time embedding"):
        block(x, to_device(np.ones((2, 3)), backends))
    with pytest.raises(ValueError, match="with a time embedding"):
        ResBlock(4, 8, 3, 2).double().to(backends)(x)


# --------------------------------------------------------------------------- shapes and API


def test_shapes_of_the_default_model():
    model = AutoencoderKL()
    assert model.config.latent_shape == (4, 8, 8)
    x = load_digit_splits()[1][:3]  # (3, 1, 32, 32)
    eps = rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    x_hat, mean, logvar = model(x, eps)
    assert (x_hat.shape, mean.shape, logvar.shape) == ((3, 1, 32, 32), (3, 4, 8, 8), (3, 4, 8, 8))
    assert model.decode(mean).shape == (3, 1, 32, 32)
    assert model.reconstruct(x, batch_size=2).shape == (3, 1, 32, 32)
    assert x_hat.dtype == np.float32


def test_config_json_round_trip_and_validation():
    config = AutoencoderConfig(block_channels=(8, 16), groups=4, scaling_factor=0.5)
    again = AutoencoderConfig.from_json(config.to_json())
    assert again == config and again.block_channels == (8, 16) and again.latent_shape == (4, 16, 16)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        AutoencoderConfig(groups=3)
    with pytest.raises(ValueError, match="unknown AutoencoderConfig keys: colour"):
        AutoencoderConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="scaling_factor must be positive"):
        AutoencoderConfig(scaling_factor=0.0)


def test_wrong_inputs_get_clear_errors():
    model = tiny_model()
    x, eps = inputs()
    with pytest.raises(ValueError, match=r"expects a \(B, 1, H, W\) array, got shape \(2, 3, 8, 8\)"):
        model.encode(np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="multiples of 4, got 10×10"):
        model.encode(np.zeros((2, 1, 10, 10)))
    with pytest.raises(ValueError, match=r"expects a \(B, 4, H, W\)"):
        model.decode(np.zeros((2, 1, 2, 2)))
    with pytest.raises(ValueError, match="ε of the latent's shape"):
        model(x, eps[:, :2])
    with pytest.raises(TypeError, match="float64 parameters but got a float32 input"):
        model.encode(x.astype(np.float32))
    with pytest.raises(RuntimeError, match="without a forward pass"):
        model.encode_backward(None, None)


def test_diffusion_scaling_is_undone_by_decoding():
    model = tiny_model()
    x, _ = inputs(batch=5)
    with pytest.raises(ValueError, match="no scaling_factor yet"):
        model.encode_for_diffusion(x)
    s = model.fit_scaling_factor(x, batch_size=2)
    means = model.encode_means(x, batch_size=2)
    assert s == model.config.scaling_factor
    assert math.isclose(s, 1.0 / means.std())
    z = model.encode_for_diffusion(x, batch_size=3)
    np.testing.assert_allclose(z, s * means, rtol=1e-12)
    assert math.isclose(z.std(), 1.0)  # unit variance: what the diffusion model expects
    np.testing.assert_allclose(model.decode_from_diffusion(z), model.reconstruct(x), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- training and checkpoints


def test_training_reduces_the_loss_and_checkpoint_restores_weights_and_scale(tmp_path):
    train, _ = load_digit_splits()
    config = AutoencoderConfig(block_channels=(8, 8, 8), groups=4)
    loop = LoopConfig(total_steps=40, lr=3e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=20)
    path = tmp_path / "vae.npz"
    model, result = train_autoencoder(config, loop, batch_size=16, images=train[:320], checkpoint_path=path)
    history = result["history"]
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])
    factors = result["scaling_factors"]
    assert model.config.scaling_factor == factors["last"] and factors["ema"] > 0
    assert config.scaling_factor is None  # the caller's config is not modified

    for weights in ("last", "ema"):
        loaded = load_autoencoder(path, weights=weights)
        assert loaded.config.scaling_factor == factors[weights]
        expected = model.state_dict() if weights == "last" else result["ema"].shadow
        for name, value in loaded.state_dict().items():
            np.testing.assert_array_equal(value, to_numpy(expected[name]))
    with pytest.raises(ValueError, match="weights must be one of"):
        load_autoencoder(path, weights="best")


def test_psnr_definition_and_range_equivalence():
    x = rng(5).uniform(-1, 1, (3, 1, 4, 4))
    assert math.isclose(psnr(x, x + 0.2), 10 * math.log10(4 / 0.04))  # 20 dB
    x_hat = x + rng(6).normal(0, 0.1, x.shape)
    assert math.isclose(psnr(x, x_hat), psnr((x + 1) / 2, (x_hat + 1) / 2, data_range=1.0))
    assert psnr(x, x) == math.inf
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x, x[:2])


def test_evaluate_autoencoder_reports_both_windows():
    model = AutoencoderKL(tiny_config())
    images = load_digit_splits()[1][:6]
    metrics = evaluate_autoencoder(model, images, batch_size=4)
    x_hat = to_numpy(model.reconstruct(images))
    assert math.isclose(metrics["psnr"], psnr(images, x_hat), rel_tol=1e-9)
    assert math.isclose(metrics["psnr"], 10 * math.log10(4 / metrics["mse"]), rel_tol=1e-9)
    assert math.isclose(metrics["psnr_digit_area"], psnr(images[..., 2:-2, 2:-2], x_hat[..., 2:-2, 2:-2]), rel_tol=1e-9)
