"""The shared training loop and the diffusion training step: exact resume, NaN guard, learning."""

import numpy as np
import pytest

from tinydiff.io import load_checkpoint
from tinydiff.models import UNet, UNetConfig
from tinydiff.nn import Embedding, manual_seed
from tinydiff.nn.optim import EMA
from tinydiff.train import LoopConfig, TrainingDiverged, train_loop
from tinydiff.train.diffusion import DiffusionTrainingConfig, LabelConditioning, diffusion_grads
from tinydiff.train.pixel_digits import PixelDigitModel, fast_recipe, generate_digits


def tiny_config():
    return UNetConfig(in_channels=1, out_channels=1, sample_size=8, block_channels=(8, 16), layers_per_block=1,
                      attention_levels=(False, True), context_dim=8, context_length=1, learned_null_context=True,
                      heads=2, dim_head=4, groups=4, time_embed_dim=16)


def tiny_data(n=32, seed=0):
    gen = np.random.default_rng(seed)
    return gen.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), gen.integers(0, 10, n)


def make_model():
    return PixelDigitModel(tiny_config(), seed=3)


def run(model, data, labels, loop, threads=1, **kwargs):
    grads = diffusion_grads(model.unet, data, DiffusionTrainingConfig(batch_size=8), LabelConditioning(model.label_embedding, labels),
                            threads=threads)
    return train_loop(model, grads, loop, kind="test", **kwargs)


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_step_equals_single_threaded_step(threads):
    """Rows split over threads and replicas: same loss and same gradient for every parameter,
    including the label embedding (reached through dcontext) and the null context (float64)."""
    data, labels = tiny_data()
    grads = {}
    for n_threads in (1, threads):
        model = make_model().double()
        step = diffusion_grads(model.unet, data.astype(np.float64), DiffusionTrainingConfig(batch_size=8, cond_drop_prob=0.3),
                               LabelConditioning(model.label_embedding, labels), threads=n_threads)
        model.zero_grad()
        loss, logs = step(0, np.random.default_rng(5))
        assert logs["dropped"] > 0  # the null-context path is exercised
        grads[n_threads] = (loss, {name: p.grad.copy() for name, p in model.named_parameters()})
    (loss1, g1), (loss_n, g_n) = grads[1], grads[threads]
    assert loss_n == pytest.approx(loss1, rel=1e-12)
    for name in g1:
        np.testing.assert_allclose(g_n[name], g1[name], rtol=1e-9, atol=1e-12, err_msg=name)
    for name in ("unet.conv_in.weight", "unet.null_embedding", "label_embedding.weight"):
        assert np.abs(g1[name]).max() > 0, name  # the paths the replicas and the main thread share


def test_a_step_after_an_interrupted_one_runs_on_new_workers_and_is_right():
    """A step that fails mid-way (Ctrl-C in a notebook, say) stops the workers; the next step
    starts new ones and computes the same gradients as one core."""
    data, labels = tiny_data()
    results = []
    for threads in (1, 2):
        model = make_model().double()
        step = diffusion_grads(model.unet, data.astype(np.float64), DiffusionTrainingConfig(batch_size=8),
                               LabelConditioning(model.label_embedding, labels), threads=threads)
        if threads == 2:
            step(0, np.random.default_rng(1))  # the workers start
            model.unet.forward = lambda *args: (_ for _ in ()).throw(KeyboardInterrupt)  # this process's block
            with pytest.raises(KeyboardInterrupt):
                step(0, np.random.default_rng(2))
            del model.unet.forward
        model.zero_grad()
        loss, _ = step(0, np.random.default_rng(5))
        results.append((loss, model.unet.conv_in.weight.grad.copy()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-9, atol=1e-12)


def test_threaded_training_resumes_bitwise_exactly(tmp_path):
    data, labels = tiny_data()
    loop = LoopConfig(total_steps=6, warmup_steps=2, checkpoint_every=3, ema_decay=0.9)
    straight = make_model()
    run(straight, data, labels, loop, threads=2)
    path = tmp_path / "state.npz"
    run(make_model(), data, labels, loop, threads=2, checkpoint_path=path, stop_at=3)
    resumed = make_model()
    run(resumed, data, labels, loop, threads=2, checkpoint_path=path, resume=True)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a.data, b.data), name


