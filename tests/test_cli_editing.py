"""``tinydiff edit | inpaint | invert``: each runs for real (a few steps) and writes what the
library's editor returns for the same options; every bad input is one line, exit status 2.

The CLI runs in-process (``tinydiff.cli.main``, through test_cli_errors' ``run``, which turns
warnings into errors) on the shipped model.
"""

import numpy as np
import pytest
from PIL import Image

from test_cli_errors import assert_one_line_error, run

from tinydiff import editing
from tinydiff.pipeline import TextToImagePipeline


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


@pytest.fixture
def files(tmp_path):
    """Two held-out 3s as .npy, the first as PNG (and inverted, dark ink on white), a bottom-half mask as PNG."""
    threes, _ = editing.held_out_digits(2, digit=3, seed=0)
    np.save(tmp_path / "threes.npy", threes)
    Image.fromarray(threes[0]).save(tmp_path / "three.png")
    Image.fromarray(255 - threes[0]).save(tmp_path / "three_on_paper.png")
    Image.fromarray(editing.bottom_half_mask(1)[0].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path, threes


# --- each command, for real -----------------------------------------------------------------------


def test_edit_writes_the_img2img_of_its_input(capsys, pipe, files):
    folder, threes = files
    code, out, err = run(capsys, "edit", folder / "threes.npy", "an 8", "--strength", 0.75, "--steps", 4, "--seed", 3,
                         "--sampler", "euler", "--output", folder / "out.npy")
    assert code == 0, err
    assert "wrote 2 image(s)" in out and "3/3" in err  # the bar counts the 3 steps strength 0.75 of 4 runs
    expected = pipe.img2img(threes, "an 8", 0.75, steps=4, seed=3, sampler="euler")  # (not the default 0.6's 2)
    np.testing.assert_array_equal(np.load(folder / "out.npy"), expected)
    code, _, err = run(capsys, "edit", folder / "three.png", "an 8", "--steps", 2, "--output", folder / "out.png")
    assert code == 0 and (folder / "out.png").stat().st_size > 0, err


def test_edit_reads_dark_ink_on_paper_with_dark_ink(capsys, files):
    folder, _ = files
    for name, extra in [("plain", ["three.png"]), ("paper", ["three_on_paper.png", "--dark-ink"])]:
        code, _, err = run(capsys, "edit", folder / extra[0], "a 3", *extra[1:], "--strength", 0, "--output",
                           folder / f"{name}.npy")
        assert code == 0, err
    np.testing.assert_array_equal(np.load(folder / "paper.npy"), np.load(folder / "plain.npy"))


def test_inpaint_writes_the_completion_and_keeps_the_unmasked_pixels(capsys, pipe, files):
    folder, threes = files
    code, out, err = run(capsys, "inpaint", folder / "three.png", "--mask", folder / "mask.png", "a handwritten 8",
                         "--steps", 3, "--jumps", 1, "--seed", 2, "--output", folder / "out.npy")
    assert code == 0, err
    assert "wrote 1 image(s)" in out and "6/6" in err  # 3 steps, each done twice
    mask = editing.bottom_half_mask(1)
    expected = pipe.inpaint(threes[:1], mask, "a handwritten 8", jumps=1, steps=3, seed=2)
    got = np.load(folder / "out.npy")
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[~mask], threes[:1][~mask])


def test_invert_writes_the_noise_and_the_round_trip(capsys, pipe, files):
    folder, threes = files
    code, out, err = run(capsys, "invert", folder / "threes.npy", "a handwritten three", "--steps", 4,
                         "--output", folder / "recon.npy", "--noise-output", folder / "sub" / "noise.npy")
    assert code == 0, err
    noise = np.load(folder / "sub" / "noise.npy")
    assert noise.shape == (2, 4, 8, 8) and noise.dtype == np.float32 and "wrote the noise of 2 image(s)" in out
    expected = pipe.invert(threes, "a handwritten three", steps=4)  # guidance 1 by default
    np.testing.assert_array_equal(noise, expected)
    rebuilt = pipe("a handwritten three", latents=expected, sampler="ddim", steps=4, guidance_scale=1.0)
    np.testing.assert_array_equal(np.load(folder / "recon.npy"), rebuilt)
    code, _, err = run(capsys, "invert", folder / "three.png", "a 3", "--steps", 3, "--iterations", 1,
                       "--guidance", 1.5, "--output", folder / "r.npy", "--noise-output", folder / "n.npy")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(folder / "n.npy"),
                                  pipe.invert(threes[:1], "a 3", steps=3, iterations=1, guidance_scale=1.5))


