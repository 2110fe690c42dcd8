"""The shared training loop and the diffusion training step: exact resume, NaN guard, learning."""

import numpy as np
import pytest

from tinydiff.io import load_checkpoint
from tinydiff.models import UNet, UNetConfig
from tinydiff.nn import Embedding, manual_seed
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


def test_resume_is_bitwise_exact(tmp_path):
    data, labels = tiny_data()
    loop = LoopConfig(total_steps=8, warmup_steps=2, checkpoint_every=3, ema_decay=0.9)
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
