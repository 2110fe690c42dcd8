"""Latent consistency distillation: the student's guidance embedding, the teacher's skip-step
solve, one distillation step against Algorithm 1 row by row, its gradients, and the loop."""

import numpy as np
import pytest

from tinydiff.diffusion import Denoiser, DiffusionConfig
from tinydiff.diffusion.consistency import ConsistencyFunction
from tinydiff.diffusion.samplers import sample_ddim
from tinydiff.models.embeddings import guidance_embedding, timestep_embedding
from tinydiff.models.unet import UNet, UNetConfig
from tinydiff.nn import gradcheck, gradcheck_module, no_grad
from tinydiff.nn.optim import EMA
from tinydiff.train.lcm import (
    LCMConfig,
    distill,
    guided_ddim_solve,
    last_timestep,
    lcm_grads,
    make_student,
    pseudo_huber_loss,
)
from tinydiff.train.loop import LoopConfig

TOL = 1e-6
DIFFUSION = DiffusionConfig(schedule="linear", num_timesteps=1000, prediction_type="epsilon")
SCHEDULE = DIFFUSION.make_schedule()


def tiny_config(**overrides):
    """2 levels (8, 16 channels), attention at level 1, cross-attention to (B, 3, 6) contexts."""
    fields = dict(in_channels=2, out_channels=2, sample_size=8, block_channels=(8, 16), attention_levels=(False, True),
                  context_dim=6, context_length=3, learned_null_context=True, heads=2, dim_head=4, groups=4,
                  time_embed_dim=16)
    fields.update(overrides)
    return UNetConfig(**fields)


def tiny_teacher(dtype=np.float64, seed=1):
    teacher = UNet(tiny_config(), seed=seed)
    return teacher.double() if dtype == np.float64 else teacher


def randomise_guidance_projection(student, seed=5):
    """A trained student's projection is not zero: give it weights so every path is exercised."""
    weight = student.time_embedding.cond_proj.weight
    weight.data[...] = 0.3 * np.random.default_rng(seed).standard_normal(weight.shape)


class FixedConditioning:
    """contexts[indices]: a stand-in for the frozen text encoder (draws nothing from the generator)."""

    def __init__(self, contexts):
        self.contexts = contexts

    def encode(self, indices, generator):
        return self.contexts[indices], None


# --------------------------------------------------------------------- the student network


def test_guidance_embedding_is_the_timestep_sinusoids_of_1000_w():
    w = np.array([1.0, 2.5, 4.0])
    np.testing.assert_array_equal(guidance_embedding(w, 8), timestep_embedding(1000 * w, 8))


def test_fresh_student_equals_the_teachers_conditional_prediction():
    teacher = tiny_teacher()
    student = make_student(teacher)
    gen = np.random.default_rng(0)
    x, t, context = gen.standard_normal((3, 2, 8, 8)), np.array([3.0, 200.0, 700.0]), gen.standard_normal((3, 3, 6))
    with no_grad():
        expected = teacher(x, t, context)
        for w in ([1.0, 1.0, 1.0], [1.5, 3.0, 4.0]):
            np.testing.assert_array_equal(student(x, t, context, w=np.array(w)), expected)
    assert student.config.guidance_embedding and not teacher.config.guidance_embedding


def test_student_reads_w_once_its_projection_is_trained():
    student = make_student(tiny_teacher())
    randomise_guidance_projection(student)
    gen = np.random.default_rng(1)
    x, context = gen.standard_normal((2, 2, 8, 8)), gen.standard_normal((2, 3, 6))
    with no_grad():
        a = student(x, np.array([50.0, 50.0]), context, w=np.array([1.0, 1.0]))
        b = student(x, np.array([50.0, 50.0]), context, w=np.array([1.0, 3.0]))
    np.testing.assert_array_equal(a[0], b[0])  # rows are independent
    assert np.abs(a[1] - b[1]).max() > 1e-3


