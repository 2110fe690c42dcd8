"""tinydiff.cost: FLOPs counted from real forward passes, checked against hand counts written from
the formulas, against the architecture lists block by block, against an independent tally of the
functional products, and calls per image against samplers actually run."""

import contextlib

import numpy as np
import pytest

from tinydiff import cost
from tinydiff.diffusion import Denoiser, get_sigmas, make_schedule
from tinydiff.diffusion.samplers import SAMPLERS, get_sampler
from tinydiff.models import AutoencoderKL, TextEncoder, TextEncoderConfig, UNet, UNetConfig
from tinydiff.models.blocks import ResBlock, SpatialTransformer
from tinydiff.nn import Attention, functional as F, no_grad
from tinydiff.train.latent_unet import latent_unet_config


def zeros(*shape):
    return np.zeros(shape, dtype=np.float32)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- hand counts


def test_resblock_hand_count():
    """ResBlock(8 → 16, temb 12) on a batch of 2 at 6×5 (H ≠ W), written out from the formulas."""
    block = ResBlock(8, 16, 12, groups=4)
    with no_grad(), cost.count_flops(block) as count:
        block(rand(2, 8, 6, 5), rand(2, 12))
    hw = 6 * 5
    conv1 = 2 * 2 * 16 * hw * 8 * 3 * 3  # 2 · N · C_out · H · W · C_in · k · k
    time_proj = 2 * 2 * 12 * 16  # 2 · rows · in · out, one row per image
    conv2 = 2 * 2 * 16 * hw * 16 * 3 * 3
    shortcut = 2 * 2 * 16 * hw * 8 * 1 * 1  # 1×1: C_in ≠ C_out
    assert count.by_name() == {"conv1": conv1, "time_emb_proj": time_proj, "conv2": conv2, "conv_shortcut": shortcut}
    assert count.total == conv1 + time_proj + conv2 + shortcut
    assert count.by_kind() == {"conv": conv1 + conv2 + shortcut, "linear": time_proj}


def test_strided_conv_counts_its_output_positions():
    """Downsampling: a 3×3 stride-2 conv on 8×6 has 4×3 outputs, each summing C_in · 9 products."""
    from tinydiff.models.blocks import Downsample2D

    down = Downsample2D(4)
    with no_grad(), cost.count_flops(down) as count:
        down(rand(3, 4, 8, 6))
    assert count.total == 2 * 3 * 4 * (4 * 3) * 4 * 3 * 3


def test_spatial_transformer_hand_count():
    """SpatialTransformer (8 channels, 2 heads × 4, context 5 × 6) on a batch of 2 at 3×3."""
    block = SpatialTransformer(8, heads=2, dim_head=4, context_dim=6, groups=4)
    b, tokens, keys, inner = 2, 9, 5, 8
    with no_grad(), cost.count_flops(block) as count:
        block(rand(b, 8, 3, 3), rand(b, keys, 6), None)
    lin = lambda rows, d_in, d_out: 2 * rows * d_in * d_out  # noqa: E731
    tb = "transformer_blocks.0"
    expected = {
        "proj_in": lin(b * tokens, 8, inner),
        f"{tb}.attn1.to_q": lin(b * tokens, inner, inner),
        f"{tb}.attn1.to_k": lin(b * tokens, inner, inner),
        f"{tb}.attn1.to_v": lin(b * tokens, inner, inner),
        f"{tb}.attn1": 2 * b * 2 * tokens * tokens * 4 + 2 * b * 2 * tokens * tokens * 4,  # QKᵀ, then PV
        f"{tb}.attn1.to_out": lin(b * tokens, inner, 8),
        f"{tb}.attn2.to_q": lin(b * tokens, inner, inner),
        f"{tb}.attn2.to_k": lin(b * keys, 6, inner),  # keys and values come from the context
        f"{tb}.attn2.to_v": lin(b * keys, 6, inner),
        f"{tb}.attn2": 2 * b * 2 * tokens * keys * 4 + 2 * b * 2 * tokens * keys * 4,
        f"{tb}.attn2.to_out": lin(b * tokens, inner, 8),
        f"{tb}.ff.0": lin(b * tokens, inner, 4 * inner),
        f"{tb}.ff.2": lin(b * tokens, 4 * inner, inner),
        "proj_out": lin(b * tokens, inner, 8),
    }
    assert count.by_name() == expected


