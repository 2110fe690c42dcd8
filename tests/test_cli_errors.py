"""Every bad input to the ``tinydiff`` command is one line naming the problem and the fix, exit
status 2, and no traceback; and the commands that help a user write a good prompt (``words``,
``info``, the model card printed by ``eval``).

The CLI runs in-process (``tinydiff.cli.main``) on the shipped model: each bad option is caught
before sampling starts, so each case takes well under a second.
"""

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from tinydiff import backend
from tinydiff.cli import main
from tinydiff.evaluate import format_results
from tinydiff.pipeline import PromptError, TextToImagePipeline, pretrained_path
from tinydiff.text.tokenizer import Tokenizer, vocabulary_groups

README = Path(__file__).resolve().parents[1] / "README.md"


def run(capsys, *args):
    """``tinydiff ARGS`` in this process, with Python warnings turned into errors (a raw warning
    is not a message for a user); returns (exit status, stdout, stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, *phrases):
    code, _, err = result
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinydiff: error: "), err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def sample(capsys, prompt, *args, output):
    """``tinydiff sample PROMPT`` of one image in one step (unless ARGS say otherwise)."""
    return run(capsys, "sample", prompt, "--num-images", 1, "--steps", 1, *args, "--output", output)


# --- --output --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.npy", "x.png"])
def test_output_into_missing_folders_creates_them(capsys, tmp_path, name):
    output = tmp_path / "new" / "deeper" / name
    code, out, err = sample(capsys, "a 7", output=output)
    assert code == 0, err
    assert output.is_file() and "wrote 1 image(s)" in out
    if name.endswith(".npy"):
        assert np.load(output).shape == (1, 28, 28)


def test_output_that_is_a_folder(capsys, tmp_path):
    (tmp_path / "grid.png").mkdir()
    assert_one_line_error(sample(capsys, "a 7", output=tmp_path / "grid.png"), "is a folder", "samples.png")


@pytest.mark.parametrize("name", ["x.npy", "x.png", "sub/x.npy"])
def test_output_under_a_regular_file(capsys, tmp_path, name):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    result = sample(capsys, "a 7", output=tmp_path / "notes.txt" / name)
    assert_one_line_error(result, "cannot write --output", f"{tmp_path / 'notes.txt'} is a file, not a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_output_in_a_read_only_folder(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(sample(capsys, "a 7", output=locked / "x.npy"), "cannot write --output")
    finally:
        locked.chmod(0o700)


# --- numeric options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--seed", "-1"], ["--seed", "0 or more", "-1"]),
        (["--sigma-max", "1e-9"], ["--sigma-max", "above", "0.01", "157"]),
        (["--sigma-max", "0.011", "--sigma-schedule", "leading", "--steps", "20"],
         ["cannot take 20 steps", "--sigma-max 0.011", "--sigma-schedule leading"]),
        (["--guidance", "1e6"], ["--guidance", "0 to 50", "1e+06"]),
        (["--guidance", "50.5"], ["--guidance", "0 to 50"]),
    ],
)
def test_sample_bad_numbers(capsys, tmp_path, args, phrases):
    assert_one_line_error(sample(capsys, "a 7", *args, output=tmp_path / "x.npy"), *phrases)
    assert not (tmp_path / "x.npy").exists()


def test_guidance_at_its_documented_maximum_is_accepted(capsys, tmp_path):
    code, _, err = sample(capsys, "a 7", "--guidance", "50", output=tmp_path / "x.npy")
    assert code == 0, err


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--seed", "-1"], ["--seed", "0 or more"]),
        (["--steps", "0"], ["--steps", "at least 1"]),
        (["--n-attribute", "0"], ["--n-attribute", "at least 1"]),
        (["--n-attribute", "-1"], ["--n-attribute", "-1"]),
        (["--n-per-digit", "1"], ["--n-per-digit", "at least 2"]),
    ],
)
def test_eval_bad_numbers(capsys, args, phrases):
    small = ["--n-per-digit", 2, "--n-attribute", 1, "--steps", 1]  # seconds, should a check be missing
    assert_one_line_error(run(capsys, "eval", *small, *args), *phrases)


def test_train_negative_seed(capsys, tmp_path):
    assert_one_line_error(run(capsys, "train", "mnist-captions", "--quick", "--seed", "-3", "--out", tmp_path / "run"),
                          "--seed")
    assert not (tmp_path / "run").exists()


def test_a_value_error_from_the_library_is_one_line(capsys, tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise ValueError("a check inside the library failed")

    monkeypatch.setattr(TextToImagePipeline, "__call__", refuse)
    code, _, err = sample(capsys, "a 7", output=tmp_path / "x.npy")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == "tinydiff: error: a check inside the library failed"  # after the progress bar


# --- prompts ---------------------------------------------------------------------------------------


LONG = "a picture of a small bold handwritten seven leaning right the digit seven thin 7"  # 15 words


def test_a_prompt_too_long_is_refused_naming_the_limit_and_the_dropped_words(capsys, tmp_path):
    line = assert_one_line_error(sample(capsys, LONG, output=tmp_path / "x.png"),
                                 "15 words", "at most 14", "drop '7'", "shorten")
    assert "Traceback" not in line and ".py" not in line
    assert not (tmp_path / "x.png").exists()


def test_a_negative_prompt_too_long_is_refused(capsys, tmp_path):
    assert_one_line_error(sample(capsys, "a 7", "--negative", LONG + " 7 7", output=tmp_path / "x.npy"),
                          "--negative", "17 words", "drop '7 7 7'")


def test_a_prompt_of_exactly_the_maximum_length_is_drawn(capsys, tmp_path):
    fourteen = " ".join(LONG.split()[:14])
    code, _, err = sample(capsys, fourteen, output=tmp_path / "x.npy")
    assert code == 0, err


def test_the_pipeline_refuses_a_long_prompt_without_a_warning():
    pipe = TextToImagePipeline.from_pretrained()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PromptError, match=r"15 words but the model reads at most 14; it would drop '7'"):
            pipe.encode_prompt(["a 7", LONG])
    with pytest.warns(UserWarning, match="the rest is dropped"):
        pipe.encode_prompt([LONG], strict=False)  # the lenient path still truncates, and warns


@pytest.mark.parametrize(
    "prompt, phrases",
    [
        ("a slanted 7", ["'slanted' (did you mean 'leaning right' or 'leaning left'?)"]),
        ("a fat 7", ["never seen", "'fat' (did you mean 'bold'?)", "tinydiff words lists the 36"]),
        ("a tiny skinny 7", ["'tiny' (did you mean 'small'?), 'skinny' (did you mean 'thin'?)"]),
        ("a bold handwriten 7", ["'handwriten' (did you mean 'handwritten'?)"]),
        ("a purple 17", ["'purple', '17' (the model draws one digit, 0-9)"]),
    ],
)
def test_unknown_words_come_with_suggestions(capsys, tmp_path, prompt, phrases):
    assert_one_line_error(sample(capsys, prompt, output=tmp_path / "x.npy"), *phrases)


def test_unknown_words_in_the_negative_prompt_are_named_as_such(capsys, tmp_path):
    assert_one_line_error(sample(capsys, "a 7", "--negative", "a thick 7", output=tmp_path / "x.npy"),
                          "--negative", "'thick' (did you mean 'bold'?)")


def test_png_title_of_a_long_prompt_stays_short(capsys, tmp_path):
    """The grid's title is the prompt, cut to the grid's width: a 14-word prompt of long words
    must not widen the PNG beyond the images."""
    from PIL import Image

    output = tmp_path / "x.png"
    code, _, err = run(capsys, "sample", " ".join(["handwritten"] * 14), "--num-images", 2, "--steps", 1,
                       "--output", output)
    assert code == 0, err
    width, _ = Image.open(output).size
    assert width < 1200  # the untruncated 167-character title alone is about 1,500 px at 110 dpi


# --- tinydiff words ------------------------------------------------------------------------------------


def test_words_lists_every_word_of_the_model_once_in_groups(capsys):
    code, out, err = run(capsys, "words")
    assert code == 0, err
    tokenizer = Tokenizer.from_json((pretrained_path() / "tokenizer.json").read_text())
    group_lines = {line.split(":")[0].strip(): line.split(":", 1)[1].split() for line in out.splitlines()
                   if line.startswith("  ") and ":" in line}
    assert list(group_lines) == ["digits", "number words", "attributes", "other words"]
    listed = [w for words in group_lines.values() for w in words]
    assert sorted(listed) == sorted(tokenizer.words) and len(listed) == 36
    assert group_lines["number words"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                           "nine"]
    assert "at most 14" in out
    assert re.search(r"thick, fat, .*→ bold", out) and re.search(r"slanted, .*→ leaning right or leaning left", out)
    assert "ii → 2, iii → 3, iv → 4" in out


def test_readme_lists_exactly_the_shipped_vocabulary():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| group | words |"):].split("\n\n")[0].splitlines()[2:]
    cells = [re.sub(r"\([^)]*\)", "", row.split(" | ")[1]) for row in table]  # without "(thickness)"
    listed = re.findall(r"\w+", " ".join(cells))
    tokenizer = Tokenizer.from_json((pretrained_path() / "tokenizer.json").read_text())
    assert sorted(set(listed)) == sorted(tokenizer.words)
    assert f"knows {len(tokenizer.words)} words" in text and f"at most {tokenizer.max_length - 2} of them" in text


def test_vocabulary_groups_put_each_word_in_its_group():
    groups = vocabulary_groups(["the", "7", "bold", "seven", "left", "0", "zero", "picture"])
    assert groups == {"digits": ["7", "0"], "number words": ["zero", "seven"], "attributes": ["bold", "left"],
                      "other words": ["the", "picture"]}
    assert "number words" not in vocabulary_groups(["7", "bold"])  # empty groups are left out


def test_sample_help_points_to_the_words_command(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "tinydiff words" in capsys.readouterr().out


# --- tinydiff info --------------------------------------------------------------------------------------


def test_info_says_what_tinydiff_uses_and_does_not_claim_a_cupy_request(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0, err
    threads = out[out.index("\nthreads"):out.index("\ncupy")]
    assert "BLAS on 1 thread" in threads and f"over the {backend.cpu_count()} CPU core(s)" in threads
    default = backend.blas_default_threads()
    assert f"for NumPy code outside tinydiff: {default} thread(s)" in threads
    numpy_line = next(line for line in out.splitlines() if line.startswith("numpy"))
    assert "threads" not in numpy_line  # the default count is said once, as the default, on the threads line
    cupy_line = next(line for line in out.splitlines() if line.startswith("cupy"))
    assert "requested" not in cupy_line


# --- tinydiff eval: the model card --------------------------------------------------------------------


def model_card_labels() -> list[str]:
    """The metric column of the README's model card table."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| metric | value |"):].split("\n\n")[0].splitlines()[2:]
    return [row.split(" | ")[0].lstrip("| ").strip() for row in table]


