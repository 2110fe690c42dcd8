"""The product as a user meets it: `tinydiff train --quick`, `tinydiff sample`, and their errors.

The CLI runs for real, in a subprocess, on a model trained by the quick recipe.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tinydiff.pipeline import TextToImagePipeline


import tinydiff as _package

# The package's import root, so the subprocess finds it from any working directory (installed or not).
IMPORT_ROOT = os.path.dirname(os.path.dirname(_package.__file__))


def subprocess_env():
    path = os.pathsep.join(p for p in (IMPORT_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def tinydiff(*args, timeout=300, **kwargs):
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "tinydiff.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = tinydiff("train", "mnist-captions", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def assert_one_line_error(result, *phrases):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tinydiff: error:")]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_quick_training_writes_a_loadable_pipeline(quick_run):
    for name in ("model/model_index.json", "samples.png", "clip/loss.png", "vae/loss.png", "unet/loss.png",
                 "recipe.json"):
        assert (quick_run / name).is_file(), name
    record = json.loads((quick_run / "recipe.json").read_text())
    assert set(record["seconds"]) == {"clip", "vae", "unet"}
    pipe = TextToImagePipeline.from_pretrained(quick_run / "model")
    images = pipe("a bold handwritten 7", num_images=2, steps=3, seed=1)
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8


def test_the_recipes_denoiser_keeps_a_power_function_average(quick_run):
    """The U-Net stage's loop runs the recipe's EMA (RecipeConfig.ema_power), as its checkpoint records."""
    from tinydiff.io import load_checkpoint
    from tinydiff.train.recipes import RecipeConfig

    loop = load_checkpoint(quick_run / "unet" / "state.npz")[1]["extra"]["loop"]
    assert RecipeConfig().ema_power == 16.0
    assert loop["ema_power"] == 16.0 and loop["ema_decay"] == 0.999


def test_sample_writes_npy_and_png(quick_run, tmp_path):
    npy = tmp_path / "digits.npy"
    result = tinydiff("sample", "a thin 3", "--model", str(quick_run / "model"), "--num-images", "3",
                      "--steps", "4", "--seed", "5", "--output", str(npy))
    assert result.returncode == 0, result.stderr
    images = np.load(npy)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    png = tmp_path / "digits.png"
    result = tinydiff("sample", "a thin 3", "--model", str(quick_run / "model"), "--num-images", "2",
                      "--steps", "2", "--output", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_images_and_batch_equals_single_runs(quick_run):
    pipe = TextToImagePipeline.from_pretrained(quick_run / "model")
    batch = pipe("a handwritten 4", num_images=3, steps=4, seed=10)
    again = pipe("a handwritten 4", num_images=3, steps=4, seed=10)
    third = pipe("a handwritten 4", num_images=1, steps=4, seed=12)
    assert np.array_equal(batch, again)
    assert np.abs(batch[2].astype(int) - third[0].astype(int)).max() <= 1  # float rounding at most


def test_rows_split_over_threads_give_the_same_images(quick_run):
    pipe = TextToImagePipeline.from_pretrained(quick_run / "model")
    pipe.threads = 1
    one = pipe("a handwritten 4", num_images=5, steps=4, seed=3)
    pipe.threads = 3  # 10 rows (5 guided pairs) in blocks of 4, 3 and 3
    three = pipe("a handwritten 4", num_images=5, steps=4, seed=3)
    assert np.abs(one.astype(int) - three.astype(int)).max() <= 1  # float rounding at most


def test_attention_callback_sees_whole_batches_in_order_whatever_the_threads(quick_run):
    """An attention callback turns the row split off: each U-Net call reports every layer once,
    in order, with all 2B rows (regression: with rows on two threads, calls interleaved)."""
    pipe = TextToImagePipeline.from_pretrained(quick_run / "model")
    pipe.threads = 2
    calls = []
    pipe.unet.set_attention_callback(lambda name, probs: calls.append((name, probs.shape[0])))
    try:
        pipe("a handwritten 4", num_images=3, steps=2, seed=0)
    finally:
        pipe.unet.set_attention_callback(None)
    layers = list(dict.fromkeys(name for name, _ in calls))
    assert [name for name, _ in calls] == layers * (len(calls) // len(layers))
    assert {rows for _, rows in calls} == {6}
    assert not pipe.unet.has_attention_callbacks


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["a purple handwritten 7"], ["never seen", "purple"]),
        ([""], ["empty"]),
        (["a 7", "--steps", "0"], ["--steps"]),
        (["a 7", "--sampler", "magic"], ["unknown sampler", "dpmpp_2m"]),
        (["a 7", "--output", "x.jpg"], [".png", ".npy"]),
    ],
)
def test_sample_bad_input_is_one_clear_line(quick_run, args, phrases, tmp_path):
    result = tinydiff("sample", *args, "--model", str(quick_run / "model"), cwd=tmp_path)
    assert_one_line_error(result, *phrases)


def test_missing_and_tampered_model_folders(quick_run, tmp_path):
    assert_one_line_error(tinydiff("sample", "a 7", "--model", str(tmp_path / "nowhere")), "no tinydiff model")
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(quick_run / "model", copy)
    unet = copy / "unet.npz"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    assert_one_line_error(tinydiff("sample", "a 7", "--model", str(copy)), "sha256")


def test_train_refuses_to_overwrite_without_resume(quick_run):
    result = tinydiff("train", "mnist-captions", "--quick", "--out", str(quick_run))
    assert_one_line_error(result, "--resume")


KILLABLE_RUN = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import tinydiff.nn as nn
    from tinydiff.train import LoopConfig, train_loop
    X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    nn.manual_seed(1)
    model = nn.Linear(4, 2)
    def grads(step, gen):
        time.sleep(float(sys.argv[2]))
        idx = gen.integers(0, 64, 16)
        loss, d = nn.mse_loss(model(X[idx]), 2 * X[idx, :2])
        model.backward(d)
        return loss, {}
    train_loop(model, grads, LoopConfig(total_steps=200, warmup_steps=5, checkpoint_every=3),
               checkpoint_path=sys.argv[1], resume=True, kind="killable")
    np.save(sys.argv[1] + ".final.npy", model.weight.data)
    """
)


def test_sigkill_at_a_random_moment_then_resume_is_exact(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLABLE_RUN)
    reference = tmp_path / "reference.npz"
    subprocess.run([sys.executable, str(script), str(reference), "0"], check=True, timeout=120, env=subprocess_env())
    checkpoint = tmp_path / "killed.npz"
    proc = subprocess.Popen([sys.executable, str(script), str(checkpoint), "0.02"], env=subprocess_env())
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline:  # the run is under way
        time.sleep(0.01)
    time.sleep(np.random.default_rng().uniform(0.0, 2.0))  # then a random moment, mid-step or mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from tinydiff.io import load_checkpoint

    _, header = load_checkpoint(checkpoint, kind="killable")  # never half-written
    assert 0 < header["extra"]["step"] < 200
    subprocess.run([sys.executable, str(script), str(checkpoint), "0"], check=True, timeout=120, env=subprocess_env())
    assert np.array_equal(np.load(str(reference) + ".final.npy"), np.load(str(checkpoint) + ".final.npy"))