def test_w_is_required_by_a_student_and_refused_by_a_teacher():
    teacher = tiny_teacher()
    student = make_student(teacher)
    x, t, context = np.zeros((1, 2, 8, 8)), np.array([5.0]), np.zeros((1, 3, 6))
    with pytest.raises(ValueError, match="guidance scale"):
        student(x, t, context)
    with pytest.raises(ValueError, match="no guidance embedding"):
        teacher(x, t, context, w=np.array([2.0]))


def test_student_gradcheck_including_the_guidance_projection():
    student = make_student(tiny_teacher())
    randomise_guidance_projection(student)
    gen = np.random.default_rng(2)
    x, t, context = gen.standard_normal((2, 2, 8, 8)), np.array([3, 700]), gen.standard_normal((2, 3, 6))
    errors = gradcheck_module(student, x, t, context, num_samples=2, eps=1e-5, input_names=["x", "context"],
                              forward_kwargs={"w": np.array([1.3, 3.7])})
    assert "time_embedding.cond_proj.weight" in errors
    bad = {k: e for k, e in errors.items() if not e < TOL}
    assert not bad, bad


# --------------------------------------------------------------------- the teacher's solve


def test_skip_step_solve_is_the_samplers_guided_ddim_step():
    """One row at a time, the solve equals the project's DDIM sampler with the Denoiser's CFG."""
    teacher = tiny_teacher()
    gen = np.random.default_rng(3)
    x = gen.standard_normal((3, 2, 8, 8)) * 4
    context = gen.standard_normal((3, 3, 6))
    t_next, t_prev = np.array([417, 20, 300]), np.array([397, 0, 280])
    w = np.array([1.0, 2.5, 3.75])
    sigma, sigma_prev = SCHEDULE.sigmas[t_next], SCHEDULE.sigmas[t_prev]
    x = x * sigma[:, None, None, None]
    with no_grad():
        solved = guided_ddim_solve(teacher, SCHEDULE, "epsilon", x, sigma, sigma_prev, w, context,
                                   teacher.null_context(3))
        for i in range(3):
            steps = []
            denoiser = Denoiser(teacher, SCHEDULE, "epsilon", context=context[i:i + 1],
                                uncond_context=teacher.null_context(1), guidance_scale=w[i])
            sample_ddim(denoiser, x[i:i + 1], np.array([sigma[i], sigma_prev[i], 0.0]), callback=steps.append)
            np.testing.assert_allclose(solved[i:i + 1], steps[1]["x"], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------- one distillation step


def tiny_setup(loss="huber", seed=0):
    gen = np.random.default_rng(seed)
    latents = gen.standard_normal((6, 2, 8, 8))
    conditioning = FixedConditioning(gen.standard_normal((6, 3, 6)))
    teacher = tiny_teacher()
    config = LCMConfig(skip=20, w_min=1.0, w_max=4.0, sigma_max=14.6, loss=loss, batch_size=4)
    return teacher, latents, conditioning, config


def expected_step_loss(teacher, student, target_net, latents, conditioning, config, generator):
    """Algorithm 1 written out row by row with the project's own pieces, drawing in the step's order."""
    b = config.batch_size
    t_max = last_timestep(SCHEDULE, config.sigma_max)
    idx = generator.integers(0, len(latents), size=b)
    t_next = generator.integers(1, t_max + 1, size=b)
    w = generator.uniform(config.w_min, config.w_max, size=b)
    noise = generator.standard_normal((b,) + latents.shape[1:])
    context, _ = conditioning.encode(idx, generator)
    losses = []
    with no_grad():
        for i in range(b):
            t_prev = max(t_next[i] - config.skip, 0)
            sigma, sigma_prev = SCHEDULE.sigmas[t_next[i]], SCHEDULE.sigmas[t_prev]
            x = latents[idx[i]][None] + sigma * noise[i][None]
            teacher_d = Denoiser(teacher, SCHEDULE, "epsilon", context=context[i:i + 1],
                                 uncond_context=teacher.null_context(1), guidance_scale=w[i])
            steps = []
            sample_ddim(teacher_d, x, np.array([sigma, sigma_prev, 0.0]), callback=steps.append)
            x_prev = steps[1]["x"]

            def network(net, wi=w[i]):
                return lambda x_in, t, c: net(x_in, t, c, w=np.array([wi]))

            f_target = ConsistencyFunction(Denoiser(network(target_net), SCHEDULE, "epsilon", context=context[i:i + 1]),
                                           SCHEDULE)
            f_student = ConsistencyFunction(Denoiser(network(student), SCHEDULE, "epsilon", context=context[i:i + 1]),
                                            SCHEDULE)
            diff = f_student(x, sigma) - f_target(x_prev, sigma_prev)
            if config.loss == "huber":
                losses.append(np.sqrt(diff**2 + config.huber_c**2) - config.huber_c)
            else:
                losses.append(diff**2)
    return float(np.mean(losses)), t_next


@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_one_step_is_algorithm_1_row_by_row(loss):
    teacher, latents, conditioning, config = tiny_setup(loss)
    student = make_student(teacher)
    randomise_guidance_projection(student)
    target = EMA(student, config.target_decay)
    # the target network differs from the student (as after some training)
    for name, s in target.shadow.items():
        s += 0.01 * np.random.default_rng(len(name)).standard_normal(s.shape)
    target_net = UNet(student.config).double()
    target.copy_to(target_net)
    step = lcm_grads(student, teacher, target, latents, conditioning, config, DIFFUSION)
    loss_value, _ = step(0, np.random.default_rng(9))
    expected, t_next = expected_step_loss(teacher, student, target_net, latents, conditioning, config,
                                          np.random.default_rng(9))
    np.testing.assert_allclose(loss_value, expected, rtol=1e-9)


def test_last_timestep_is_the_last_sigma_not_above_sigma_max():
    t_max = last_timestep(SCHEDULE, 14.6)
    assert SCHEDULE.sigmas[t_max] <= 14.6 < SCHEDULE.sigmas[t_max + 1]
    assert last_timestep(SCHEDULE, float(SCHEDULE.sigmas[25])) == 25


def test_a_step_near_the_boundary_jumps_to_sigma_min():
    """With t_max = 25 and k = 20, most starts clamp to t_n = 0, where the target is x̂_n itself."""
    teacher, latents, conditioning, config = tiny_setup("l2")
    config.sigma_max = float(SCHEDULE.sigmas[25])
    student = make_student(teacher)
    randomise_guidance_projection(student)
    target = EMA(student, config.target_decay)
    step = lcm_grads(student, teacher, target, latents, conditioning, config, DIFFUSION)
    loss_value, _ = step(0, np.random.default_rng(4))
    target_net = UNet(student.config).double()
    target.copy_to(target_net)
    expected, t_next = expected_step_loss(teacher, student, target_net, latents, conditioning, config,
                                          np.random.default_rng(4))
    assert (t_next <= config.skip).any() and (t_next > config.skip).any() and t_next.max() <= 25
    np.testing.assert_allclose(loss_value, expected, rtol=1e-9)


@pytest.mark.parametrize("loss,t_max", [("huber", 726), ("l2", 726), ("l2", 1)])
def test_distillation_step_gradcheck(loss, t_max):
    """Float64 central differences of the step's loss in every student parameter sampled,
    the guidance projection included; the teacher and θ⁻ are fixed. With t_max = 1 every row
    starts at t = 1, where c_out = 10/√100.25 is visibly below 1 (above, c_out ≈ 1 would hide
    a dropped c_out)."""
    teacher, latents, conditioning, config = tiny_setup(loss)
    config.sigma_max = float(SCHEDULE.sigmas[t_max])
    config.huber_c = 0.05  # smooth enough for ε = 1e-5 on errors of this size
    student = make_student(teacher)
    randomise_guidance_projection(student)
    target_state = {k: v + 0.02 for k, v in student.state_dict().items()}
    params = dict(student.named_parameters())

    def run():
        target = EMA(student, config.target_decay)
        target.shadow = {k: v.copy() for k, v in target_state.items()}
        step = lcm_grads(student, teacher, target, latents, conditioning, config, DIFFUSION)
        student.zero_grad()
        loss_value, _ = step(0, np.random.default_rng(6))
        return loss_value

    def forward():
        return np.array([run()])

    def backward(dout):
        run()
        return {name: p.grad * float(dout[0]) for name, p in params.items()}

    names = ["time_embedding.cond_proj.weight", "time_embedding.linear_1.weight", "conv_in.weight",
             "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.bias",
             "up_blocks.0.resnets.0.conv1.weight"]
    names = [n for n in names if n in params]
    errors = gradcheck(forward, backward, {n: params[n].data for n in names}, eps=1e-5, num_samples=3)
    assert "time_embedding.cond_proj.weight" in errors
    bad = {k: e for k, e in errors.items() if not e < TOL}
    assert not bad, bad


def test_pseudo_huber_value_and_gradient():
    pred, target = np.array([[0.5, -2.0], [0.001, 0.0]]), np.array([[0.0, 1.0], [0.0, 0.0]])
    loss, grad = pseudo_huber_loss(pred, target, 0.1)
    diff = pred - target
    np.testing.assert_allclose(loss, np.mean(np.sqrt(diff**2 + 0.01) - 0.1), rtol=1e-13)
    eps = 1e-6
    for i in np.ndindex(pred.shape):
        up, down = pred.copy(), pred.copy()
        up[i] += eps
        down[i] -= eps
        numeric = (pseudo_huber_loss(up, target, 0.1)[0] - pseudo_huber_loss(down, target, 0.1)[0]) / (2 * eps)
        np.testing.assert_allclose(grad[i], numeric, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------- the loop


def test_target_is_the_loops_ema_and_resume_is_exact(tmp_path):
    teacher, latents, conditioning, config = tiny_setup("huber")
    loop = LoopConfig(total_steps=4, lr=1e-3, warmup_steps=1, checkpoint_every=2, seed=3)
    full = distill(teacher, latents, conditioning, loop, config, DIFFUSION)
    # The step function updates θ⁻ before each step but the first, the loop after each step: one
    # more update with the final weights makes them the same, bit for bit.
    full["target"].update(full["student"])
    for name, value in full["ema"].shadow.items():
        np.testing.assert_array_equal(full["target"].shadow[name], value)
    halves = tmp_path / "state.npz"
    distill(teacher, latents, conditioning, loop, config, DIFFUSION, checkpoint_path=halves, stop_at=2)
    resumed = distill(teacher, latents, conditioning, loop, config, DIFFUSION, checkpoint_path=halves, resume=True)
    assert resumed["history"] == full["history"]
    for name, p in full["student"].named_parameters():
        np.testing.assert_array_equal(dict(resumed["student"].named_parameters())[name].data, p.data)
    assert full["history"][0] != full["history"][-1]


# --------------------------------------------------------------------- the pipeline, the recipe, the CLI


def shipped_parts():
    from tinydiff.pipeline import TextToImagePipeline

    shipped = TextToImagePipeline.from_pretrained()
    return shipped, (shipped.tokenizer, shipped.text_encoder, shipped.unet, shipped.vae, shipped.diffusion)


def pipeline_with(student):
    from tinydiff.pipeline import TextToImagePipeline

    shipped, parts = shipped_parts()
    return TextToImagePipeline(*parts, shipped.defaults, image_encoder=shipped.image_encoder, lcm_unet=student)


def trained_looking_student(teacher):
    student = make_student(teacher)
    weight = student.time_embedding.cond_proj.weight
    weight.data[...] = 0.05 * np.random.default_rng(0).standard_normal(weight.shape)  # w changes the output
    return student.eval()


def test_pipeline_without_a_student_refuses_lcm_in_one_line():
    pipe = pipeline_with(None)
    with pytest.raises(ValueError) as info:
        pipe("a handwritten 7", sampler="lcm", steps=4)
    message = str(info.value)
    assert "tinydiff train mnist-captions --out RUN --stages lcm" in message and "\n" not in message


def test_lcm_sampling_is_one_student_call_per_step_on_b_rows_with_w_as_input():
    """pipe(sampler="lcm") = sample_lcm over the trailing grid with the student's f(z, σ, w):
    one call per step on B rows, the teacher never called, and w reaching the network."""
    from tinydiff.diffusion import get_sigmas, per_sample_generators, randn_per_sample
    from tinydiff.diffusion.samplers import sample_lcm

    shipped, _ = shipped_parts()
    pipe = pipeline_with(trained_looking_student(shipped.unet))
    prompts = ["a handwritten 7", "a bold handwritten 2", "a handwritten 0"]
    student_rows, teacher_rows = [], []
    pipe.lcm_unet.set_attention_callback(lambda name, probs: student_rows.append((name, probs.shape[0])))
    pipe.unet.set_attention_callback(lambda name, probs: teacher_rows.append(probs.shape[0]))
    images, z0 = pipe(prompts, sampler="lcm", steps=3, guidance_scale=2.5, seed=11, return_latents=True)
    layers = len({name for name, _ in student_rows})
    assert len(student_rows) == 3 * layers and {b for _, b in student_rows} == {3} and not teacher_rows
    pipe.lcm_unet.set_attention_callback(None)

    context = pipe.encode_prompt(prompts)
    w = np.full(3, 2.5, dtype=np.float32)
    model = lambda x, t, c: pipe.lcm_unet(x, t, c, w=w)  # noqa: E731
    f = ConsistencyFunction(Denoiser(model, pipe.schedule, "epsilon", context=context), pipe.schedule)
    sigmas = get_sigmas(pipe.schedule, 3, "trailing", sigma_max=pipe.defaults.sigma_max)
    gens = per_sample_generators(11, 3)
    z = randn_per_sample(gens, (3, 4, 8, 8)) * float(sigmas[0])
    with no_grad():
        expected = sample_lcm(f, z, sigmas, rng=gens, sigma_min=pipe.schedule.sigma_min)
    np.testing.assert_allclose(z0, expected, rtol=1e-5, atol=1e-5)
    other_w = pipe(prompts, sampler="lcm", steps=3, guidance_scale=1.0, seed=11, return_latents=True)[1]
    assert np.abs(other_w - z0).max() > 1e-3


def test_lcm_takes_no_negative_prompt():
    shipped, _ = shipped_parts()
    pipe = pipeline_with(trained_looking_student(shipped.unet))
    with pytest.raises(ValueError, match="no negative prompt"):
        pipe("a handwritten 7", negative_prompt="a handwritten 1", sampler="lcm")


def test_the_student_is_saved_listed_and_checked(tmp_path):
    import json
    import shutil

    from tinydiff.io import CheckpointError, save_checkpoint, sha256_file
    from tinydiff.nn import to_state_arrays
    from tinydiff.pipeline import TextToImagePipeline, pretrained_path

    shipped, _ = shipped_parts()
    student = trained_looking_student(shipped.unet)
    folder = tmp_path / "model"
    shutil.copytree(pretrained_path(), folder)
    for extra in folder.glob("lcm_unet.npz"):
        extra.unlink()
    manifest = json.loads((folder / "model_index.json").read_text())
    manifest["files"].pop("lcm_unet", None)
    (folder / "model_index.json").write_text(json.dumps(manifest))
    before = {f.name: f.read_bytes() for f in folder.glob("*.npz")}

    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.lcm_unet is None
    pipe.lcm_unet = student
    pipe.save_pretrained(folder, only=["lcm_unet"])  # adds the student, leaves the rest as it is
    assert {f.name: f.read_bytes() for f in folder.glob("*.npz") if f.name in before} == before
    manifest = json.loads((folder / "model_index.json").read_text())
    assert manifest["files"]["lcm_unet"] == {"path": "lcm_unet.npz", "sha256": sha256_file(folder / "lcm_unet.npz")}
    loaded = TextToImagePipeline.from_pretrained(folder)
    for name, p in student.named_parameters():
        np.testing.assert_array_equal(dict(loaded.lcm_unet.named_parameters())[name].data, p.data)

    # a teacher U-Net passed off as the student, with a matching sha256, is refused
    save_checkpoint(folder / "lcm_unet.npz", to_state_arrays(shipped.unet), kind="lcm_unet",
                    config=shipped.unet.config.to_dict())
    manifest["files"]["lcm_unet"]["sha256"] = sha256_file(folder / "lcm_unet.npz")
    (folder / "model_index.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="guidance embedding"):
        TextToImagePipeline.from_pretrained(folder)
    manifest["files"]["lcm_unet"]["sha256"] = "0" * 64
    (folder / "model_index.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lcm_unet.npz does not match its sha256"):
        TextToImagePipeline.from_pretrained(folder)


def run_cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tinydiff.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_cli_lcm_without_a_student_is_one_line_with_the_fix(tmp_path):
    import shutil

    from tinydiff.pipeline import pretrained_path

    folder = tmp_path / "model"
    shutil.copytree(pretrained_path(), folder)
    pipe = pipeline_with(None)
    pipe.save_pretrained(folder, only=[])  # the same folder, the student left out of the manifest
    for args in (["sample", "a 7", "--sampler", "lcm", "--model", str(folder)],
                 ["eval", "--sampler", "lcm", "--model", str(folder), "--n-per-digit", "2"]):
        result = run_cli(*args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "--stages lcm" in lines[0] and lines[0].startswith("tinydiff: error:")
    assert not list(tmp_path.glob("*.png"))


def test_recipe_distils_the_runs_unet_with_stages_lcm(tmp_path):
    import json

    from tinydiff.pipeline import TextToImagePipeline
    from tinydiff.train.recipes import RecipeError, quick_recipe, train_mnist_captions

    config = quick_recipe()
    config.threads = 1
    with pytest.raises(RecipeError, match="--stages clip,vae,unet"):
        train_mnist_captions(tmp_path / "fresh", stages=("lcm",), config=config)
    pipe = train_mnist_captions(tmp_path, config=config)
    assert pipe.lcm_unet is None and not (tmp_path / "lcm").exists()
    pipe = train_mnist_captions(tmp_path, stages=("lcm",), resume=True, config=config)
    assert pipe.lcm_unet is not None and (tmp_path / "samples_lcm.png").is_file()
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "model")
    np.testing.assert_array_equal(loaded("a handwritten 3", sampler="lcm", steps=2, seed=1),
                                  pipe("a handwritten 3", sampler="lcm", steps=2, seed=1))
    record = json.loads((tmp_path / "recipe.json").read_text())
    assert set(record["seconds"]) == {"clip", "vae", "unet", "lcm"}


def test_the_shipped_student_draws_the_digit_asked_for_in_4_steps(tmp_path):
    from tinydiff.metrics import prompt_accuracy
    from tinydiff.pipeline import TextToImagePipeline
    from tinydiff.text.captions import DIGIT_WORDS
    from tinydiff.train.classifier import load_classifier

    pipe = TextToImagePipeline.from_pretrained()
    assert pipe.lcm_unet is not None and pipe.lcm_unet.config.guidance_embedding
    labels = np.repeat(np.arange(10), 2)
    images = pipe([f"a handwritten {DIGIT_WORDS[d]}" for d in labels], sampler="lcm", steps=4, seed=0)
    assert prompt_accuracy(load_classifier(), images, labels) >= 0.9
    result = run_cli("sample", "a handwritten 7", "--sampler", "lcm", "--steps", "4", "--num-images", "2",
                     "--output", "x.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "x.npy").shape == (2, 28, 28)
