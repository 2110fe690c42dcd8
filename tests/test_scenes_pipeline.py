"""A scenes pipeline as a first-class model: its pictures are the whole 32×32 canvas, ``tinydiff
eval`` measures it with the scene evaluator, ``tinydiff sample`` takes scene captions only, the
shipped name ``mnist-scenes`` finds it; and the pooled-conditioning ablation, the same in
training and in sampling.

Most tests build a tiny random pipeline on the scenes' tokenizer (seconds); the recipe and CLI
training tests run the quick recipe with a tiny folder's encoders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from tinydiff import evaluate_scenes as ev
from tinydiff.cli import main
from tinydiff.data.mnist import from_model_range
from tinydiff.data.scenes import parse_caption, scene_tokenizer
from tinydiff.diffusion import DiffusionConfig
from tinydiff.io import CheckpointError, load_checkpoint, sha256_file
from tinydiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from tinydiff.models.clip import TextEncoder, TextEncoderConfig
from tinydiff.models.unet import UNet, UNetConfig
from tinydiff.nn import no_grad
from tinydiff.pipeline import (PipelineConfig, SamplingDefaults, TextToImagePipeline, pooled_context,
                               pretrained_path)

DAMAGED = "tampered or damaged model folder"
PROMPTS = ["a 3 left of a 7", "two 7s", "the number 42", "a small 5"]  # four kinds, four lengths


def randomized(model, seed=0, scale=0.1):
    """Move every weight off its initial value (zero-initialised output layers would make every
    picture the same), so that images depend on the prompt and on every weight."""
    gen = np.random.default_rng(seed)
    for p in model.parameters():
        p.data += (scale * gen.standard_normal(p.shape)).astype(p.data.dtype)
    return model


def tiny_pipeline(**config) -> TextToImagePipeline:
    """A random pipeline on the scenes' tokenizer; ``config``: PipelineConfig's fields (default 32, tokens)."""
    tokenizer = scene_tokenizer()
    text = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length, width=16,
                                         layers=1, heads=2, projection_dim=8), seed=1)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_channels=(8, 16),
                           attention_levels=(False, True), context_dim=16, context_length=tokenizer.max_length,
                           learned_null_context=True, heads=2, dim_head=4, groups=4, time_embed_dim=16), seed=2)
    vae = AutoencoderKL(AutoencoderConfig(block_channels=(4, 8, 8), groups=4, scaling_factor=1.0), seed=3)
    return TextToImagePipeline(tokenizer, randomized(text, 1), randomized(unet, 2), randomized(vae, 3),
                               DiffusionConfig(), SamplingDefaults(steps=2),
                               config=PipelineConfig(**{"image_size": 32, **config}))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def scenes_folder(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("scenes") / "model"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def folder(scenes_folder, tmp_path):
    """A copy of the tiny scenes folder that a test may change."""
    return shutil.copytree(scenes_folder, tmp_path / "model")


def manifest_of(folder) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def write_manifest(folder, manifest) -> None:
    (folder / "model_index.json").write_text(json.dumps(manifest, indent=2))


def run(capsys, *args):
    """``tinydiff ARGS`` in this process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *phrases):
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.startswith("tinydiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# --------------------------------------------------------------------------- 1. the output size


def test_a_scenes_pipeline_returns_the_whole_canvas_and_a_digits_pipeline_its_crop(pipe):
    scenes, latents = pipe(PROMPTS, seed=4, return_latents=True)
    digits = TextToImagePipeline(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.diffusion,
                                 pipe.defaults, config=PipelineConfig(image_size=28))(PROMPTS, seed=4)
    assert scenes.dtype == np.uint8 and scenes.shape == (4, 32, 32) and digits.shape == (4, 28, 28)
    # the same latents, decoded once: the whole canvas, and its central 28×28 (the 2-pixel border dropped)
    np.testing.assert_array_equal(scenes, from_model_range(pipe.vae.decode_from_diffusion(latents), crop=False))
    np.testing.assert_array_equal(digits, scenes[:, 2:30, 2:30])
    assert len(np.unique(scenes[:, :2])) > 1  # the border rows are pictures too, not a constant


def test_image_size_and_conditioning_are_saved_and_read_back(pipe, scenes_folder):
    assert manifest_of(scenes_folder)["pipeline"] == {"image_size": 32, "conditioning": "tokens", "space": "latent"}
    loaded = TextToImagePipeline.from_pretrained(scenes_folder)
    assert (loaded.image_size, loaded.conditioning) == (32, "tokens")
    np.testing.assert_array_equal(loaded(PROMPTS[:2], seed=1), pipe(PROMPTS[:2], seed=1))


def test_a_folder_without_the_pipeline_section_returns_28_pixel_digits_as_before(folder):
    manifest = manifest_of(folder)
    del manifest["pipeline"]
    write_manifest(folder, manifest)
    loaded = TextToImagePipeline.from_pretrained(folder)
    assert (loaded.image_size, loaded.conditioning) == (28, "tokens")
    assert loaded("a 3 left of a 7", num_images=2).shape == (2, 28, 28)
    shipped = TextToImagePipeline.from_pretrained()  # retrained since the section exists: it says the same
    assert manifest_of(pretrained_path())["pipeline"] == {"image_size": 28, "conditioning": "tokens"}
    assert shipped.image_size == 28


@pytest.mark.parametrize("section", [{"image_size": 30}, {"image_size": "32"}, {"image_size": 32.0},
                                     {"conditioning": "mean"}, {"space": "voxel"}, {"crop": True}, None, [32]])
def test_a_bad_pipeline_section_is_refused_in_one_line(folder, section):
    manifest = manifest_of(folder)
    manifest["pipeline"] = section
    write_manifest(folder, manifest)
    with pytest.raises(CheckpointError) as info:
        TextToImagePipeline.from_pretrained(folder)
    message = str(info.value)
    assert DAMAGED in message and str(folder) in message and "\n" not in message, message


def test_the_upgrade_command_makes_an_old_scenes_folder_return_32_pixels_and_rewrites_the_manifest_alone(
        folder, capsys):
    from tinydiff.cli import _upgrade_command

    manifest = manifest_of(folder)
    del manifest["pipeline"]  # as the scenes recipe wrote it before the section existed
    write_manifest(folder, manifest)
    weights = {f.name: sha256_file(f) for f in folder.glob("*.npz")}
    status, _, err = run(capsys, "eval", "--model", folder, "--n-per-kind", 2)
    command = _upgrade_command(folder)
    assert_one_line_error(status, err, "28×28", command)
    assert command.startswith("python -c ")
    result = subprocess.run(command.replace("python", sys.executable, 1), shell=True, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {f.name: sha256_file(f) for f in folder.glob("*.npz")} == weights
    assert manifest_of(folder)["pipeline"] == {"image_size": 32, "conditioning": "tokens", "space": "latent"}
    assert TextToImagePipeline.from_pretrained(folder)("two 7s").shape == (1, 32, 32)


def test_pipeline_generator_uses_the_pipelines_own_pictures(pipe, monkeypatch):
    decodes = []
    original = pipe.vae.decode_from_diffusion
    monkeypatch.setattr(pipe.vae, "decode_from_diffusion", lambda z, *a, **k: decodes.append(len(z)) or original(z))
    seen = []
    generate = ev.pipeline_generator(pipe, seed=7, progress=seen.append, steps=2)
    first, second = generate(PROMPTS[:3]), generate(PROMPTS[3:])
    assert sum(decodes) == 4  # each picture decoded once
    np.testing.assert_array_equal(np.concatenate([first, second]), pipe(PROMPTS, seed=7, steps=2))  # seeds 7 … 10
    assert seen == [3, 1]
    with pytest.raises(ValueError, match="28×28 crops"):
        ev.pipeline_generator(TextToImagePipeline(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae,
                                                  pipe.diffusion, config=PipelineConfig(image_size=28)))


def test_the_recipe_saves_32_for_scenes_and_28_for_digits():
    from tinydiff.train.recipes import RecipeConfig, pipeline_config

    assert pipeline_config(RecipeConfig(data="scenes")) == PipelineConfig(image_size=32, conditioning="tokens")
    assert pipeline_config(RecipeConfig()) == PipelineConfig(image_size=28, conditioning="tokens")
    assert pipeline_config(RecipeConfig(data="scenes", conditioning="pooled")).conditioning == "pooled"


# --------------------------------------------------------------------------- 2. tinydiff eval


def test_eval_on_a_scenes_model_prints_every_scene_metric_beside_the_floor(scenes_folder, capsys, monkeypatch):
    calls = {"evaluations": []}
    real_generator, real_evaluate = ev.pipeline_generator, ev.evaluate_scenes

    def generator_spy(pipe, **options):
        calls["options"] = options
        return real_generator(pipe, **options)

    def evaluate_spy(generate, prompts, **options):  # the model's evaluation, then the floor's
        results = real_evaluate(generate, prompts, **options)
        calls["evaluations"].append((list(prompts), results))
        return results

    monkeypatch.setattr(ev, "pipeline_generator", generator_spy)
    monkeypatch.setattr(ev, "evaluate_scenes", evaluate_spy)
    status, out, err = run(capsys, "eval", "--model", scenes_folder, "--n-per-kind", 4, "--steps", 3, "--sampler",
                           "euler", "--guidance", 1.5, "--seed", 5)
    assert status == 0, err
    (model_prompts, model), (floor_prompts, floor) = calls["evaluations"]
    assert model_prompts == floor_prompts == ev.evaluation_prompts(4)  # the floor: the same prompts, real scenes
    assert {k: calls["options"][k] for k in ("seed", "steps", "sampler", "guidance_scale")} == \
        {"seed": 5, "steps": 3, "sampler": "euler", "guidance_scale": 1.5}
    assert floor == ev.scene_floor(4)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in out.splitlines() if line.startswith("| ") and "%" in line}
    metrics = [k for k in model if k != "prompts"]
    assert list(rows) == metrics and len(metrics) == 13  # relations side by side and stacked: one pair of each
    for name in metrics:
        assert rows[name] == [f"{model[name]:.1%}", f"{floor[name]:.1%}"], name
    assert "euler" in out and "3 steps" in out and "guidance 1.5" in out and "20 scene prompts" in out
    assert "generating" in err  # the progress bar


def test_eval_options_that_do_not_fit_the_model_are_one_line_errors(scenes_folder, capsys):
    for args, phrase in ((["--n-per-kind", 3], "even number"), (["--n-per-kind", 0], "even number"),
                         (["--n-per-digit", 5], "--n-per-kind"), (["--n-attribute", 5], "--n-per-kind")):
        status, _, err = run(capsys, "eval", "--model", scenes_folder, *args)
        assert_one_line_error(status, err, phrase)
    status, _, err = run(capsys, "eval", "--n-per-kind", 4)  # the shipped digits model
    assert_one_line_error(status, err, "--n-per-kind is for scenes models", "--n-per-digit")


def test_only_a_tokenizer_that_knows_the_scene_words_makes_a_scenes_pipeline(pipe):
    assert ev.is_scene_pipeline(pipe) and not ev.is_scene_pipeline(TextToImagePipeline.from_pretrained())
    from tinydiff.text.tokenizer import Tokenizer

    fewer_words = [w for w in pipe.tokenizer.words if w != "above"]  # the scenes' words but one
    partial = TextToImagePipeline(Tokenizer(fewer_words), pipe.text_encoder, pipe.unet, pipe.vae, pipe.diffusion)
    assert not ev.is_scene_pipeline(partial)


# --------------------------------------------------------------------------- 3. the shipped name


def test_mnist_scenes_is_a_shipped_name(scenes_folder, tmp_path, capsys, monkeypatch):
    import tinydiff.pipeline as pipeline

    assert pretrained_path("mnist-scenes") == pretrained_path().parent / "mnist-scenes"
    status, out, _ = run(capsys, "info")
    assert status == 0 and "mnist-scenes (U-Net, scenes)" in out
    # the name resolves to the package's folder: missing, the shipped-weights error; present, that folder
    real = pipeline.pretrained_path
    monkeypatch.setattr(pipeline, "pretrained_path", lambda name="mnist-captions": (
        tmp_path / "absent" if name == "mnist-scenes" else real(name)))
    status, _, err = run(capsys, "sample", "a 3 left of a 7", "--model", "mnist-scenes", "--output", tmp_path / "x.npy")
    assert_one_line_error(status, err, "the shipped weights are missing")
    monkeypatch.setattr(pipeline, "pretrained_path", lambda name="mnist-captions": (
        scenes_folder if name == "mnist-scenes" else real(name)))
    status, _, err = run(capsys, "sample", "a 3 left of a 7", "--model", "mnist-scenes", "--num-images", 2,
                         "--output", tmp_path / "x.npy")
    assert status == 0, err
    assert np.load(tmp_path / "x.npy").shape == (2, 32, 32)


# --------------------------------------------------------------------------- 4. tinydiff sample


def test_sample_writes_32_pixel_scenes(pipe, scenes_folder, tmp_path, capsys):
    status, _, err = run(capsys, "sample", "a 3 left of a 7", "--model", scenes_folder, "--num-images", 3, "--seed", 2,
                         "--output", tmp_path / "scenes.npy")
    assert status == 0, err
    images = np.load(tmp_path / "scenes.npy")
    assert images.dtype == np.uint8 and images.shape == (3, 32, 32)
    np.testing.assert_array_equal(images, pipe("a 3 left of a 7", num_images=3, seed=2))
    status, _, err = run(capsys, "sample", "a 3 left of a 7", "--model", scenes_folder, "--num-images", 2,
                         "--output", tmp_path / "scenes.png")
    assert status == 0 and (tmp_path / "scenes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("prompt", ["a 3 left of a 3 above a 7", "a 3", "a 7 left of", "3 left of a 7",
                                    "the number 5", "two 7s above a 3", "left of"])
