"""Pixel space, the ablation of the autoencoder: a pipeline with no VAE whose U-Net denoises the
1×32×32 pictures themselves (``PipelineConfig.space = "pixel"``), saved without vae.npz and read
back, trained by the recipe's ``space="pixel"`` (``tinydiff train mnist-scenes --space pixel``)
without a vae stage; bad combinations are one-line errors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from tinydiff.cli import main
from tinydiff.data.mnist import from_model_range
from tinydiff.data.scenes import scene_tokenizer
from tinydiff.diffusion import DiffusionConfig
from tinydiff.editing import EditInputError
from tinydiff.io import CheckpointError, sha256_file
from tinydiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from tinydiff.models.clip import TextEncoder, TextEncoderConfig
from tinydiff.models.unet import UNet, UNetConfig
from tinydiff.pipeline import PipelineConfig, SamplingDefaults, TextToImagePipeline

DAMAGED = "tampered or damaged model folder"
PROMPTS = ["a 3 left of a 7", "two 7s", "the number 42", "a small 5"]


def randomized(model, seed, scale=0.1):
    gen = np.random.default_rng(seed)
    for p in model.parameters():
        p.data += (scale * gen.standard_normal(p.shape)).astype(p.data.dtype)
    return model


def tiny_text_encoder(tokenizer):
    return randomized(TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length,
                                                    width=16, layers=1, heads=2, projection_dim=8), seed=1), 1)


def tiny_unet(tokenizer, channels: int, size: int, levels=(8, 16)):
    return randomized(UNet(UNetConfig(in_channels=channels, out_channels=channels, sample_size=size,
                                      block_channels=levels, attention_levels=(False,) * (len(levels) - 1) + (True,),
                                      context_dim=16, context_length=tokenizer.max_length, learned_null_context=True,
                                      heads=2, dim_head=4, groups=4, time_embed_dim=16), seed=2), 2)


def pixel_pipeline() -> TextToImagePipeline:
    tokenizer = scene_tokenizer()
    return TextToImagePipeline(tokenizer, tiny_text_encoder(tokenizer), tiny_unet(tokenizer, 1, 32, (4, 8, 8)), None,
                               DiffusionConfig(), SamplingDefaults(steps=2),
                               config=PipelineConfig(image_size=32, space="pixel"))


def latent_pipeline() -> TextToImagePipeline:
    tokenizer = scene_tokenizer()
    vae = randomized(AutoencoderKL(AutoencoderConfig(block_channels=(4, 8, 8), groups=4, scaling_factor=1.0), seed=3), 3)
    return TextToImagePipeline(tokenizer, tiny_text_encoder(tokenizer), tiny_unet(tokenizer, 4, 8), vae,
                               DiffusionConfig(), SamplingDefaults(steps=2), config=PipelineConfig(image_size=32))


@pytest.fixture(scope="module")
def pipe():
    return pixel_pipeline()


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("pixel") / "model"
    pipe.save_pretrained(folder)
    return folder


def manifest_of(folder) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def run(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, phrase):
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.startswith("tinydiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert phrase in lines[0], lines[0]


# --------------------------------------------------------------------------- the pipeline


def test_a_pixel_pipeline_draws_the_denoisers_output_as_the_picture(pipe):
    """No decoder: step 4 is skipped, the clean "latent" (B, 1, 32, 32) is the picture in [−1, 1]."""
    assert pipe.latent_shape(3) == (3, 1, 32, 32)
    z = np.random.default_rng(0).uniform(-1.3, 1.3, (2, 1, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(pipe.decode(z), from_model_range(z, crop=False))
    images = pipe(PROMPTS, seed=0)
    assert images.shape == (4, 32, 32) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 4  # the prompt matters


def test_a_pixel_folder_has_no_vae_file_and_reads_back_the_same_pictures(pipe, pixel_folder):
    assert not (pixel_folder / "vae.npz").exists()
    manifest = manifest_of(pixel_folder)
    assert manifest["pipeline"] == {"image_size": 32, "conditioning": "tokens", "space": "pixel"}
    assert "vae" not in manifest["files"]
    loaded = TextToImagePipeline.from_pretrained(pixel_folder)
    assert loaded.vae is None and loaded.config.space == "pixel"
    np.testing.assert_array_equal(loaded(PROMPTS, seed=3), pipe(PROMPTS, seed=3))


def test_a_latent_folder_without_its_vae_is_refused_not_read_as_pixels(tmp_path):
    folder = tmp_path / "latent"
    latent_pipeline().save_pretrained(folder)
    manifest = manifest_of(folder)
    del manifest["files"]["vae"]
    (folder / "vae.npz").unlink()
    (folder / "model_index.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'vae' is not listed") as info:
        TextToImagePipeline.from_pretrained(folder)
    assert DAMAGED in str(info.value)


def test_a_pixel_manifest_that_lists_a_vae_is_refused(pixel_folder, tmp_path):
    folder = shutil.copytree(pixel_folder, tmp_path / "model")
    donor = tmp_path / "latent"
    latent_pipeline().save_pretrained(donor)
    shutil.copy(donor / "vae.npz", folder / "vae.npz")
    manifest = manifest_of(folder)
    manifest["files"]["vae"] = {"path": "vae.npz", "sha256": sha256_file(folder / "vae.npz")}
    (folder / "model_index.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"unknown entry 'vae'"):
        TextToImagePipeline.from_pretrained(folder)


def test_the_space_and_the_vae_must_agree():
    latent, pixel = latent_pipeline(), pixel_pipeline()
    with pytest.raises(ValueError, match="pixel-space pipeline"):
        TextToImagePipeline(pixel.tokenizer, pixel.text_encoder, pixel.unet, latent.vae, DiffusionConfig(),
                            config=PipelineConfig(image_size=32, space="pixel"))
    with pytest.raises(ValueError, match="a latent one needs one"):
        TextToImagePipeline(latent.tokenizer, latent.text_encoder, latent.unet, None, DiffusionConfig(),
                            config=PipelineConfig(image_size=32))
    with pytest.raises(ValueError, match="space must be one of latent, pixel"):
        PipelineConfig(space="voxel")


def test_the_editors_refuse_a_pixel_pipeline_in_one_sentence(pipe):
    digit = np.zeros((28, 28), np.uint8)
    with pytest.raises(EditInputError, match="draws pixels, not latents"):
        pipe.img2img(digit, "a small 5")


def test_pipeline_cost_counts_no_decoder_in_pixel_space(pipe):
    from tinydiff.cost import pipeline_cost

    cost = pipeline_cost(pipe, steps=20)
    assert cost["decoder_gflop"] == 0 and cost["denoiser_gflop_per_row"] > 0
    expected = 20 * 2 * cost["denoiser_gflop_per_row"] + cost["text_encoder_gflop"]
    assert cost["gflop_per_image"] == pytest.approx(expected)


# --------------------------------------------------------------------------- training


def test_the_recipe_trains_the_unet_on_the_pictures_with_no_vae_stage(tmp_path, monkeypatch):
    """space="pixel": stages clip and unet; the U-Net of pixel_space_unet_config is trained on the
    training images themselves (a spy on diffusion_grads), and the pipeline saved has no VAE."""
    from tinydiff.train import latent_unet
    from tinydiff.train.recipes import quick_recipe, recipe_stages, train_mnist_captions

    config = replace(quick_recipe(), data="scenes", space="pixel", threads=1)
    assert recipe_stages(config) == ("clip", "unet")
    assert recipe_stages(replace(config, encoders="somewhere")) == ("unet",)
    seen = []
    grads = latent_unet.diffusion_grads

    def spy(unet, latents, *args, **kwargs):
        seen.append((unet.config, latents))
        return grads(unet, latents, *args, **kwargs)

    monkeypatch.setattr(latent_unet, "diffusion_grads", spy)
    pipe = train_mnist_captions(tmp_path / "run", config=config)
    (unet_config, latents), = seen
    assert unet_config == latent_unet.pixel_space_unet_config(unet_config.context_dim, unet_config.context_length)
    from tinydiff.train.recipes import _training_data
    np.testing.assert_array_equal(latents, _training_data(config)[0].images)  # (N, 1, 32, 32) in [−1, 1]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["clip", "model", "unet"]
    assert pipe.vae is None and pipe.config.space == "pixel" and pipe.latent_shape(1) == (1, 1, 32, 32)
    assert TextToImagePipeline.from_pretrained(tmp_path / "run" / "model").config.space == "pixel"


def test_pixel_recipe_is_the_latent_recipe_in_pixel_space_with_min_snr():
    from tinydiff.train.recipes import RecipeConfig, pixel_recipe

    config = pixel_recipe()
    assert (config.space, config.loss_weighting, config.unet_lr) == ("pixel", "min_snr", 2e-3)
    assert replace(config, space="latent", loss_weighting="plain", unet_lr=1e-3) == RecipeConfig()  # nothing else


def test_the_recipe_refuses_a_pixel_dit_and_latent_training_on_pixel_encoders(tmp_path, pixel_folder):
    from tinydiff.train.recipes import RecipeError, quick_recipe, train_mnist_captions

    config = replace(quick_recipe(), data="scenes", threads=1)
    with pytest.raises(RecipeError, match="pixel space is built for the U-Net"):
        train_mnist_captions(tmp_path / "a", config=replace(config, space="pixel", denoiser="dit"))
    with pytest.raises(RecipeError, match="unknown space 'voxel'"):
        train_mnist_captions(tmp_path / "b", config=replace(config, space="voxel"))
    with pytest.raises(RecipeError, match="is a pixel-space pipeline: it has no VAE"):
        train_mnist_captions(tmp_path / "c", config=replace(config, encoders=str(pixel_folder)))


def test_cli_trains_pixel_space_on_a_finished_runs_text_encoder(tmp_path, capsys):
    encoders = tmp_path / "encoders"
    latent_pipeline().save_pretrained(encoders)
    out = tmp_path / "pixel"
    status, _, err = run(capsys, "train", "mnist-scenes", "--quick", "--space", "pixel", "--encoders", encoders,
                         "--threads", 1, "--out", out)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["model", "unet"]
    assert not (out / "model" / "vae.npz").exists()
    assert sha256_file(out / "model" / "text_encoder.npz") == sha256_file(encoders / "text_encoder.npz")
    status, _, err = run(capsys, "sample", "a 3 left of a 7", "--model", out / "model", "--output",
                         tmp_path / "s.npy", "--steps", 2)
    assert status == 0, err
    assert np.load(tmp_path / "s.npy").shape[-2:] == (32, 32)
    for args, phrase in ((["--space", "voxel"], "--space must be latent or pixel"),
                         (["--space", "pixel", "--denoiser", "dit"], "--space pixel trains a U-Net")):
        status, _, err = run(capsys, "train", "mnist-scenes", "--quick", *args, "--out", tmp_path / "bad")
        assert_one_line_error(status, err, phrase)


def test_the_shipped_pixel_model_loads_by_name_and_draws_small_digits():
    """mnist-scenes-pixel: no VAE, the scenes' vocabulary, and "a small d" drawn as a digit the
    classifier reads (its card: 98% over 200 prompts; here 10 prompts, 8 steps)."""
    from tinydiff.evaluate_scenes import read_slot
    from tinydiff.train.classifier import load_classifier

    pipe = TextToImagePipeline.from_pretrained("mnist-scenes-pixel")
    assert pipe.vae is None and pipe.config.space == "pixel" and pipe.image_size == 32
    assert pipe.tokenizer.words == TextToImagePipeline.from_pretrained("mnist-scenes").tokenizer.words
    images = pipe([f"a small {d}" for d in range(10)], seed=0, steps=8)
    reads = read_slot(load_classifier(), images, "canvas")
    assert (reads == np.arange(10)).mean() >= 0.7, reads
