"""The evaluation classifier (gradients, shipped weights) and the sample-quality metrics."""

import numpy as np
import pytest

from tinydiff.backend import rng, to_device
from tinydiff.data.mnist import from_model_range, load_mnist, to_model_range, train_test_split
from tinydiff.io import load_checkpoint
from tinydiff.metrics import (
    as_model_images, frechet_distance, ink_mass, mnist_fd, prompt_accuracy, real_vs_real_fd,
)
from tinydiff.models.classifier import ClassifierConfig, DigitClassifier
from tinydiff.nn import gradcheck_module
from tinydiff.train.classifier import (
    CHECKPOINT_KIND, load_classifier, pretrained_path, random_shift, save_classifier, train_classifier,
)
from tinydiff.train.loop import LoopConfig

TINY = ClassifierConfig(channels=(4, 4, 8, 8), groups=2, feature_dim=6)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def held_out():
    """The 1,000 held-out digits: uint8 (N, 28, 28) and labels (N,)."""
    images, labels = load_mnist()
    _, test_idx = train_test_split(len(images))
    return images[test_idx], labels[test_idx]


# --------------------------------------------------------------------------- the network


def test_classifier_gradients(backends):
    model = DigitClassifier(TINY, seed=3).double().to(backends)
    x = to_device(rng(1).uniform(-1, 1, (3, 1, 32, 32)), backends)
    errors = gradcheck_module(model, x, num_samples=6)
    assert set(errors) == {"input.0"} | {n for n, _ in model.named_parameters()}
    assert max(errors.values()) < 1e-6, errors


def test_shapes_config_round_trip_and_seed():
    config = ClassifierConfig.from_json(TINY.to_json())
    assert config == TINY and config.channels == (4, 4, 8, 8)
    x = rng(0).uniform(-1, 1, (5, 1, 32, 32)).astype(np.float32)
    model = DigitClassifier(config)
    assert model(x).shape == (5, 10)
    assert model.features(x, batch_size=2).shape == (5, 6)
    assert model.predict(x).shape == (5,) and model.predict(x).dtype.kind == "i"
    same = DigitClassifier(config)
    np.testing.assert_array_equal(model.features(x), same.features(x))
    with pytest.raises(ValueError, match="unknown ClassifierConfig keys: width"):
        ClassifierConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="groups"):
        ClassifierConfig(channels=(6, 8), groups=4)


def test_random_shift_moves_each_image_by_its_own_offset():
    x = np.full((40, 1, 32, 32), -1.0, dtype=np.float32)
    x[:, 0, 15, 16] = 1.0  # one ink pixel at (15, 16)
    shifted = random_shift(x, rng(0), max_shift=2)
    ys, xs = np.nonzero(shifted[:, 0] > 0)[1:]
    assert len(ys) == 40  # one pixel per image survives: nothing falls off the frame
    assert set(ys - 15) <= set(range(-2, 3)) and set(xs - 16) <= set(range(-2, 3))
    assert len(set(zip(ys, xs))) > 10  # the offsets differ between images
    assert (shifted[shifted <= 0] == -1.0).all()  # the new border is background


def test_training_learns_and_saved_weights_reload(tmp_path):
    (images, labels) = load_mnist()
    data = (to_model_range(images[:256]), labels[:256])
    loop = LoopConfig(total_steps=30, lr=3e-3, warmup_steps=5, ema_decay=None, checkpoint_every=30)
    model, result = train_classifier(TINY, loop, batch_size=64, data=data)
    assert np.mean(result["history"][-5:]) < result["history"][0]
    path = tmp_path / "clf.npz"
    save_classifier(model, path, extra={"note": "test"})
    arrays, header = load_checkpoint(path, kind=CHECKPOINT_KIND)
    assert header["config"] == TINY.to_dict() and header["extra"] == {"note": "test"}
    assert all(a.dtype == np.float32 for a in arrays.values())
    np.testing.assert_array_equal(load_classifier(path).logits(data[0]), model.logits(data[0]))


# --------------------------------------------------------------------------- the shipped weights