def test_sample_refuses_a_prompt_outside_the_scene_grammar_in_one_line(scenes_folder, tmp_path, capsys, prompt):
    with pytest.raises(ValueError):
        parse_caption(prompt)
    assert not scene_tokenizer().encode(prompt).unknown_words[0]  # every word is known
    status, _, err = run(capsys, "sample", prompt, "--model", scenes_folder, "--output", tmp_path / "x.npy")
    assert_one_line_error(status, err, "is not a scene caption", "a 3 left of a 7", "four kinds")
    assert not (tmp_path / "x.npy").exists()


def test_sample_takes_every_kind_of_scene_caption_and_reports_unknown_words(scenes_folder, tmp_path, capsys):
    for prompt in ("a 3 left of a 3", "an 8 below a 1", "three 0s", "the number 99", "a big 6"):
        status, _, err = run(capsys, "sample", prompt, "--model", scenes_folder, "--num-images", 1,
                             "--output", tmp_path / "x.npy")
        assert status == 0, (prompt, err)
    status, _, err = run(capsys, "sample", "a bold 3", "--model", scenes_folder, "--output", tmp_path / "x.npy")
    assert_one_line_error(status, err, "never seen", "bold")


def test_words_on_a_scenes_model_names_the_four_kinds_of_caption(scenes_folder, capsys):
    status, out, _ = run(capsys, "words", "--model", scenes_folder)
    assert status == 0 and "four kinds of caption" in out and "Slant" not in out
    for example in ("a 3 left of a 7", "two 7s", "the number 42", "a small 5"):
        parse_caption(example)
        assert f'"{example}"' in out
    status, out, _ = run(capsys, "words")  # the shipped digits model
    assert status == 0 and "Slant" in out and "four kinds" not in out