def test_text_attention_with_keyword_mask_is_self_attention():
    """The text encoder calls attention as attn(x, mask=mask): keys are the queries."""
    attn = Attention(12, heads=3, dim_head=4)
    with no_grad(), cost.count_flops(attn) as count:
        attn(rand(2, 7, 12), mask=np.ones((2, 7), dtype=bool))
    assert count.by_name()[""] == 2 * 2 * 3 * 7 * 7 * (4 + 4)


# --------------------------------------------------------------------------- whole networks


SMALL_UNETS = {
    "latent": latent_unet_config(),
    "pixel-unconditional": UNetConfig(),
    "two-layers-odd": UNetConfig(in_channels=3, out_channels=2, sample_size=8, block_channels=(8, 16, 24),
                                 layers_per_block=2, attention_levels=(True, False, True), context_dim=6,
                                 context_length=5, learned_null_context=True, heads=2, dim_head=4, groups=4,
                                 time_embed_dim=12),
}


def unet_inputs(config, batch=1, size=None):
    size = config.sample_size if size is None else size
    context = None if config.context_dim is None else rand(batch, config.context_length, config.context_dim)
    return rand(batch, config.in_channels, size, size), np.full(batch, 500.0, np.float32), context


@pytest.mark.parametrize("name", list(SMALL_UNETS))
def test_unet_count_equals_its_blocks(name):
    """The counted forward pass equals the architecture list layer by layer (so block by block
    and in total), and the list's parameters are the network's."""
    config = SMALL_UNETS[name]
    unet = UNet(config)
    counted = cost.forward_flops(unet, *unet_inputs(config))
    listed = cost.unet_layers(cost.UNetSpec.from_config(config))
    assert counted.by_name() == {k: v for k, v in listed.by_name().items() if v}
    assert counted.total == listed.total
    assert listed.params == unet.num_parameters()
    blocks = ["conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_out"]
    assert sum(counted.by_prefix(blocks).values()) == counted.total  # nothing outside the blocks


def test_unet_count_follows_resolution_and_batch():
    """Shapes come from the call: twice the side is 4× the convolutions, a batch of 3 is 3× all."""
    config = SMALL_UNETS["latent"]
    unet = UNet(config)
    one = cost.forward_flops(unet, *unet_inputs(config))
    big = cost.forward_flops(unet, *unet_inputs(config, size=16))
    assert big.total == cost.unet_layers(cost.UNetSpec.from_config(config), size=16).total
    assert big.by_kind()["conv"] == 4 * one.by_kind()["conv"]
    assert big.by_kind()["attention"] > 4 * one.by_kind()["attention"]  # self-attention is quadratic in positions
    assert cost.forward_flops(unet, *unet_inputs(config, batch=3)).total == 3 * one.total


def test_vae_decoder_and_text_encoder_lists_match_their_counts():
    vae = AutoencoderKL()
    c = vae.config
    counted = cost.forward_flops(vae.decoder, rand(1, c.latent_channels, 8, 8))
    listed = cost.vae_decoder_layers(c.latent_channels, c.in_channels, c.block_channels, 8, up_resnets=c.layers_per_block)
    assert {"decoder." + k: v for k, v in counted.by_name().items()} == {k: v for k, v in listed.by_name().items() if v}
    assert listed.params == vae.decoder.num_parameters()
    counted = cost.forward_flops(vae.encoder, rand(1, c.in_channels, 32, 16))  # H ≠ W
    listed = cost.vae_encoder_layers(c.in_channels, c.latent_channels, c.block_channels, 32, c.layers_per_block)
    assert counted.total == listed.total // 2  # half the width: half of every product
    counted = cost.forward_flops(vae.encoder, rand(1, c.in_channels, 32, 32))
    assert {"encoder." + k: v for k, v in counted.by_name().items()} == {k: v for k, v in listed.by_name().items() if v}
    assert listed.params == vae.encoder.num_parameters()

    encoder = TextEncoder(TextEncoderConfig())
    tc = encoder.config
    ids = np.ones((1, 11), dtype=np.int64)
    counted = cost.forward_flops(encoder, ids, np.ones((1, 11), dtype=bool))
    listed = cost.text_encoder_layers(tc.width, tc.layers, tc.heads, tc.mlp_ratio, 11, tc.vocab_size, tc.max_length,
                                      tc.projection_dim)
    assert counted.by_name() == {k: v for k, v in listed.by_name().items() if v}
    assert listed.params == encoder.num_parameters()


