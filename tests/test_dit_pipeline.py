"""A pipeline whose denoiser is a DiT: saved, verified and loaded like the U-Net's, selected by
name, trained by the recipe (``denoiser="dit"``), and mirrored by the PyTorch twin.

The folder tests build a small DiT on the shipped pipeline's text encoder and VAE, so they run in
seconds; the shipped DiT folder (``mnist-captions-dit``) is loaded by name in its own tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinydiff.io import CheckpointError
from tinydiff.models.dit import DiT, DiTConfig
from tinydiff.models.unet import UNet
from tinydiff.pipeline import PRETRAINED_MODELS, TextToImagePipeline, pretrained_path

DAMAGED = "tampered or damaged model folder"
SMALL = DiTConfig(width=32, depth=2, heads=2, timestep_dim=32)


def randomized(model, seed=0, scale=0.05):
    """A fresh DiT outputs exactly 0 (adaLN-Zero): move every weight off its start so that images
    depend on all of them."""
    gen = np.random.default_rng(seed)
    for p in model.parameters():
        p.data += (scale * gen.standard_normal(p.shape)).astype(p.data.dtype)
    return model


@pytest.fixture(scope="module")
def shipped():
    return TextToImagePipeline.from_pretrained()


@pytest.fixture
def dit_pipe(shipped):
    return TextToImagePipeline(shipped.tokenizer, shipped.text_encoder, randomized(DiT(SMALL)), shipped.vae,
                               shipped.diffusion, shipped.defaults, image_encoder=shipped.image_encoder)


@pytest.fixture
def dit_folder(dit_pipe, tmp_path):
    dit_pipe.save_pretrained(tmp_path / "dit-model")
    return tmp_path / "dit-model"


def manifest_of(folder) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def write_manifest(folder, manifest) -> None:
    (folder / "model_index.json").write_text(json.dumps(manifest, indent=2))


def assert_refused(folder, *phrases):
    with pytest.raises(CheckpointError) as info:
        TextToImagePipeline.from_pretrained(folder)
    message = str(info.value)
    assert DAMAGED in message and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


# --------------------------------------------------------------------------- the folder


def test_a_dit_pipeline_saves_and_loads_as_a_dit(dit_pipe, dit_folder):
    manifest = manifest_of(dit_folder)
    assert manifest["denoiser"] == "dit"
    assert set(manifest["files"]) == {"tokenizer", "text_encoder", "dit", "vae", "image_encoder"}
    assert (dit_folder / "dit.npz").is_file() and not (dit_folder / "unet.npz").exists()
    again = TextToImagePipeline.from_pretrained(dit_folder)
    assert isinstance(again.denoiser_net, DiT) and again.denoiser_type == "dit"
    assert again.unet is again.denoiser_net  # the U-Net-era name is an alias of the denoiser network
    assert again.denoiser_net.config == SMALL
    assert again.backend == "numpy"
    np.testing.assert_array_equal(again("a bold 4", num_images=2, steps=3, seed=5),
                                  dit_pipe("a bold 4", num_images=2, steps=3, seed=5))


def test_the_shipped_unet_folder_still_loads_as_a_unet(shipped):
    assert isinstance(shipped.denoiser_net, UNet) and shipped.denoiser_type == "unet"
    assert shipped.unet is shipped.denoiser_net


def test_a_manifest_without_the_denoiser_field_is_a_unet_pipeline(tmp_path):
    """Folders written before the DiT have no "denoiser" field: they still load, as U-Nets."""
    folder = tmp_path / "old"
    shutil.copytree(pretrained_path(), folder)
    manifest = manifest_of(folder)
    manifest.pop("denoiser", None)
    write_manifest(folder, manifest)
    assert isinstance(TextToImagePipeline.from_pretrained(folder).denoiser_net, UNet)


def test_a_unet_pipeline_records_its_denoiser(shipped, tmp_path):
    shipped.save_pretrained(tmp_path / "again")
    manifest = manifest_of(tmp_path / "again")
    assert manifest["denoiser"] == "unet" and "unet" in manifest["files"] and "dit" not in manifest["files"]
    assert isinstance(TextToImagePipeline.from_pretrained(tmp_path / "again").denoiser_net, UNet)


def test_a_dit_folder_whose_manifest_drops_the_denoiser_field_is_refused(dit_folder):
    manifest = manifest_of(dit_folder)
    del manifest["denoiser"]  # now read as a U-Net pipeline: "dit" is unknown and "unet" missing
    write_manifest(dit_folder, manifest)
    assert_refused(dit_folder, "'unet' is not listed", "unknown entry 'dit'")


def test_a_dit_manifest_listing_the_unet_file_is_refused(dit_folder):
    manifest = manifest_of(dit_folder)
    manifest["files"]["unet"] = manifest["files"].pop("dit")
    write_manifest(dit_folder, manifest)
    assert_refused(dit_folder, "'dit' is not listed", "unknown entry 'unet'")


def test_an_unknown_denoiser_type_is_refused(dit_folder):
    manifest = manifest_of(dit_folder)
    manifest["denoiser"] = "vit"
    write_manifest(dit_folder, manifest)
    assert_refused(dit_folder, "'vit'")


def test_a_dit_file_under_the_unet_name_is_refused(dit_folder, tmp_path):
    """dit.npz renamed to unet.npz and listed as a U-Net: the checkpoint's kind says dit."""
    manifest = manifest_of(dit_folder)
    del manifest["denoiser"]
    shutil.move(dit_folder / "dit.npz", dit_folder / "unet.npz")
    entry = manifest["files"].pop("dit")
    manifest["files"]["unet"] = {"path": "unet.npz", "sha256": entry["sha256"]}
    write_manifest(dit_folder, manifest)
    with pytest.raises(CheckpointError):
        TextToImagePipeline.from_pretrained(dit_folder)


