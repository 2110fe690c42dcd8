"""Editing (tinydiff.editing): img2img's strength, RePaint inpainting and DDIM inversion, checked
against closed forms (Gaussian data, exact denoisers) and with the shipped pipeline, plus the
one-line errors for every bad input."""

import copy
import dataclasses

import numpy as np
import pytest
from mixture import GaussianMixture, gaussian, gaussian_ode_solution
from PIL import Image

from tinydiff import editing
from tinydiff.backend import to_numpy
from tinydiff.data.mnist import from_model_range, to_model_range
from tinydiff.diffusion import get_sigmas, karras_sigmas, per_sample_generators, randn_per_sample, sample_ddim
from tinydiff.editing import EditInputError
from tinydiff.pipeline import TextToImagePipeline
from tinydiff.text.captions import DIGIT_WORDS

MU, S = 0.3, 0.5
GAUSSIAN = gaussian(MU, S)
MIXTURE = GaussianMixture([0.3, 0.7], [-1.0, 1.0], [0.25, 0.4])
SIGMA_MIN, SIGMA_MAX = 0.01, 14.6


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


@pytest.fixture(scope="module")
def digits():
    images, labels = editing.held_out_digits(4, seed=3)
    return images, labels


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, dtype=np.float64) - b) ** 2)))


# --- image-to-image ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, strength, kept", [(20, 0.6, 12), (20, 0.05, 1), (20, 0.04, 0), (20, 1.0, 20),
                                               (20, 0.0, 0), (100, 0.29, 29), (7, 0.5, 3)])
def test_strength_keeps_the_last_floor_strength_n_steps(n, strength, kept):
    sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)
    tail = editing.strength_sigmas(sigmas, strength)
    np.testing.assert_array_equal(tail, sigmas[n - kept:])
    assert len(tail) == kept + 1 and tail[-1] == 0


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
def test_strength_1_is_text_to_image_bit_for_bit(pipe, digits, sampler):
    images, _ = digits
    prompts = ["a handwritten three", "an 8", "a bold 5", "a 0"]
    expected, z_expected = pipe(prompts, seed=11, steps=6, sampler=sampler, return_latents=True)
    got, z_got = editing.img2img(pipe, images, prompts, 1.0, seed=11, steps=6, sampler=sampler, return_latents=True)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(z_got, z_expected)


def test_strength_0_is_the_vae_round_trip(pipe, digits):
    images, _ = digits
    pipe.threads = 1  # the reference below decodes the whole batch at once
    try:
        got = editing.img2img(pipe, images, "a handwritten three", 0.0, seed=0)
        reference = pipe.vae.decode_from_diffusion(pipe.vae.encode_for_diffusion(to_model_range(images)))
        np.testing.assert_array_equal(got, from_model_range(reference))
    finally:
        pipe.threads = None
    assert np.abs(got.astype(int) - images).mean() < 20  # the round trip keeps the digit


def test_img2img_starts_from_the_latent_noised_to_the_kept_sigma(pipe, digits):
    images, _ = digits
    steps, strength, seed = 10, 0.5, 4
    seen = []
    editing.img2img(pipe, images[:2], "an 8", strength, steps=steps, seed=seed, sampler="euler",
                    callback=lambda info: seen.append(info))
    sigmas = get_sigmas(pipe.schedule, steps, "karras", sigma_max=pipe.defaults.sigma_max)
    assert [info["sigma"] for info in seen] == list(sigmas[5:-1])  # the last 5 of 10 steps
    eps = randn_per_sample(per_sample_generators(seed, 2), (2, 4, 8, 8))
    z0 = editing.encode(pipe, images[:2])
    np.testing.assert_array_equal(seen[0]["x"], z0 + eps * float(sigmas[5]))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])