@contextlib.contextmanager
def functional_tally():
    """An independent count of the linear and attention products: every call of
    nn.functional's linear_forward and attention_forward, whoever makes it (the counter under
    test wraps layers instead). Convolutions are checked against hand counts and the
    architecture lists above."""
    total = {"flops": 0}
    originals = {n: getattr(F, n) for n in ("linear_forward", "attention_forward")}

    def linear(x, w, b=None):
        out, cache = originals["linear_forward"](x, w, b)
        total["flops"] += 2 * out.size * w.shape[1]
        return out, cache

    def attention(q, k, v, mask=None):
        out, cache = originals["attention_forward"](q, k, v, mask)
        total["flops"] += 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
        return out, cache

    for n, fn in (("linear_forward", linear), ("attention_forward", attention)):
        setattr(F, n, fn)
    try:
        yield total
    finally:
        for n, fn in originals.items():
            setattr(F, n, fn)


def networks():
    """(name, model, inputs) for every network with linear or attention layers (the autoencoder has
    none), and the DiT where it exists."""
    config = SMALL_UNETS["latent"]
    out = [("unet", UNet(config), unet_inputs(config)),
           ("text_encoder", TextEncoder(TextEncoderConfig()), (np.ones((2, 9), dtype=np.int64), np.ones((2, 9), dtype=bool)))]
    try:
        from tinydiff.models.dit import DiT, DiTConfig
    except ImportError:  # the DiT is optional here: every network that exists is checked
        return out
    dit_config = DiTConfig()
    mask = np.ones((1, dit_config.context_length), dtype=bool)
    mask[:, 9:] = False  # padding: masked keys still cost their products
    return out + [("dit", DiT(dit_config), (*unet_inputs(dit_config), mask))]


@pytest.mark.parametrize("name, model, inputs", networks(), ids=[n for n, _, _ in networks()])
def test_counter_agrees_with_an_independent_tally(name, model, inputs):
    with no_grad(), functional_tally() as reference, cost.count_flops(model) as count:
        model(*inputs)
    kinds = count.by_kind()
    assert kinds.get("linear", 0) + kinds.get("attention", 0) == reference["flops"] > 0


def test_count_flops_restores_everything():
    unet = UNet(SMALL_UNETS["latent"])
    core = F.attention_forward
    with cost.count_flops(unet):
        pass
    assert F.attention_forward is core
    assert not any("forward" in vars(m) for m in unet.modules())


def test_an_attention_layer_that_bypasses_the_core_is_an_error():
    """A layer whose QKᵀ would go uncounted stops the count instead of under-reporting."""

    class HandRolled(Attention):
        def forward(self, x, context=None, mask=None):
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
            return self.to_out((q @ k.swapaxes(1, 2)) @ v)

    layer = HandRolled(8, heads=1, dim_head=8)
    with pytest.raises(RuntimeError, match="attention_forward"), no_grad(), cost.count_flops(layer):
        layer(rand(1, 3, 8))


# --------------------------------------------------------------------------- calls per image


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_sampler_calls_match_a_spy_run_through_the_sampler(sampler, steps):
    calls = []

    def spy(x, sigma):
        calls.append(sigma)
        return 0.9 * x  # any D: the number of calls must not depend on its values

    sigmas = get_sigmas(make_schedule("scaled_linear"), steps, "karras", sigma_max=14.6)
    get_sampler(sampler)(spy, rand(2, 4, 8, 8) * float(sigmas[0]), sigmas, rng=0)
    assert cost.sampler_calls(sampler, steps) == len(calls)