@pytest.mark.parametrize("ema_power", [None, 2.0])
def test_resume_is_bitwise_exact(tmp_path, ema_power):
    data, labels = tiny_data()
    loop = LoopConfig(total_steps=8, warmup_steps=2, checkpoint_every=3, ema_decay=0.9, ema_power=ema_power)
    straight = make_model()
    r1 = run(straight, data, labels, loop)
    interrupted = make_model()
    path = tmp_path / "state.npz"
    run(interrupted, data, labels, loop, checkpoint_path=path, stop_at=4)
    resumed = make_model()
    r2 = run(resumed, data, labels, loop, checkpoint_path=path, resume=True)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    assert r1["history"] == r2["history"]
    for name in r1["ema"].shadow:
        assert np.array_equal(r1["ema"].shadow[name], r2["ema"].shadow[name]), name


def test_the_loop_numbers_a_power_emas_updates_from_one_over_the_whole_run(tmp_path):
    """With ema_power the loop passes each update its step t = 1, 2, …: the first update copies the
    weights (β_1 = 0), and after a resume t goes on from the checkpoint, not from 1 again."""
    data, labels = tiny_data()
    loop = LoopConfig(total_steps=5, warmup_steps=2, checkpoint_every=3, ema_decay=0.99, ema_power=1.0)
    seen = []

    class Spy(EMA):
        def update(self, model, step=None):
            seen.append(step)
            super().update(model, step)

    import tinydiff.train.loop as loop_module
    original, loop_module.EMA = loop_module.EMA, Spy
    try:
        model = make_model()
        path = tmp_path / "state.npz"
        first = run(model, data, labels, loop, checkpoint_path=path, stop_at=1)
        for name, p in model.named_parameters():  # one update: the average is the weights
            assert np.array_equal(first["ema"].shadow[name], p.data), name
        run(make_model(), data, labels, loop, checkpoint_path=path, resume=True)
    finally:
        loop_module.EMA = original
    assert seen == [1, 2, 3, 4, 5]


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    data, labels = tiny_data()
    model = make_model()
    path = tmp_path / "state.npz"
    loop = LoopConfig(total_steps=4, warmup_steps=1, checkpoint_every=2)
    run(model, data, labels, loop, checkpoint_path=path, stop_at=2)
    before = path.read_bytes()
    data[:] = np.nan
    with pytest.raises(TrainingDiverged, match="diverged at step 2.*last good checkpoint"):
        run(model, data, labels, loop, checkpoint_path=path, resume=True)
    assert path.read_bytes() == before
    arrays, header = load_checkpoint(path, kind="test")
    assert header["extra"]["step"] == 2 and all(np.isfinite(v).all() for v in arrays.values())


def test_diffusion_training_lowers_the_loss():
    data, labels = tiny_data(n=8)
    model = make_model()
    result = run(model, data, labels, LoopConfig(total_steps=60, lr=3e-3, warmup_steps=5, ema_decay=None))
    history = result["history"]
    assert np.mean(history[-10:]) < 0.6 * np.mean(history[:5])


def test_condition_dropout_trains_the_null_context():
    data, labels = tiny_data()
    model = make_model()
    manual_seed(0)
    before = model.unet.null_embedding.data.copy()
    grads = diffusion_grads(model.unet, data, DiffusionTrainingConfig(batch_size=16, cond_drop_prob=0.5),
                            LabelConditioning(model.label_embedding, labels))
    model.zero_grad()
    grads(0, np.random.default_rng(1))
    assert np.abs(model.unet.null_embedding.grad).sum() > 0
    assert np.abs(model.label_embedding.weight.grad).sum() > 0
    assert np.array_equal(before, model.unet.null_embedding.data)


def test_dropout_without_null_context_is_a_clear_error():
    cfg = tiny_config()
    cfg.learned_null_context = False
    unet = UNet(cfg)
    data, labels = tiny_data()
    with pytest.raises(ValueError, match="learned_null_context=True"):
        diffusion_grads(unet, data, DiffusionTrainingConfig(), LabelConditioning(Embedding(10, 8), labels))


def test_generate_digits_is_reproducible_per_sample():
    model = make_model()
    batch = generate_digits(model, [1, 2, 3], steps=3, seed=5)
    single = generate_digits(model, [3], steps=3, seed=7)  # image 2 of seed 5 is seed 7's image 0
    assert batch.shape == (3, 1, 8, 8) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[2], single[0], atol=1e-5)