def test_the_editing_commands_refuse_a_scenes_model(scenes_folder, tmp_path, capsys):
    digits = tmp_path / "digits.npy"
    np.save(digits, np.zeros((1, 28, 28), np.uint8))
    for command in (["edit", digits, "a 3 left of a 7"], ["invert", digits, "a 3 left of a 7"],
                    ["inpaint", digits, "a 3 left of a 7", "--mask", digits]):
        status, _, err = run(capsys, *command, "--model", scenes_folder, "--output", tmp_path / "out.npy")
        assert_one_line_error(status, err, f"{command[0]} takes 28×28 digits", "draws scenes")


# --------------------------------------------------------------------------- 5. pooled conditioning


def test_pooled_context_is_the_eos_state_at_position_0_and_zeros_elsewhere(pipe):
    prompts = ["a 3 left of a 7", "a 3 above a 7", "two 7s", "a 3", "7"]  # 6, 5, 3, 2, 1 words
    tokens = pipe.tokenizer.encode(prompts)
    lengths = tokens.mask.sum(axis=1)
    assert lengths.tolist() == [8, 7, 5, 4, 3]  # <eos> at a different place in each row
    with no_grad():
        hidden, _ = pipe.text_encoder(tokens.ids, tokens.mask)  # (B, L, D)
    context = pooled_context(hidden, tokens.mask)
    assert context.shape == hidden.shape
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(context[b, 0], hidden[b, n - 1])  # the state at <eos>
        assert hidden[b, n - 1].any() and not np.allclose(hidden[b, n - 1], hidden[b, n - 2])
    assert not context[:, 1:].any()
    # the encoder is bidirectional: the <eos> state tells word orders apart
    swapped = pipe.encode_prompt(["a 3 left of a 7", "a 7 left of a 3"])
    pooled = tiny_pipeline(conditioning="pooled").encode_prompt(["a 3 left of a 7", "a 7 left of a 3"])
    assert not np.allclose(pooled[0, 0], pooled[1, 0])
    assert not pooled[:, 1:].any() and swapped[:, 1:].any()