def test_a_tampered_dit_file_is_refused(dit_folder):
    with open(dit_folder / "dit.npz", "r+b") as f:
        f.seek(-20, 2)
        byte = f.read(1)
        f.seek(-20, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert_refused(dit_folder, "dit.npz does not match its sha256")


# --------------------------------------------------------------------------- shipped, by name


def test_pretrained_names():
    assert PRETRAINED_MODELS == ("mnist-captions", "mnist-captions-dit", "mnist-scenes", "mnist-scenes-contrastive",
                                 "mnist-scenes-pooled", "mnist-scenes-pixel")
    assert pretrained_path() == pretrained_path("mnist-captions")
    assert pretrained_path("mnist-captions-dit").name == "mnist-captions-dit"
    with pytest.raises(ValueError, match="mnist-captions, mnist-captions-dit"):
        pretrained_path("mnist-captions-vit")


def test_the_shipped_dit_loads_by_name_and_draws_the_digit_asked_for():
    from tinydiff.metrics import prompt_accuracy
    from tinydiff.train.classifier import load_classifier

    pipe = TextToImagePipeline.from_pretrained("mnist-captions-dit")
    assert isinstance(pipe.denoiser_net, DiT)
    assert (pretrained_path("mnist-captions-dit") / "training.json").is_file()
    labels = np.arange(10)
    images = pipe([f"a handwritten {d}" for d in labels], steps=10, seed=0)
    assert prompt_accuracy(load_classifier(), images, labels) >= 0.8


def test_a_folder_named_like_a_shipped_model_is_read_as_a_folder_when_given_as_a_path(dit_folder, tmp_path):
    local = tmp_path / "mnist-captions-dit"
    shutil.copytree(dit_folder, local)
    assert TextToImagePipeline.from_pretrained(local).denoiser_net.config == SMALL
    assert TextToImagePipeline.from_pretrained("mnist-captions-dit").denoiser_net.config != SMALL


# --------------------------------------------------------------------------- the recipe and the CLI


def test_the_recipe_trains_a_dit_on_the_encoders_of_a_pipeline_folder(tmp_path):
    from tinydiff.train.recipes import RecipeError, quick_recipe, train_mnist_captions

    config = quick_recipe()
    config.threads, config.denoiser, config.encoders = 1, "dit", str(pretrained_path())
    pipe = train_mnist_captions(tmp_path, stages=("dit",), config=config)
    assert isinstance(pipe.denoiser_net, DiT)
    assert (tmp_path / "dit" / "state.npz").is_file() and not (tmp_path / "clip").exists()
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "model-dit")
    assert loaded.denoiser_type == "dit" and not (tmp_path / "model").exists()
    shipped = TextToImagePipeline.from_pretrained()
    for a, b in zip(loaded.text_encoder.state_dict().values(), shipped.text_encoder.state_dict().values()):
        np.testing.assert_array_equal(a, b)
    record = json.loads((tmp_path / "recipe.json").read_text())
    assert set(record["seconds"]) == {"dit"} and record["config"]["denoiser"] == "dit"
    with pytest.raises(RecipeError, match="--encoders"):
        train_mnist_captions(tmp_path / "other", stages=("clip", "dit"), config=config)
    config.encoders = None
    with pytest.raises(RecipeError, match="unknown stage"):
        train_mnist_captions(tmp_path / "other", stages=("unet",), config=config)