def test_latents_given_as_the_seeded_noise_are_the_pipeline(pipe, sampler):
    """With the seed's own draw as latents, every sampler (ddpm: its step noise too) gives pipe(seed=…)."""
    noise = randn_per_sample(per_sample_generators(5, 3), (3, 4, 8, 8))
    expected = pipe("a thin 7", num_images=3, seed=5, steps=5, sampler=sampler)
    got = pipe("a thin 7", latents=noise, seed=5, steps=5, sampler=sampler)  # num_images from the latents
    np.testing.assert_array_equal(got, expected)


def test_latents_start_the_loop_at_sigma_0_times_the_noise(pipe):
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    seen = []
    pipe(["a 1", "a 2"], latents=noise, steps=3, sampler="euler", callback=seen.append)
    sigma_0 = pipe.defaults.sigma_max  # the karras grid starts at the default σ_max
    assert seen[0]["sigma"] == pytest.approx(sigma_0)
    np.testing.assert_allclose(seen[0]["x"], noise * np.float32(seen[0]["sigma"]), rtol=1e-6)
    one = pipe("a 1", latents=noise[0], steps=3, sampler="euler")  # one (4, 8, 8) latent: one image
    assert one.shape == (1, 28, 28)


def test_pipeline_methods_pass_their_options_to_the_editors(pipe, digits):
    images, labels = digits
    images, prompts = images[:2], [f"a {d}" for d in labels[:2]]
    np.testing.assert_array_equal(pipe.img2img(images, prompts, 0.5, steps=4, seed=1),
                                  editing.img2img(pipe, images, prompts, 0.5, steps=4, seed=1))
    assert not np.array_equal(pipe.img2img(images, prompts, 0.5, steps=4, seed=1),
                              pipe.img2img(images, prompts, 0.75, steps=4, seed=1))
    mask = editing.bottom_half_mask(2)
    for jumps, eta in [(1, 1.0), (0, 0.5)]:
        np.testing.assert_array_equal(pipe.inpaint(images, mask, prompts, jumps=jumps, eta=eta, steps=3, seed=2),
                                      editing.inpaint(pipe, images, mask, prompts, jumps=jumps, eta=eta, steps=3, seed=2))
    assert not np.array_equal(pipe.inpaint(images, mask, prompts, jumps=1, steps=3, seed=2),
                              pipe.inpaint(images, mask, prompts, steps=3, seed=2))
    assert not np.array_equal(pipe.inpaint(images, mask, prompts, eta=0.5, steps=3, seed=2),
                              pipe.inpaint(images, mask, prompts, steps=3, seed=2))
    refined = pipe.invert(images, prompts, steps=3, guidance_scale=1.5, iterations=1)
    np.testing.assert_array_equal(refined, editing.invert(pipe, images, prompts, steps=3, guidance_scale=1.5,
                                                          iterations=1))
    assert not np.array_equal(refined, pipe.invert(images, prompts, steps=3, guidance_scale=1.5))
    assert not np.array_equal(refined, pipe.invert(images, prompts, steps=3, iterations=1))
    assert refined.shape == (2, 4, 8, 8)


# --- inversion --------------------------------------------------------------------------------

STEPS = [8, 16, 32, 64, 128]


def test_inversion_of_gaussian_data_converges_to_the_exact_ode_solution():
    x0 = MU + S * np.random.default_rng(0).standard_normal((64, 1))
    exact = gaussian_ode_solution(x0, 0.0, SIGMA_MAX, MU, S)
    errors = [rms(editing.invert_latents(GAUSSIAN.denoise, x0, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)), exact)
              for n in STEPS]
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < errors[0] / 5 and errors[-2] / errors[-1] > 1.6, errors  # towards first order