@pytest.mark.parametrize("guidance_scale, rows", [(1.0, 1), (2.0, 2), (0.0, 2), (7.5, 2)])
def test_rows_per_call_match_the_denoiser(guidance_scale, rows):
    """Classifier-free guidance runs the unconditional rows in the same call, except at w = 1."""
    seen = []
    denoiser = Denoiser(lambda x, t, c: x, make_schedule("scaled_linear"), context=rand(3, 2, 4),
                        uncond_context=zeros(3, 2, 4), guidance_scale=guidance_scale,
                        on_model_call=lambda info: seen.append(info["x_in"].shape[0]))
    denoiser(rand(3, 4, 8, 8), 1.0)
    assert seen == [3 * rows] and cost.rows_per_call(guidance_scale) == rows


def test_sampler_calls_rejects_bad_input():
    with pytest.raises(ValueError, match="valid samplers"):
        cost.sampler_calls("eulr", 10)
    with pytest.raises(ValueError, match="positive integer"):
        cost.sampler_calls("euler", 0)


@pytest.fixture(scope="module")
def pipe():
    from tinydiff.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained()
    pipe.threads = 2  # the images are split over threads: the count must see every thread's work
    return pipe


@pytest.mark.parametrize("sampler, steps, guidance_scale, negative", [
    ("heun", 3, 2.0, False), ("dpmpp_2m", 4, 1.0, False), ("ddpm", 2, 3.0, True),
])
def test_pipeline_cost_predicts_a_counted_run(pipe, sampler, steps, guidance_scale, negative):
    """pipeline_cost's formula (calls × rows × per-row + text encoder + decoder) equals the
    products counted over a whole generation with those settings."""
    predicted = cost.pipeline_cost(pipe, sampler, steps, guidance_scale, negative_prompt=negative)
    images = 4  # two per thread: each thread gets whole images, both guidance rows of each
    with cost.count_flops(pipe.text_encoder, pipe.unet, pipe.vae) as count:
        pipe("a handwritten seven", negative_prompt="a thin 7" if negative else None, num_images=images, steps=steps,
             sampler=sampler, guidance_scale=guidance_scale, seed=0)
    prompts = 2 if negative else 1  # the text encoder runs once per prompt, not per image
    text = predicted["text_encoder_gflop"] * 1e9 * prompts
    assert images * (predicted["gflop_per_image"] * 1e9 - text) + text == pytest.approx(count.total, rel=1e-12)
    assert predicted["denoiser_calls"] == cost.sampler_calls(sampler, steps)
    x, t, context = unet_inputs(pipe.unet.config)
    if predicted["rows_per_call"] == 2:  # a guided call: [unconditional; conditional] rows of one image
        x, t, context = np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([context, 0 * context])
    per_call = cost.forward_flops(pipe.unet, x, t, context).total
    assert predicted["denoiser_gflop_per_row"] * predicted["rows_per_call"] * 1e9 == pytest.approx(per_call, rel=1e-12)


def test_pipeline_cost_does_not_depend_on_the_threads(pipe):
    """The count is of the work a batch does, whatever pipe.threads is (with two threads a one-image
    run would split its two guidance rows over the threads and run their shared start twice)."""
    threads = pipe.threads
    try:
        costs = []
        for pipe.threads in (1, 2):
            costs.append(cost.pipeline_cost(pipe, "euler", 2, 2.0)["gflop_per_image"])
    finally:
        pipe.threads = threads
    assert costs[0] == costs[1]


@pytest.mark.parametrize("steps, guidance_scale", [(1, 2.0), (3, 3.5)])
def test_pipeline_cost_of_lcm_predicts_a_counted_run_of_the_student(pipe, steps, guidance_scale):
    """sampler="lcm" runs the distilled student, which takes w as an input: one row per image and
    call at any guidance scale, and the student's own products (its guidance embedding included)."""
    predicted = cost.pipeline_cost(pipe, "lcm", steps, guidance_scale)
    with cost.count_flops(pipe.text_encoder, pipe.unet, pipe.lcm_unet, pipe.vae) as count:
        pipe("a handwritten seven", num_images=1, steps=steps, sampler="lcm", guidance_scale=guidance_scale, seed=0)
    assert predicted["gflop_per_image"] * 1e9 == pytest.approx(count.total, rel=1e-12)
    assert predicted["rows_per_call"] == cost.rows_per_call(guidance_scale, "lcm") == 1
    x, t, context = unet_inputs(pipe.lcm_unet.config)
    per_row = cost.forward_flops(pipe.lcm_unet, x, t, context, w=np.full(1, guidance_scale, np.float32)).total
    assert per_row > cost.forward_flops(pipe.unet, x, t, context).total  # the student's guidance projection
    assert predicted["denoiser_gflop_per_row"] * 1e9 == pytest.approx(per_row, rel=1e-12)