def tinydiff(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tinydiff.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


def test_cli_samples_the_shipped_dit_by_name(tmp_path):
    out = tmp_path / "dit.png"
    result = tinydiff("sample", "a bold 7", "--model", "mnist-captions-dit", "--num-images", "2", "--steps", "3",
                      "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file()


def test_cli_names_the_shipped_models_in_help_and_info_and_refuses_an_unknown_one(tmp_path):
    help_text = tinydiff("sample", "--help").stdout
    info = tinydiff("info").stdout
    for name in PRETRAINED_MODELS:
        assert name in "".join(help_text.split()) and name in info  # argparse may wrap a name at its hyphen
    result = tinydiff("sample", "a 7", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.png"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mnist-captions-dit" in lines[0], result.stderr


def test_cli_train_takes_denoiser_dit_and_steps(tmp_path):
    from tinydiff.io import load_checkpoint

    result = tinydiff("train", "mnist-captions", "--quick", "--denoiser", "dit", "--encoders", "mnist-captions",
                      "--steps", "3", "--threads", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert TextToImagePipeline.from_pretrained(tmp_path / "run" / "model-dit").denoiser_type == "dit"
    assert load_checkpoint(tmp_path / "run" / "dit" / "state.npz")[1]["extra"]["step"] == 3
    more = tinydiff("train", "mnist-captions", "--quick", "--denoiser", "dit", "--encoders", "mnist-captions",
                    "--steps", "5", "--threads", "1", "--out", str(tmp_path / "run"), "--resume")
    assert more.returncode == 0, more.stderr
    assert load_checkpoint(tmp_path / "run" / "dit" / "state.npz")[1]["extra"]["step"] == 5  # continued to 5
    for args in (["--denoiser", "vit"], ["--steps", "0"]):
        bad = tinydiff("train", "mnist-captions", "--quick", *args, "--out", str(tmp_path / "run2"))
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert args[0] in bad.stderr


# --------------------------------------------------------------------------- the PyTorch twin


def test_the_pytorch_twin_computes_the_dit_and_its_gradients():
    """benchmarks/torch_models.py's DiT: forward within 1e-10 in float64, with a padding mask, and
    tinydiff's hand-written backward equal to autograd's for every parameter and both inputs."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch_models

    config = DiTConfig(width=16, depth=3, heads=2, timestep_dim=8, context_dim=12, context_length=5)
    tiny = randomized(DiT(config).double(), scale=0.3)
    reference = torch_models.mirror(tiny)
    gen = np.random.default_rng(4)
    x = gen.standard_normal((3, 4, 8, 8))
    t = gen.uniform(0, 999, 3)
    context = gen.standard_normal((3, 5, 12))
    mask = np.ones((3, 5), dtype=bool)
    mask[1, 2:] = False
    target = gen.standard_normal(x.shape)

    out = tiny(x, t, context, mask)
    dx, dcontext = tiny.backward(out - target)  # the gradient of ½‖out − target‖²
    tx, tc = torch.tensor(x, requires_grad=True), torch.tensor(context, requires_grad=True)
    tout = reference(tx, torch.from_numpy(t), tc, torch.from_numpy(mask))
    (0.5 * ((tout - torch.from_numpy(target)) ** 2).sum()).backward()

    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dcontext, tc.grad.numpy(), rtol=1e-10, atol=1e-12)
    torch_grads = dict(reference.named_parameters())
    for name, p in tiny.named_parameters():
        if name == "null_embedding":  # not used by a forward with a context: no gradient on either side
            continue
        np.testing.assert_allclose(p.grad, torch_grads[name].grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)