def test_inversion_then_ddim_reconstructs_mixture_data_better_with_more_steps():
    rng = np.random.default_rng(1)
    x0 = rng.choice([-1.0, 1.0], size=(64, 1)) + 0.3 * rng.standard_normal((64, 1))
    errors, refined = [], []
    for n in STEPS:
        sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)
        z = editing.invert_latents(MIXTURE.denoise, x0, sigmas)
        errors.append(rms(sample_ddim(MIXTURE.denoise, z, sigmas), x0))
        z = editing.invert_latents(MIXTURE.denoise, x0, sigmas, iterations=3)
        refined.append(rms(sample_ddim(MIXTURE.denoise, z, sigmas), x0))
    assert np.all(np.diff(errors) < 0) and errors[-1] < errors[0] / 5, errors
    # fixed-point refinement inverts the DDIM step itself: far smaller error, falling fast
    assert all(r < e / 10 for r, e in zip(refined, errors)) and refined[-1] < 1e-4, refined


def test_inversion_evaluates_the_noise_at_the_upper_sigma_of_each_step():
    """x_σ = x_σ' + (σ − σ') ε̂(x_σ', σ): the denoiser sees the known point at the step's upper σ."""
    sigmas = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    calls = []

    def denoiser(x, sigma):
        calls.append((x.copy(), sigma))
        return MIXTURE.denoise(x, sigma)

    z0 = np.linspace(-1.5, 1.5, 6).reshape(6, 1)
    out = editing.invert_latents(denoiser, z0, sigmas)
    assert [sigma for _, sigma in calls] == list(sigmas[:-1][::-1])  # σ_{n−1}, …, σ_0
    x = z0
    for (seen, sigma), lower in zip(calls, sigmas[1:][::-1]):  # the steps σ' → σ, by hand
        np.testing.assert_array_equal(seen, x)
        x = x + (sigma - lower) * ((x - MIXTURE.denoise(x, sigma)) / sigma)
    np.testing.assert_allclose(out, x, rtol=1e-12)


def test_inversion_with_the_shipped_model_reconstructs_better_with_more_steps(pipe, digits):
    images, labels = digits
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in labels]
    z0 = to_numpy(editing.encode(pipe, images))
    errors = []
    for steps in (10, 20, 50):
        noise = editing.invert(pipe, images, prompts, steps=steps)
        _, z = pipe(prompts, latents=noise, sampler="ddim", steps=steps, guidance_scale=1.0, return_latents=True)
        errors.append(rms(z, z0))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.6 * errors[0], errors


# --- inpainting -------------------------------------------------------------------------------


def test_inpaint_latents_keep_the_known_cells_at_every_step_and_sample_the_rest():
    """Independent Gaussian elements: the masked elements must come out ~ N(μ, s²) whatever the
    known ones are (here far from the data), while the known ones follow z0 + σ ε exactly."""
    batch, shape = 400, (400, 2, 3, 3)
    z0 = np.full(shape, 5.0)
    mask = np.zeros((batch, 1, 3, 3), dtype=bool)
    mask[:, :, :, 1:] = True  # regenerate columns 1–2 of both channels
    n = 400  # ancestral steps with an exact D lose O(1/n) of the variance (test_samplers)
    sigmas = karras_sigmas(n, SIGMA_MIN, 10.0)
    for jumps in (0, 2):
        seen = []
        out = editing.inpaint_latents(GAUSSIAN.denoise, z0, mask, sigmas, rng=3, jumps=jumps,
                                      callback=lambda info: seen.append(info))
        assert len(seen) == n * (jumps + 1)
        keep = np.broadcast_to(~mask, shape)
        for info in seen:
            np.testing.assert_array_equal(info["x"][keep], info["known"][keep])
        noise = np.stack([(info["known"] - z0)[keep] / info["sigma"] for info in seen])  # known cells: z0 + σ ε
        assert noise.std(axis=1).min() > 0.9 and abs(noise.std() - 1) < 0.01 and abs(noise.mean()) < 0.01
        assert abs(np.corrcoef(noise[:-1].ravel(), noise[1:].ravel())[0, 1]) < 0.01  # fresh ε every step
        np.testing.assert_array_equal(out[keep], z0[keep])
        generated = out[np.broadcast_to(mask, shape)]
        assert abs(generated.mean() - MU) < 0.02 and abs(generated.std() - S) < 0.02, (jumps, generated.std())