def test_fast_recipe_pieces_fit_together():
    unet, loop, diffusion = fast_recipe()
    model = PixelDigitModel(unet, seed=0)
    data = np.zeros((4, 1, unet.sample_size, unet.sample_size), np.float32)
    grads = diffusion_grads(model.unet, data, diffusion, LabelConditioning(model.label_embedding, np.arange(4)))
    loss, _ = grads(0, np.random.default_rng(0))  # one step of the recipe's batch at 32×32
    assert np.isfinite(loss) and loop.total_steps > loop.warmup_steps


# --- what one step feeds the network: timesteps, their distribution, the loss weights -----------


class SpyNetwork:
    """Stands in for the U-Net in ``diffusion_grads``: records every input, outputs F = 0, and keeps
    the gradient it receives. With F = 0 that gradient is dL/dF = −(2/n)·w_b·target_b (mse_loss), so
    the step's target and weights can be read back from it."""

    def __init__(self):
        self.calls = []  # one dict per forward: x_t, t, context, mask, then dout after backward

    def __call__(self, x_t, t, context, mask):
        self.calls.append({"x_t": x_t.copy(), "t": t.copy(), "context": context, "mask": mask})
        return np.zeros_like(x_t)

    def backward(self, dout):
        self.calls[-1]["dout"] = dout.copy()
        return np.zeros_like(dout), None  # (dx, dcontext): no conditioning here


def spy_step(config, data, steps=1, seed=0):
    """Run ``steps`` training steps of ``config`` on ``data`` with the spy in place of the U-Net."""
    spy = SpyNetwork()
    step = diffusion_grads(spy, data, config)
    generator = np.random.default_rng(seed)
    losses = [step(i, generator)[0] for i in range(steps)]
    return spy, losses


def signal_and_noise_scales(x_t, x0, noise):
    """Per row b, the (a_b, s_b) with x_t[b] = a_b·x0 + s_b·noise[b], by least squares over pixels."""
    scales = []
    for xt_b, noise_b in zip(x_t, noise):
        basis = np.stack([x0.ravel(), noise_b.ravel()], axis=1)  # (pixels, 2)
        (a, s), *_ = np.linalg.lstsq(basis, xt_b.ravel(), rcond=None)
        np.testing.assert_allclose(a * x0 + s * noise_b, xt_b, rtol=0, atol=1e-12)  # an exact fit
        scales.append((a, s))
    return np.array(scales).T  # (2, B)


def test_the_network_is_told_the_timestep_of_the_noise_it_sees():
    """DDPM Algorithm 1: x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε and the network gets that same t. The noise
    level is reconstructed from x_t, x0 and ε (read back from the gradient: target = ε, w = 1)."""
    x0 = np.random.default_rng(1).uniform(-1, 1, (1, 1, 4, 4))  # one image: every row's x0
    config = DiffusionTrainingConfig(batch_size=64, cond_drop_prob=0.0)
    schedule = config.make_schedule()
    spy, _ = spy_step(config, x0)
    (call,) = spy.calls
    n = call["x_t"].size
    noise = -call["dout"] * n / 2  # dL/dF at F = 0 is −(2/n) ε
    a, s = signal_and_noise_scales(call["x_t"], x0[0], noise)
    t = call["t"]
    assert t.shape == (64,) and np.array_equal(t, np.round(t))  # integer timesteps, one per row
    t = t.astype(int)
    np.testing.assert_allclose(a**2 + s**2, 1, atol=1e-12)  # variance preserving
    np.testing.assert_allclose(a**2, schedule.alphas_cumprod[t], rtol=1e-10, atol=0)  # ᾱ of the t it is told
    assert len(set(t)) > 30  # and not one t for the whole batch