def test_eval_table_has_every_row_of_the_model_card():
    results = {"prompt_accuracy": 0.987, "mnist_fd": 0.75, "mnist_fd_real_vs_real": 0.3, "fd_images": 1000,
               "ink_bold_over_thin": 1.9, "ink_bold_over_thin_real": 1.81, "bold_prompt_accuracy": 1.0,
               "thin_prompt_accuracy": 0.96, "clip_zero_shot_accuracy": 0.985, "vae_psnr": 26.53,
               "classifier_accuracy": 0.986}
    lines = format_results(results)
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert labels == model_card_labels()
    table = "\n".join(lines)
    for value in ("98.7%", "| 0.75 |", "| 0.30 |", "2.50×", "1.90×", "100.0% / 96.0%", "98.5%", "26.5 dB", "98.6%"):
        assert value in table, value
    without_clip = format_results({k: v for k, v in results.items() if k != "clip_zero_shot_accuracy"})
    assert len(without_clip) == len(lines) - 1 and "CLIP" not in "\n".join(without_clip)


def test_eval_prints_every_row_of_the_model_card(capsys):
    """The smallest evaluation the CLI allows (40 one-step images; the held-out metrics still use
    all 1,000 held-out digits): about 20 s of CPU."""
    code, out, err = run(capsys, "eval", "--n-per-digit", 2, "--n-attribute", 1, "--steps", 1)
    assert code == 0, err
    printed = [line.split(" | ")[0].lstrip("| ") for line in out.splitlines() if line.startswith("| ")][2:]
    stem = lambda label: re.sub(r" \([^)]*\d[^)]*\)", "", label)  # without "(20 images)", "(… 1.81×)"
    assert [stem(label) for label in printed] == [stem(label) for label in model_card_labels()]
    assert "| VAE reconstruction PSNR (held-out) | 26.5 dB |" in out  # the shipped VAE, on every held-out digit
    assert "| evaluation classifier accuracy (held-out) | 98.6% |" in out
    # the cost of the run: dpmpp_2m, 1 step, guidance 2 = one U-Net call on 2 rows, plus text encoder and decoder
    cost = re.search(r"cost: ([0-9.]+) GFLOP per image \(counted\), (\d+) ms per image", out)
    assert cost, out
    from tinydiff.cost import pipeline_cost
    from tinydiff.pipeline import TextToImagePipeline
    expected = pipeline_cost(TextToImagePipeline.from_pretrained(), steps=1)["gflop_per_image"]
    assert float(cost.group(1)) == pytest.approx(expected, abs=0.005) and int(cost.group(2)) > 0