def test_latent_mask_max_pools_the_padded_pixel_mask():
    mask = np.zeros((3, 28, 28), dtype=bool)
    mask[0, 0, 0] = True  # → padded (2, 2) → cell (0, 0)
    mask[1, 27, 27] = True  # → (29, 29) → cell (7, 7)
    mask[2, 2, 5] = True  # → (4, 7) → cell (1, 1)
    cells = editing.latent_mask(mask, 4)
    assert cells.shape == (3, 1, 8, 8) and cells.sum() == 3
    assert cells[0, 0, 0, 0] and cells[1, 0, 7, 7] and cells[2, 0, 1, 1]


def test_inpainting_with_the_shipped_model_keeps_the_known_latent_and_pixels(pipe, digits):
    images, labels = digits
    mask = editing.bottom_half_mask(len(images))
    seen = []
    out, z = editing.inpaint(pipe, images, mask, [f"a {d}" for d in labels], steps=8, jumps=1, seed=2,
                             return_latents=True, callback=lambda info: seen.append(info))
    keep = np.broadcast_to(~editing.latent_mask(mask, 4), z.shape)  # (4, 4, 8, 8): latent rows 0–3
    assert keep[:, :, :4].all() and not keep[:, :, 4:].any()
    assert len(seen) == 16
    for info in seen:
        np.testing.assert_array_equal(info["x"][keep], info["known"][keep])
        assert rms(info["known"][keep], to_numpy(editing.encode(pipe, images))[keep]) > 0.5 * info["sigma"]
    np.testing.assert_array_equal(z[keep], to_numpy(editing.encode(pipe, images))[keep])
    np.testing.assert_array_equal(out[~mask], images[~mask])
    assert not np.array_equal(out[mask], images[mask])  # the bottom half was redrawn


# --- inputs -----------------------------------------------------------------------------------


def test_pictures_npy_files_and_arrays_load_as_uint8_digits(tmp_path, digits):
    images, _ = digits
    Image.fromarray(images[0]).save(tmp_path / "d.png")
    np.testing.assert_array_equal(editing.load_images(tmp_path / "d.png"), images[:1])  # 28×28: untouched
    big = np.kron(images[0], np.ones((3, 3), dtype=np.uint8))  # (84, 84)
    Image.fromarray(np.stack([big] * 3, axis=-1)).save(tmp_path / "big.png")  # RGB
    loaded = editing.load_images(str(tmp_path / "big.png"))
    assert loaded.shape == (1, 28, 28) and loaded.dtype == np.uint8
    assert np.abs(loaded.astype(int) - images[0]).mean() < 8  # Lanczos back down to about the digit
    Image.fromarray(np.zeros((40, 80), np.uint8)).save(tmp_path / "ink.png")  # black ink all over a 40×80 picture
    wide = editing.load_images(tmp_path / "ink.png", invert=True)[0]  # inverted, padded to 80×80, resized
    assert wide[:5].max() <= 3 and wide[-5:].max() <= 3 and wide[8:20].min() >= 250, wide[:, 0]  # not stretched
    np.save(tmp_path / "d.npy", images)
    np.testing.assert_array_equal(editing.load_images(tmp_path / "d.npy"), images)
    np.testing.assert_array_equal(editing.load_images(images[1]), images[1:2])


def test_masks_load_from_pictures_and_arrays(tmp_path):
    mask = editing.bottom_half_mask(1)
    for form in (mask, mask.astype(np.uint8), mask.astype(np.uint8) * 255, mask.astype(np.float32), mask[0]):
        np.testing.assert_array_equal(editing.load_masks(form), mask)
    Image.fromarray(np.kron(mask[0].astype(np.uint8) * 255, np.ones((2, 2), dtype=np.uint8))).save(tmp_path / "m.png")
    np.testing.assert_array_equal(editing.load_masks(tmp_path / "m.png"), mask)