def test_the_pipeline_reads_prompts_pooled_when_its_folder_says_so(tmp_path, monkeypatch):
    tokens_pipe, pooled_pipe = tiny_pipeline(), tiny_pipeline(conditioning="pooled")
    pooled_pipe.save_pretrained(tmp_path / "pooled")
    assert manifest_of(tmp_path / "pooled")["pipeline"]["conditioning"] == "pooled"
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pooled")
    assert loaded.conditioning == "pooled"
    tokens = loaded.tokenizer.encode(PROMPTS)
    with no_grad():
        hidden, _ = loaded.text_encoder(tokens.ids, tokens.mask)
    np.testing.assert_array_equal(loaded.encode_prompt(PROMPTS), pooled_context(hidden, tokens.mask))
    np.testing.assert_array_equal(tokens_pipe.encode_prompt(PROMPTS), hidden)
    # what the U-Net is given while sampling: [null; pooled] under classifier-free guidance
    seen = []
    forward = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t, context=None, *a, **k: seen.append(context) or
                        forward(self, x, t, context, *a, **k))
    loaded(PROMPTS, seed=0)
    null = loaded.unet.null_context(1)[0]
    rows = [row for context in seen for row in context]
    conditional = [row for row in rows if not np.array_equal(row, null)]
    assert len(conditional) == len(rows) / 2 > 0
    assert all(not row[1:].any() and row[0].any() for row in conditional)