# --- bad input: one line, exit status 2 ------------------------------------------------------------


def _bad_input_cases(folder):
    (folder / "notes.png").write_text("not a picture")
    np.save(folder / "big.npy", np.zeros((32, 32), np.uint8))
    np.save(folder / "floats.npy", np.zeros((2, 28, 28), np.float32))
    np.save(folder / "three_masks.npy", editing.bottom_half_mask(3))
    np.save(folder / "small_mask.npy", np.ones((8, 8), bool))
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(folder / "mask56.png")
    out = ["--output", folder / "x.png"]
    threes, mask = folder / "threes.npy", folder / "mask.png"
    return [
        ("non-image file", ["edit", folder / "notes.png", "a 3", *out], ["notes.png is not a readable image"]),
        ("missing file", ["inpaint", folder / "nope.png", "--mask", mask, "a 3", *out], ["no such file"]),
        ("wrong-shape npy", ["edit", folder / "big.npy", "a 3", *out], ["28×28", "(32, 32)"]),
        ("float npy", ["invert", folder / "floats.npy", "a 3", *out], ["uint8"]),
        ("mask size", ["inpaint", folder / "three.png", "--mask", folder / "mask56.png", "a 3", *out],
         ["the mask is 56×56 pixels but the picture is 28×28"]),
        ("mask count", ["inpaint", threes, "--mask", folder / "three_masks.npy", "a 3", *out],
         ["3 masks for 2 images"]),
        ("mask shape", ["inpaint", threes, "--mask", folder / "small_mask.npy", "a 3", *out], ["mask", "28×28"]),
        ("non-image mask", ["inpaint", threes, "--mask", folder / "notes.png", "a 3", *out], ["not a readable image"]),
        ("strength above 1", ["edit", threes, "a 3", "--strength", 1.5, *out], ["--strength takes 0 to 1", "1.5"]),
        ("strength below 0", ["edit", threes, "a 3", "--strength", -0.1, *out], ["--strength takes 0 to 1"]),
        ("strength nan", ["edit", threes, "a 3", "--strength", "nan", *out], ["--strength takes 0 to 1"]),
        ("negative jumps", ["inpaint", threes, "--mask", mask, "a 3", "--jumps", -1, *out], ["--jumps"]),
        ("negative iterations", ["invert", threes, "a 3", "--iterations", -1, *out], ["--iterations"]),
        ("noise output", ["invert", threes, "a 3", "--noise-output", folder / "noise.txt", *out], [".npy"]),
        ("lcm edit", ["edit", threes, "a 3", "--sampler", "lcm", *out], ["lcm"]),
        ("unknown word", ["edit", threes, "a slanted 3", *out], ["slanted"]),
        ("zero steps", ["invert", threes, "a 3", "--steps", 0, *out], ["--steps"]),
        ("guidance", ["inpaint", threes, "--mask", mask, "a 3", "--guidance", 99, *out], ["--guidance"]),
        ("output", ["edit", threes, "a 3", "--output", folder / "x.jpg"], ["--output"]),
    ]


def test_every_bad_input_is_one_line_and_status_2(capsys, files):
    folder, _ = files
    for name, args, phrases in _bad_input_cases(folder):
        result = run(capsys, *args)
        try:
            assert_one_line_error(result, *phrases)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
        assert not (folder / "x.png").exists(), name  # refused before writing anything