def _bad_inputs(tmp_path, pipe, images):
    (tmp_path / "notes.png").write_text("not a picture")
    np.save(tmp_path / "flat.npy", np.arange(784, dtype=np.uint8))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    Image.fromarray(images[0]).save(tmp_path / "d.png")
    Image.fromarray(np.zeros((28, 40), np.uint8)).save(tmp_path / "wide_mask.png")
    mask = editing.bottom_half_mask(4)
    lcm_default = copy.copy(pipe)  # the shipped model with lcm as its default sampler: no editor may use it
    lcm_default.defaults = dataclasses.replace(pipe.defaults, sampler="lcm")
    unreadable = "cannot be read as a NumPy array"
    return [
        ("32×32 array", lambda: editing.img2img(pipe, np.zeros((32, 32), np.uint8), "a 3"), "28×28"),
        ("float image", lambda: editing.img2img(pipe, images.astype(np.float32), "a 3"), "uint8"),
        ("missing file", lambda: editing.img2img(pipe, tmp_path / "nope.png", "a 3"), "no such file"),
        ("text as png", lambda: editing.img2img(pipe, tmp_path / "notes.png", "a 3"), "not a readable image"),
        ("broken npy", lambda: editing.img2img(pipe, tmp_path / "broken.npy", "a 3"), unreadable),
        ("1-D npy", lambda: editing.img2img(pipe, tmp_path / "flat.npy", "a 3"), "must be 28×28"),
        ("pickled npy", lambda: editing.img2img(pipe, tmp_path / "objects.npy", "a 3"), unreadable),
        ("strength 1.5", lambda: editing.img2img(pipe, images, "a 3", 1.5), "strength"),
        ("prompt count", lambda: editing.img2img(pipe, images, ["a 3", "a 4"]), "2 prompts for a batch of 4"),
        ("mask count", lambda: editing.inpaint(pipe, images, mask[:3], "a 3"), "3 masks for 4 images"),
        ("mask shape", lambda: editing.inpaint(pipe, images, np.ones((4, 8, 8), bool), "a 3"), "28×28"),
        ("mask values", lambda: editing.inpaint(pipe, images, np.full((28, 28), 2.0), "a 3"), "mask must be"),
        ("mask size", lambda: editing.inpaint(pipe, tmp_path / "d.png", tmp_path / "wide_mask.png", "a 3"),
         "the mask is 40×28 pixels but the picture is 28×28"),
        ("img2img lcm", lambda: editing.img2img(pipe, images, "a 3", sampler="lcm"), "not lcm"),
        ("img2img default lcm", lambda: editing.img2img(lcm_default, images, "a 3"), "not lcm"),
        ("inpaint default lcm", lambda: editing.inpaint(lcm_default, images, mask, "a 3"), "inpaint runs"),
        ("invert default lcm", lambda: editing.invert(lcm_default, images, "a 3"), "invert runs"),
        ("negative jumps", lambda: editing.inpaint(pipe, images, mask, "a 3", jumps=-1), "jumps"),
        ("latent shape", lambda: pipe("a 3", latents=np.zeros((2, 4, 4, 4))), "latents"),
        ("latent count", lambda: pipe(["a 3"] * 3, latents=np.zeros((2, 4, 8, 8))), "3 prompts for 2 latents"),
        ("iterations", lambda: editing.invert(pipe, images, "a 3", iterations=-2), "iterations"),
    ]


def test_every_bad_input_is_a_one_line_edit_input_error(tmp_path, pipe, digits):
    images, _ = digits
    for name, call, words in _bad_inputs(tmp_path, pipe, images):
        with pytest.raises(EditInputError) as error:
            call()
        message = str(error.value)
        assert words in message and "\n" not in message, (name, message)
        assert isinstance(error.value, ValueError)
