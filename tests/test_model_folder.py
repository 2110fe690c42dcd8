"""A pipeline folder loads only what its manifest vouches for, and staged training writes one.

Each test copies the shipped folder (tinydiff/pretrained/mnist-captions) and changes it the way
a damaged download or a tampered copy would; ``from_pretrained`` (and the CLI) must refuse it
with the one-line "tampered or damaged model folder" error, never load it or crash.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tinydiff.io import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from tinydiff.pipeline import TextToImagePipeline, pretrained_path

DAMAGED = "tampered or damaged model folder"


@pytest.fixture
def folder(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(pretrained_path(), copy)
    return copy


def manifest_of(folder) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def write_manifest(folder, manifest) -> None:
    (folder / "model_index.json").write_text(json.dumps(manifest, indent=2))


def zero_weights(file) -> None:
    """Rewrite a component checkpoint as a valid one of the same shapes, every weight 0."""
    arrays, header = load_checkpoint(file)
    save_checkpoint(file, {k: np.zeros_like(v) for k, v in arrays.items()}, kind=header["kind"],
                    config=header["config"], extra=header["extra"])


def assert_refused(folder, *phrases):
    with pytest.raises(CheckpointError) as info:
        TextToImagePipeline.from_pretrained(folder)
    message = str(info.value)
    assert DAMAGED in message and str(folder) in message and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


def test_the_shipped_folder_loads(folder):
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.image_encoder is not None
    assert set(manifest_of(folder)["diffusion"]) == {"schedule", "num_timesteps", "prediction_type"}


def test_a_network_left_out_of_the_manifest_is_not_loaded_unchecked(folder):
    # regression: the manifest's entries were verified, then fixed names were loaded, so dropping
    # "unet" from the manifest let a zeroed (or any other) unet.npz load silently
    manifest = manifest_of(folder)
    del manifest["files"]["unet"]
    write_manifest(folder, manifest)
    zero_weights(folder / "unet.npz")
    assert_refused(folder, "'unet' is not listed")


def test_the_optional_image_encoder_is_checked_when_listed(folder):
    zero_weights(folder / "image_encoder.npz")
    assert_refused(folder, "image_encoder.npz does not match its sha256")


def test_a_damaged_file_is_refused(folder):  # was already refused (with a different message)
    data = bytearray((folder / "vae.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "vae.npz").write_bytes(bytes(data))
    assert_refused(folder, "vae.npz does not match its sha256")


def _entry(folder, path):
    return {"path": path, "sha256": sha256_file(folder / path)}


def _set(section, key, value):
    def change(m, folder):
        m[section][key] = value
    return change


def _files(name, entry):
    def change(m, folder):
        m["files"][name] = entry(folder) if callable(entry) else entry
    return change


def _escape(m, folder):
    # a zeroed U-Net beside the folder, listed with its true sha256
    outside = folder.parent / "unet.npz"
    shutil.copy(folder / "unet.npz", outside)
    zero_weights(outside)
    m["files"]["unet"] = {"path": "../unet.npz", "sha256": sha256_file(outside)}


TAMPERINGS = {
    "not-json": lambda folder: (folder / "model_index.json").write_text('{"files": '),
    "not-an-object": lambda folder: write_manifest(folder, [manifest_of(folder)]),
    "no-files": lambda folder: write_manifest(folder, {k: v for k, v in manifest_of(folder).items() if k != "files"}),
    "unknown-section": lambda folder: write_manifest(folder, {**manifest_of(folder), "run": "this"}),
}
MANIFEST_CHANGES = {
    "files-not-an-object": lambda m, folder: m.update(files=list(m["files"].values())),
    "entry-not-an-object": _files("unet", "unet.npz"),
    "entry-without-path": _files("unet", lambda folder: {"sha256": sha256_file(folder / "unet.npz")}),
    "entry-without-sha256": _files("unet", {"path": "unet.npz"}),
    "entry-with-extra-key": _files("unet", lambda folder: {**_entry(folder, "unet.npz"), "run": "this"}),
    "sha256-not-a-string": _files("unet", {"path": "unet.npz", "sha256": 0}),
    "unknown-entry": _files("extra", lambda folder: _entry(folder, "vae.npz")),
    "another-file-for-unet": _files("unet", lambda folder: _entry(folder, "vae.npz")),
    "path-escapes-the-folder": _escape,
    "path-spelled-another-way": _files("unet", lambda folder: {**_entry(folder, "unet.npz"), "path": "./unet.npz"}),
    "unknown-diffusion-key": _set("diffusion", "batch_size", 64),
    "diffusion-key-of-wrong-type": _set("diffusion", "num_timesteps", "1000"),
    "unknown-schedule": _set("diffusion", "schedule", "quadratic"),
    "unknown-sampling-key": _set("sampling_defaults", "eta", 0.0),
    "sampling-key-of-wrong-type": _set("sampling_defaults", "steps", "20"),
    "sampling-default-out-of-range": _set("sampling_defaults", "sampler", "magic"),
    "diffusion-not-an-object": lambda m, folder: m.update(diffusion="linear"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_a_malformed_manifest_is_refused_in_one_line(folder, name):
    TAMPERINGS[name](folder)
    assert_refused(folder)


@pytest.mark.parametrize("name", list(MANIFEST_CHANGES))
def test_a_tampered_manifest_is_refused_in_one_line(folder, name):
    manifest = manifest_of(folder)
    MANIFEST_CHANGES[name](manifest, folder)
    write_manifest(folder, manifest)
    assert_refused(folder)


def test_an_unlisted_image_encoder_is_simply_not_loaded(folder):
    manifest = manifest_of(folder)
    del manifest["files"]["image_encoder"]
    write_manifest(folder, manifest)
    zero_weights(folder / "image_encoder.npz")
    assert TextToImagePipeline.from_pretrained(folder).image_encoder is None


def test_cli_sample_refuses_a_tampered_folder_in_one_line(folder, tmp_path):
    manifest = manifest_of(folder)
    del manifest["files"]["unet"]
    write_manifest(folder, manifest)
    zero_weights(folder / "unet.npz")
    result = subprocess.run([sys.executable, "-m", "tinydiff.cli", "sample", "a 7", "--model", str(folder)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinydiff: error:") and DAMAGED in lines[0], result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_a_pipeline_records_only_the_sampling_side_of_a_training_config(tmp_path):
    from tinydiff.train.diffusion import DiffusionTrainingConfig

    shipped = TextToImagePipeline.from_pretrained()
    training = DiffusionTrainingConfig(schedule=shipped.diffusion.schedule, batch_size=8, cond_drop_prob=0.5,
                                       loss_weighting="min_snr")
    pipe = TextToImagePipeline(shipped.tokenizer, shipped.text_encoder, shipped.unet, shipped.vae, training,
                               shipped.defaults, image_encoder=shipped.image_encoder)
    pipe.save_pretrained(tmp_path / "again")
    assert manifest_of(tmp_path / "again")["diffusion"] == {"schedule": "linear", "num_timesteps": 1000,
                                                           "prediction_type": "epsilon"}
    again = TextToImagePipeline.from_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(again("a bold 4", num_images=2, steps=4, seed=3),
                                  shipped("a bold 4", num_images=2, steps=4, seed=3))


def test_partial_stage_lists_train_those_stages_and_write_the_pipeline_once_all_exist(tmp_path):
    # regression: --stages clip,vae on a fresh --out trained both, then failed for the missing U-Net
    from tinydiff.train.recipes import quick_recipe, train_mnist_captions

    config = quick_recipe()
    config.threads = 1
    assert train_mnist_captions(tmp_path, stages=("clip", "vae"), config=config) is None
    assert (tmp_path / "clip" / "state.npz").is_file() and (tmp_path / "vae" / "state.npz").is_file()
    assert not (tmp_path / "unet").exists() and not (tmp_path / "model").exists()
    record = json.loads((tmp_path / "recipe.json").read_text())
    assert set(record["seconds"]) == {"clip", "vae"} and "unet" in record["pipeline"]

    pipe = train_mnist_captions(tmp_path, stages=("unet",), resume=True, config=config)
    assert pipe is not None and (tmp_path / "model" / "model_index.json").is_file()
    TextToImagePipeline.from_pretrained(tmp_path / "model")