def test_lcm_rows_per_call_match_the_student_runs(pipe):
    """A spy on the student's forward: a 3-image, 2-step LCM run feeds it 3 rows per step (split
    over the pipeline's threads) and never calls the teacher U-Net."""
    rows, teacher_rows = [], []
    student_forward, teacher_forward = pipe.lcm_unet.forward, pipe.unet.forward

    def spy(log, forward):
        return lambda x, *args, **kwargs: log.append(x.shape[0]) or forward(x, *args, **kwargs)

    pipe.lcm_unet.forward, pipe.unet.forward = spy(rows, student_forward), spy(teacher_rows, teacher_forward)
    try:
        pipe("a handwritten seven", num_images=3, steps=2, sampler="lcm", guidance_scale=2.0, seed=0)
    finally:
        del pipe.lcm_unet.forward, pipe.unet.forward  # back to the class's forward
    assert sum(rows) == cost.sampler_calls("lcm", 2) * 3 * cost.rows_per_call(2.0, "lcm") and not teacher_rows


def test_pipeline_cost_of_lcm_refuses_a_negative_prompt(pipe):
    with pytest.raises(ValueError, match="negative prompt"):
        cost.pipeline_cost(pipe, "lcm", 4, negative_prompt=True)


def test_pipeline_cost_reports_the_rate(pipe):
    result = cost.pipeline_cost(pipe, "euler", 5, seconds_per_image=0.5)
    assert result["gflop_per_s"] == pytest.approx(result["gflop_per_image"] / 0.5)
    assert result["guidance_scale"] == pipe.defaults.guidance_scale


# --------------------------------------------------------------------------- published networks


def test_sd15_unet_list_has_the_published_parameter_count():
    """859,520,964: the parameters of SD 1.5's UNet2DConditionModel (the '860M U-Net')."""
    listed = cost.unet_layers(cost.sd15_unet_spec())
    assert listed.params == 859_520_964
    assert 0.39e12 < listed.total / 2 < 0.41e12  # ≈ 0.40 T multiply-adds per row at 64×64


def test_sd15_vae_decoder_and_clip_text_lists_have_the_published_parameter_counts():
    assert cost.sd15_vae_decoder_layers().params == 49_490_199  # post_quant_conv + decoder of SD's AutoencoderKL
    assert cost.clip_vit_l14_text_layers().params == 123_060_480  # CLIPTextModel of ViT-L/14


def test_dit_xl2_list_reproduces_the_papers_gflops():
    """Peebles & Xie 2023, Table 4: DiT-XL/2 118.6 Gflops at 256², 524.6 at 512², 675M params.
    Their Gflops count one multiply-add once: ours / 2."""
    for size, gmacs in ((256, 118.64), (512, 524.60)):
        assert cost.dit_xl2_layers(size).total / 2 / 1e9 == pytest.approx(gmacs, rel=1e-3)
    assert cost.dit_xl2_layers().params == pytest.approx(675e6, rel=1e-3)


# --------------------------------------------------------------------------- energy and money


def test_energy_and_money_by_hand():
    r = cost.energy_and_money(12.0, 350.0, 0.30, usd_per_hour=0.45)
    assert r["joules"] == pytest.approx(4200.0)  # 350 W · 12 s
    assert r["kwh"] == pytest.approx(4200.0 / 3.6e6)
    assert r["electricity_usd"] == pytest.approx(4200.0 / 3.6e6 * 0.30)
    assert r["rent_usd"] == pytest.approx(12.0 / 3600 * 0.45)
    assert cost.seconds_at(71e12, 71e12, 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="utilization"):
        cost.seconds_at(1.0, 1.0, 0.0)