@pytest.mark.parametrize("num_timesteps", [10, 1000])
def test_training_timesteps_are_uniform_over_every_timestep(num_timesteps):
    """t ~ U{0, …, T−1} (Algorithm 1): a χ² goodness-of-fit test on 40 000 draws (fixed seed), and
    every timestep, T − 1 included, drawn at least once (each is expected 40 times or more)."""
    stats = pytest.importorskip("scipy.stats")
    config = DiffusionTrainingConfig(num_timesteps=num_timesteps, batch_size=4000, cond_drop_prob=0.0)
    spy, _ = spy_step(config, np.zeros((1, 1, 1, 1)), steps=10, seed=3)
    t = np.concatenate([call["t"] for call in spy.calls]).astype(int)
    counts = np.bincount(t, minlength=num_timesteps)
    assert counts.shape == (num_timesteps,) and t.min() == 0 and t.max() == num_timesteps - 1
    assert np.all(counts > 0), np.flatnonzero(counts == 0)
    p_value = stats.chisquare(counts).pvalue  # H0: every timestep equally likely
    assert p_value > 1e-3, p_value


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_min_snr_loss_weights_match_their_closed_form(prediction_type):
    """Min-SNR-γ (Hang et al. 2023) weights the x0 error by min(SNR, γ), SNR = ᾱ/(1 − ᾱ); on the
    network's output that is min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x0.
    Each row's weight is read back from the gradient at F = 0, dL/dF = −(2/n)·w_b·target_b."""
    gamma = 5.0
    x0 = np.random.default_rng(2).uniform(-1, 1, (1, 1, 4, 4))
    config = DiffusionTrainingConfig(batch_size=256, prediction_type=prediction_type, loss_weighting="min_snr",
                             min_snr_gamma=gamma, cond_drop_prob=0.0)
    schedule = config.make_schedule()
    spy, (loss,) = spy_step(config, x0, seed=4)
    (call,) = spy.calls
    t = call["t"].astype(int)
    alpha_bar = schedule.alphas_cumprod[t][:, None, None, None]  # (B, 1, 1, 1)
    noise = (call["x_t"] - np.sqrt(alpha_bar) * x0) / np.sqrt(1 - alpha_bar)  # ε from x_t = √ᾱ x0 + √(1−ᾱ) ε
    target = {"epsilon": noise, "sample": np.broadcast_to(x0, noise.shape),
              "v": np.sqrt(alpha_bar) * noise - np.sqrt(1 - alpha_bar) * x0}[prediction_type]
    n = target.size
    weights = -np.sum(call["dout"] * target, axis=(1, 2, 3)) * n / (2 * np.sum(target**2, axis=(1, 2, 3)))

    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    assert np.any(snr > gamma) and np.any(snr < gamma)  # rows on both sides of the clamp
    expected = {"epsilon": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
                "sample": np.minimum(snr, gamma)}[prediction_type]
    np.testing.assert_allclose(weights, expected, rtol=1e-9)
    assert loss == pytest.approx(np.sum(expected * np.sum(target**2, axis=(1, 2, 3))) / n, rel=1e-9)


def test_plain_weighting_is_one_for_every_timestep():
    x0 = np.random.default_rng(5).uniform(-1, 1, (1, 1, 4, 4))
    config = DiffusionTrainingConfig(batch_size=32, cond_drop_prob=0.0)
    spy, (loss,) = spy_step(config, x0, seed=6)
    (call,) = spy.calls
    schedule = config.make_schedule()
    alpha_bar = schedule.alphas_cumprod[call["t"].astype(int)][:, None, None, None]
    noise = (call["x_t"] - np.sqrt(alpha_bar) * x0) / np.sqrt(1 - alpha_bar)
    np.testing.assert_allclose(call["dout"], -2 / noise.size * noise, rtol=1e-9, atol=1e-15)  # w = 1, target ε
    assert loss == pytest.approx(np.mean(noise**2), rel=1e-9)


def test_the_quick_recipe_trains_byte_identical_checkpoints_twice(tmp_path):
    """Training is deterministic on one machine: two runs of the quick recipe, with the U-Net's
    batch split over this process and a worker process (threads=2), write the same bytes for
    every stage's checkpoint (weights, optimizer moments, EMA, RNG state) and for the pipeline."""
    from dataclasses import replace

    from tinydiff.train.recipes import BASE_STAGES, quick_recipe, train_mnist_captions

    config = replace(quick_recipe(), threads=2)
    for run_dir in ("a", "b"):
        train_mnist_captions(tmp_path / run_dir, stages=BASE_STAGES, config=config)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npz"))
    assert {str(f.parent) for f in files} >= {"clip", "vae", "unet", "model"}, files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
