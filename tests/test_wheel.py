"""The wheel carries everything a user needs: the bundled digits and the pretrained weights travel
as package data, not only through the source tree."""

import os
import subprocess
import sys
import zipfile

import pytest


def test_wheel_trains_and_samples_outside_the_source_tree(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pytest.importorskip("setuptools")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), root], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("tinydiff-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert "tinydiff/datasets/mnist-10k.npz" in names
    assert "tinydiff/pretrained/classifier.npz" in names
    env = {**os.environ, "PYTHONPATH": str(site)}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import tinydiff; print(tinydiff.__file__)")
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    trained = run("-m", "tinydiff.cli", "train", "mnist-captions", "--quick", "--out", "run")
    assert trained.returncode == 0, trained.stderr
    sampled = run("-m", "tinydiff.cli", "sample", "a handwritten 7", "--model", "run/model", "--steps", "2",
                  "--num-images", "2", "--output", "x.npy")
    assert sampled.returncode == 0, sampled.stderr
    assert "tinydiff/pretrained/mnist-captions/model_index.json" in names  # the shipped text-to-image model
    shipped = run("-m", "tinydiff.cli", "sample", "a handwritten 7", "--steps", "2", "--num-images", "1",
                  "--output", "y.npy")
    assert shipped.returncode == 0, shipped.stderr