def test_training_gives_the_unet_the_pooled_context(tmp_path, monkeypatch):
    """A spy on the U-Net while the recipe trains with conditioning="pooled" on a tiny folder's
    encoders: every context row it sees is the learned null context (conditioning dropout) or
    zero beyond position 0; the checkpoint and the saved pipeline record "pooled"."""
    from tinydiff.train.recipes import quick_recipe, train_mnist_captions

    encoders = tmp_path / "encoders"
    tiny_pipeline().save_pretrained(encoders)
    seen = []
    forward = UNet.forward

    def spy(self, x, t, context=None, *args, **kwargs):
        if self.training:
            seen.append((np.array(context), self.null_context(1)[0].copy()))
        return forward(self, x, t, context, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", spy)
    config = replace(quick_recipe(), data="scenes", threads=1, encoders=str(encoders), conditioning="pooled",
                     unet_steps=3)
    pipe = train_mnist_captions(tmp_path / "run", config=config)
    assert len(seen) == 3
    prompted = 0
    for context, null in seen:
        for row in context:
            if not np.array_equal(row, null):
                assert not row[1:].any() and row[0].any()
                prompted += 1
    assert prompted > 0
    assert load_checkpoint(tmp_path / "run" / "unet" / "state.npz")[1]["config"]["conditioning"] == "pooled"
    assert pipe.conditioning == "pooled"
    assert manifest_of(tmp_path / "run" / "model")["pipeline"] == {"image_size": 32, "conditioning": "pooled",
                                                                    "space": "latent"}


def test_caption_conditioning_with_tokens_is_the_text_encoders_states(pipe):
    from tinydiff.data.scenes import load_scene_data
    from tinydiff.train.clip import draw_captions
    from tinydiff.train.latent_unet import CaptionConditioning

    data = load_scene_data(16, seed=1)
    indices = np.arange(16)
    captions = draw_captions(data, indices, np.random.default_rng(3))
    tokens = pipe.tokenizer.encode(captions)
    with no_grad():
        hidden, _ = pipe.text_encoder(tokens.ids, tokens.mask)
    for conditioning, expected in (("tokens", hidden), ("pooled", pooled_context(hidden, tokens.mask))):
        context, mask = CaptionConditioning(pipe.text_encoder, pipe.tokenizer, data, conditioning).encode(
            indices, np.random.default_rng(3))
        np.testing.assert_array_equal(context, expected)
        assert mask is None
    with pytest.raises(ValueError, match="tokens or pooled"):
        CaptionConditioning(pipe.text_encoder, pipe.tokenizer, data, "mean")


def test_the_recipe_refuses_to_mix_conditionings_and_offers_no_lcm_for_pooled(tmp_path):
    from tinydiff.train.recipes import RecipeError, quick_recipe, recipe_stages, train_mnist_captions

    encoders = tmp_path / "encoders"
    tiny_pipeline().save_pretrained(encoders)
    config = replace(quick_recipe(), data="scenes", threads=1, encoders=str(encoders), unet_steps=2)
    assert recipe_stages(config) == ("unet", "lcm")
    assert recipe_stages(replace(config, conditioning="pooled")) == ("unet",)
    train_mnist_captions(tmp_path / "run", config=config)  # tokens
    with pytest.raises(RecipeError, match="trained with tokens conditioning"):
        train_mnist_captions(tmp_path / "run", config=replace(config, conditioning="pooled", unet_steps=3), resume=True)
    with pytest.raises(RecipeError, match="tokens or pooled"):
        train_mnist_captions(tmp_path / "other", config=replace(config, conditioning="mean"))


def test_cli_trains_the_pooled_ablation_on_a_finished_runs_encoders(tmp_path, capsys):
    encoders = tmp_path / "encoders"
    tiny_pipeline().save_pretrained(encoders)
    out = tmp_path / "pooled"
    status, stdout, err = run(capsys, "train", "mnist-scenes", "--quick", "--conditioning", "pooled", "--encoders",
                              encoders, "--threads", 1, "--out", out)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["model", "unet"]  # the denoiser alone
    loaded = TextToImagePipeline.from_pretrained(out / "model")
    assert (loaded.conditioning, loaded.image_size) == ("pooled", 32)
    assert sha256_file(out / "model" / "text_encoder.npz") == sha256_file(encoders / "text_encoder.npz")
    for args, phrase in ((["--conditioning", "mean"], "--conditioning must be tokens or pooled"),
                         (["--conditioning", "pooled", "--stages", "lcm"], "lcm distils token conditioning only")):
        status, _, err = run(capsys, "train", "mnist-scenes", "--quick", *args, "--out", tmp_path / "bad")
        assert_one_line_error(status, err, phrase)


def test_the_recipe_trains_the_clip_stage_with_the_text_objective_it_is_given(tmp_path, monkeypatch):
    """--text-objective slots reaches train_clip (a spy), and the clip checkpoint holds the slot
    head; the default stays contrastive."""
    from tinydiff.train import recipes
    from tinydiff.train.clip import load_clip

    asked = []
    original = recipes.train_clip

    def spy(*args, **kwargs):
        asked.append(kwargs.get("text_objective", "contrastive"))
        return original(*args, **kwargs)

    monkeypatch.setattr(recipes, "train_clip", spy)
    config = replace(recipes.quick_recipe(), data="scenes", threads=1, text_objective="slots")
    assert recipes.train_mnist_captions(tmp_path / "slots", config=config, stages=["clip"]) is None
    assert load_clip(tmp_path / "slots" / "clip" / "state.npz", slot_head=True)[0].slot_head is not None
    recipes.train_mnist_captions(tmp_path / "plain", config=replace(config, text_objective="contrastive"),
                                 stages=["clip"])
    assert asked == ["slots", "contrastive"]


def test_cli_text_objective_reaches_the_recipe_and_bad_values_are_one_line(tmp_path, capsys, monkeypatch):
    from tinydiff.train import recipes

    seen = []
    monkeypatch.setattr(recipes, "train_mnist_captions", lambda out, **kw: seen.append(kw["config"]))
    status, _, err = run(capsys, "train", "mnist-scenes", "--quick", "--text-objective", "slots", "--out",
                         tmp_path / "a")
    assert status == 0, err
    assert seen[-1].text_objective == "slots"
    monkeypatch.undo()
    status, _, err = run(capsys, "train", "mnist-captions", "--quick", "--text-objective", "slots", "--out",
                         tmp_path / "b")
    assert status == 2 and err.count("\n") == 1
    assert "needs scene captions" in err and "--text-objective contrastive" in err
    status, _, err = run(capsys, "train", "mnist-scenes", "--quick", "--text-objective", "tokens", "--out",
                         tmp_path / "c")
    assert status == 2 and "unknown text objective 'tokens'; valid: contrastive, slots" in err


def test_unet_attention_8x8_puts_cross_attention_at_both_levels(tmp_path, capsys):
    """--unet-attention 8x8 (RecipeConfig.unet_attention): the latent U-Net trained and saved has
    a transformer at its 8×8 level as well; the default has it at 4×4 only; wrong uses are one line."""
    encoders = tmp_path / "encoders"
    tiny_pipeline().save_pretrained(encoders)
    for option, levels in (("8x8", [True, True]), ("4x4", [False, True])):
        out = tmp_path / option
        status, _, err = run(capsys, "train", "mnist-scenes", "--quick", "--unet-attention", option, "--encoders",
                             encoders, "--threads", 1, "--out", out, "--stages", "unet")
        assert status == 0, err
        assert load_checkpoint(out / "model" / "unet.npz")[1]["config"]["attention_levels"] == levels
        assert json.loads((out / "recipe.json").read_text())["config"]["unet_attention"] == option
        assert TextToImagePipeline.from_pretrained(out / "model").unet.config.attention_levels == tuple(levels)
    for args, phrase in ((["--unet-attention", "16x16"], "--unet-attention must be 4x4 or 8x8"),
                         (["--unet-attention", "8x8", "--denoiser", "dit"], "is for the latent U-Net"),
                         (["--unet-attention", "8x8", "--space", "pixel"], "is for the latent U-Net")):
        status, _, err = run(capsys, "train", "mnist-scenes", "--quick", *args, "--out", tmp_path / "bad")
        assert_one_line_error(status, err, phrase)


def test_the_recipe_refuses_8x8_attention_for_a_dit_or_pixel_space(tmp_path):
    from tinydiff.train.recipes import RecipeError, quick_recipe, train_mnist_captions

    config = replace(quick_recipe(), data="scenes", threads=1, unet_attention="8x8")
    for bad in (dict(denoiser="dit"), dict(space="pixel"), dict(unet_attention="2x2")):
        with pytest.raises(RecipeError, match="unet_attention|latent U-Net"):
            train_mnist_captions(tmp_path / "run", config=replace(config, **bad))


def test_cli_loss_weighting_and_lr_reach_the_recipe_and_bad_values_are_one_line(tmp_path, capsys):
    encoders = tmp_path / "encoders"
    tiny_pipeline().save_pretrained(encoders)
    out = tmp_path / "run"
    status, _, err = run(capsys, "train", "mnist-scenes", "--quick", "--loss-weighting", "min_snr", "--lr", "2e-3",
                         "--encoders", encoders, "--threads", 1, "--out", out, "--stages", "unet")
    assert status == 0, err
    recorded = json.loads((out / "recipe.json").read_text())["config"]
    assert (recorded["loss_weighting"], recorded["unet_lr"]) == ("min_snr", 2e-3)
    assert load_checkpoint(out / "unet" / "state.npz")[1]["config"]["diffusion"]["loss_weighting"] == "min_snr"
    for args, phrase in ((["--loss-weighting", "snr"], "--loss-weighting must be plain or min_snr"),
                         (["--lr", "0"], "--lr must be a learning rate in (0, 1]"),
                         (["--lr", "nan"], "--lr must be a learning rate in (0, 1]")):
        status, _, err = run(capsys, "train", "mnist-scenes", "--quick", *args, "--out", tmp_path / "bad")
        assert_one_line_error(status, err, phrase)


def test_cli_mnist_scenes_defaults_are_the_scenes_recipe_and_each_can_be_ablated(tmp_path, capsys, monkeypatch):
    """tinydiff train mnist-scenes takes scenes_recipe()'s settings (slots, 8×8 attention, min-SNR,
    lr 2e-3, 11,000 steps, guidance 4); mnist-captions keeps its own; each scenes default is undone
    by its flag (the ablations); a DiT or pixel space keeps the scenes text objective and 4×4."""
    from tinydiff.train import recipes

    seen = []
    monkeypatch.setattr(recipes, "train_mnist_captions", lambda out, **kw: seen.append(kw["config"]))

    def config(*args):
        status, _, err = run(capsys, "train", *args, "--out", tmp_path / "run")
        assert status == 0, err
        return seen[-1]

    scenes = config("mnist-scenes")
    assert (scenes.data, scenes.text_objective, scenes.unet_attention, scenes.loss_weighting, scenes.unet_lr,
            scenes.unet_steps, scenes.guidance_scale) == ("scenes", "slots", "8x8", "min_snr", 2e-3, 11000, 4.0)
    assert scenes == recipes.scenes_recipe()
    digits = config("mnist-captions")
    assert digits == recipes.RecipeConfig()
    assert config("mnist-captions", "--denoiser", "dit") == recipes.dit_recipe()
    assert config("mnist-captions", "--space", "pixel") == recipes.pixel_recipe()
    assert (digits.text_objective, digits.unet_attention, digits.loss_weighting, digits.guidance_scale) == (
        "contrastive", "4x4", "plain", 2.0)
    ablated = config("mnist-scenes", "--text-objective", "contrastive", "--unet-attention", "4x4")
    assert (ablated.text_objective, ablated.unet_attention) == ("contrastive", "4x4")
    assert ablated == replace(recipes.scenes_recipe(), text_objective="contrastive", unet_attention="4x4")
    for args, denoiser, space in ((["--denoiser", "dit"], "dit", "latent"), (["--space", "pixel"], "unet", "pixel")):
        other = config("mnist-scenes", *args)
        assert (other.denoiser, other.space, other.unet_attention, other.text_objective, other.guidance_scale) == (
            denoiser, space, "4x4", "slots", 4.0)
        assert other.unet_lr == 2e-3 and other.loss_weighting == "min_snr" and other.unet_steps == 6000
    quick = config("mnist-scenes", "--quick")
    assert (quick.text_objective, quick.unet_attention, quick.unet_steps) == ("slots", "8x8",
                                                                              recipes.quick_recipe().unet_steps)


def test_the_saved_pipeline_samples_with_the_recipes_guidance(tmp_path):
    """RecipeConfig.guidance_scale becomes the pipeline's default w; a bad one is refused before training."""
    from tinydiff.train.recipes import RecipeError, quick_recipe, train_mnist_captions

    encoders = tmp_path / "encoders"
    tiny_pipeline().save_pretrained(encoders)
    config = replace(quick_recipe(), data="scenes", threads=1, encoders=str(encoders), guidance_scale=3.5)
    pipe = train_mnist_captions(tmp_path / "run", config=config)
    assert pipe.defaults.guidance_scale == 3.5
    assert TextToImagePipeline.from_pretrained(tmp_path / "run" / "model").defaults.guidance_scale == 3.5
    for bad in (-1.0, float("nan")):
        with pytest.raises(RecipeError, match="guidance_scale must be a finite number"):
            train_mnist_captions(tmp_path / "bad", config=replace(config, guidance_scale=bad))