def test_shipped_weights_are_small_and_accurate(classifier, held_out):
    assert pretrained_path().is_file() and len(pretrained_path().read_bytes()) < 300_000
    images, labels = held_out
    accuracy = prompt_accuracy(classifier, images, labels)
    assert accuracy >= 0.98, accuracy


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    """For Σa = diag(a), Σb = diag(b): FD = ‖μa − μb‖² + Σ_i (√a_i − √b_i)².

    Samples are whitened to have exactly the wanted mean and (unbiased) covariance, so the
    estimate must equal the closed form to rounding."""
    gen = rng(0)
    n, d = 500, 4

    def exact_samples(mu, var):
        z = gen.standard_normal((n, d))
        z -= z.mean(axis=0)
        z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)  # cov(z) = I exactly
        return mu + z * np.sqrt(var)

    mu_a, var_a = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    mu_b, var_b = np.array([1.0, 1.0, 0.0, 0.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a, b = exact_samples(mu_a, var_a), exact_samples(mu_b, var_b)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_frechet_distance_general_covariances_symmetry_and_zero():
    gen = rng(1)
    a = gen.standard_normal((300, 5)) @ gen.standard_normal((5, 5))  # correlated features
    b = gen.standard_normal((200, 5)) @ gen.standard_normal((5, 5)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert abs(frechet_distance(a, a[::-1].copy())) < 1e-8  # order does not matter
    # a pure shift of the mean adds exactly ‖shift‖²
    assert frechet_distance(a, a + 2.0) == pytest.approx(5 * 4.0, rel=1e-8)
    with pytest.raises(ValueError, match="feature vectors"):
        frechet_distance(a, b[:, :3])


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's warning is expected here
def test_frechet_distance_survives_singular_covariances():
    a, b = np.zeros((50, 3)), np.zeros((50, 3))
    a[:, 0] = rng(2).standard_normal(50)  # two dead features: rank-1 covariances
    b[:, 1] = rng(3).standard_normal(50)
    assert frechet_distance(a, a + 1.0) == pytest.approx(3.0, abs=1e-6)
    # Orthogonal supports: Σa Σb = 0, so FD = ‖μa − μb‖² + Tr Σa + Tr Σb. Some SciPy versions
    # return inf for sqrtm(0); the ε = 1e-6 fallback then adds at most 2 Σ_i √(ε σ_i²) ≈ 4e-3.
    mean_term = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    expected = mean_term + np.var(a[:, 0], ddof=1) + np.var(b[:, 1], ddof=1)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-2)


# --------------------------------------------------------------------------- image metrics


def test_as_model_images_accepts_every_format(held_out):
    digits = held_out[0][:4]  # uint8 (4, 28, 28)
    x = to_model_range(digits)
    np.testing.assert_array_equal(as_model_images(digits), x)
    np.testing.assert_allclose(as_model_images(from_model_range(x, crop=False)), x, atol=1e-6)
    assert as_model_images(x) is x
    for bad in (x[:, 0], digits.astype(np.float32), x.astype(np.uint8)):
        with pytest.raises(ValueError, match="expected model-range floats"):
            as_model_images(bad)


def test_ink_mass_on_known_images():
    blank = np.zeros((3, 28, 28), dtype=np.uint8)
    assert ink_mass(blank) == 0.0
    images = blank.copy()
    images[0, :2, :] = 255  # 56 full pixels
    images[1, 5, 5] = 255  # 1 full pixel; image 2 stays blank
    assert ink_mass(images) == pytest.approx(57 / 3, rel=1e-6)
    assert ink_mass(to_model_range(images)) == pytest.approx(57 / 3, rel=1e-6)
    half = np.zeros((2, 1, 32, 32), dtype=np.float32)  # every pixel half inked: 1024 · ½
    assert ink_mass(half) == pytest.approx(512.0)
    assert ink_mass(np.full((1, 1, 32, 32), 3.0)) == 1024.0  # overshooting samples clip to full ink


def test_prompt_accuracy_counts_matches():
    class Fixed:  # a stand-in classifier that reads every image as a 7
        def predict(self, x):
            return np.full(len(x), 7)

    images = np.zeros((4, 28, 28), dtype=np.uint8)
    assert prompt_accuracy(Fixed(), images, [7, 7, 1, 7]) == 0.75
    with pytest.raises(ValueError, match="intended_labels"):
        prompt_accuracy(Fixed(), images, [7, 7])


def test_real_vs_real_fd_is_a_small_floor(classifier, held_out):
    floor = real_vs_real_fd(classifier, n=500)
    noise = rng(0).uniform(-1, 1, (500, 1, 32, 32)).astype(np.float32)
    to_noise = mnist_fd(classifier, held_out[0][:500], noise)
    assert np.isfinite(floor) and 0 < floor < 0.05 * to_noise, (floor, to_noise)
    with pytest.raises(ValueError, match="n must be"):
        real_vs_real_fd(classifier, n=1001)
