"""The U-Net: gradient checks of the whole network and of its blocks, shapes, null context,
attention callbacks, inference mode, a tiny overfitting run, and clear errors."""

import json
import math

import numpy as np
import pytest

from tinydiff.backend import BackendError, to_device, to_numpy
from tinydiff.models import UNet, UNetConfig
from tinydiff.models.blocks import ResBlock, SpatialTransformer
from tinydiff.models.embeddings import timestep_embedding
from tinydiff.nn import AdamW, gradcheck, gradcheck_module, mse_loss, no_grad

TOL = 1e-6
# Finite-difference step. L = Σ g ⊙ out sums hundreds of terms, so its float64 rounding (~1e-14)
# divided by 2ε swamps the small gradients of attention keys at ε = 1e-6; ε = 1e-5 balances that
# rounding against the O(ε²) truncation error.
EPS = 1e-5


def _cupy_usable() -> bool:
    try:
        to_device(np.zeros(1), "cupy")
    except BackendError:
        return False
    return True


def tiny_config(**overrides):
    """2 levels (8, 16 channels), attention at level 1, cross-attention to (B, 3, 6) contexts."""
    fields = dict(sample_size=8, block_channels=(8, 16), attention_levels=(False, True), context_dim=6,
                  context_length=3, learned_null_context=True, heads=2, dim_head=4, groups=4, time_embed_dim=16)
    fields.update(overrides)
    return UNetConfig(**fields)


def tiny_inputs(gen, dtype=np.float64):
    x = gen.standard_normal((2, 1, 8, 8)).astype(dtype)
    t = np.array([3, 700])  # integer timesteps: cast by the model, skipped by gradcheck_module
    context = gen.standard_normal((2, 3, 6)).astype(dtype)
    mask = np.array([[True, True, False], [True, True, True]])  # one padded token
    return x, t, context, mask


def assert_small(errors):
    bad = {name: err for name, err in errors.items() if not err < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


# ------------------------------------------------------------------ gradient checks


def test_unet_gradcheck_every_parameter_input_and_context():
    unet = UNet(tiny_config(), seed=1).double()
    x, t, context, mask = tiny_inputs(np.random.default_rng(0))
    errors = gradcheck_module(unet, x, t, context, mask, num_samples=2, eps=EPS, input_names=["x", "context"])
    assert set(errors) == {"x", "context"} | {name for name, _ in unet.named_parameters()}
    assert_small(errors)


def test_unconditional_unet_gradcheck_and_no_context_gradient():
    unet = UNet(tiny_config(context_dim=None, context_length=None, learned_null_context=False,
                            attention_levels=(True, False)), seed=2).double()
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8))
    errors = gradcheck_module(unet, x, np.array([1, 900]), num_samples=1, eps=EPS)  # integer t: not checked
    assert len(errors) == 1 + len(unet.parameters())
    assert_small(errors)
    unet(x, np.array([1.0, 2.0]))
    assert unet.backward(np.ones_like(x))[1] is None


@pytest.mark.parametrize("in_channels", [8, 4])  # with and without the 1×1 shortcut conv
def test_resblock_gradcheck(in_channels):
    block = ResBlock(in_channels, 8, temb_channels=5, groups=4).double()
    gen = np.random.default_rng(2)
    x, temb = gen.standard_normal((2, in_channels, 4, 4)), gen.standard_normal((2, 5))
    errors = gradcheck_module(block, x, temb, num_samples=4, eps=EPS)
    assert {"input.0", "input.1"} <= set(errors)
    assert_small(errors)


def test_resblock_without_time_embedding_gradcheck():  # the autoencoder's blocks
    block = ResBlock(4, 8, temb_channels=None, groups=4).double()
    x = np.random.default_rng(2).standard_normal((2, 4, 4, 4))
    assert_small(gradcheck_module(block, x, num_samples=4, eps=EPS))
    with pytest.raises(ValueError, match="built without a time embedding"):
        block(x, np.zeros((2, 5)))


@pytest.mark.parametrize("with_context", [True, False])
def test_spatial_transformer_gradcheck(with_context):
    block = SpatialTransformer(8, heads=2, dim_head=4, context_dim=6 if with_context else None, groups=4).double()
    gen = np.random.default_rng(3)
    x = gen.standard_normal((2, 8, 3, 3))
    context = gen.standard_normal((2, 3, 6)) if with_context else None
    mask = np.array([[True, False, True], [True, True, True]]) if with_context else None
    errors = gradcheck_module(block, x, context, mask, num_samples=4, eps=EPS)
    assert ("input.1" in errors) == with_context
    assert_small(errors)


def test_null_context_gradient_flows():
    unet = UNet(tiny_config(), seed=3).double()
    x, t, context, mask = tiny_inputs(np.random.default_rng(4))
    dropped = np.array([True, False])
    null = unet.null_embedding

    def forward():
        ctx, m = unet.replace_with_null_context(context, mask, dropped)
        return unet(x, t, ctx, m)

    def backward(dout):
        unet.zero_grad()
        forward()
        _, dcontext = unet.backward(dout)
        remaining = unet.null_context_backward(dcontext, dropped)
        assert np.all(remaining[0] == 0) and np.array_equal(remaining[1], dcontext[1])
        return {"null": null.grad}

    assert_small(gradcheck(forward, backward, {"null": null.data}, eps=EPS, num_samples=6))
    assert np.abs(null.grad).sum() > 0
    ctx, m = unet.replace_with_null_context(context, mask, dropped)
    assert np.array_equal(ctx[0], null.data) and m[0].all() and np.array_equal(ctx[1], context[1])
    assert unet.null_context(3).shape == (3, 3, 6)


def test_gradients_accumulate_across_backward_calls():
    unet = UNet(tiny_config(), seed=4).double()
    x, t, context, mask = tiny_inputs(np.random.default_rng(5))
    dout = np.random.default_rng(6).standard_normal((2, 1, 8, 8))
    unet(x, t, context, mask)
    unet.backward(dout)
    once = [p.grad.copy() for p in unet.parameters()]
    unet(x, t, context, mask)
    unet.backward(dout)
    for g1, p in zip(once, unet.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g1, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ shapes and structure


def test_default_pixel_config_shapes_and_names():
    unet = UNet(UNetConfig())
    x = np.random.default_rng(7).standard_normal((2, 1, 32, 32)).astype(np.float32)
    out = unet(x, np.array([10.0, 500.0], dtype=np.float32))
    assert out.shape == (2, 1, 32, 32) and out.dtype == np.float32
    dx, dcontext = unet.backward(np.ones_like(out))
    assert dx.shape == x.shape and dcontext is None
    names = set(unet.state_dict())
    for name in ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
                 "down_blocks.0.downsamplers.0.conv.weight", "down_blocks.2.attentions.0.proj_in.weight",
                 "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", "mid_block.resnets.1.conv2.weight",
                 "up_blocks.0.resnets.1.conv_shortcut.weight", "up_blocks.1.upsamplers.0.conv.weight",
                 "conv_norm_out.weight", "conv_out.bias"]:
        assert name in names
    assert not any("attn2" in n for n in names)  # unconditional: no cross-attention
    assert len(unet.up_blocks[0].resnets) == UNetConfig().layers_per_block + 1


def test_latent_config_shapes_with_context_and_scalar_t():
    cfg = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_channels=(32, 64),
                     attention_levels=(True, True), context_dim=16, context_length=5, learned_null_context=True)
    unet = UNet(cfg)
    gen = np.random.default_rng(8)
    x = gen.standard_normal((3, 4, 8, 8)).astype(np.float32)
    context = gen.standard_normal((3, 5, 16)).astype(np.float32)
    out = unet(x, 250.0, context)  # one timestep for the whole batch
    assert out.shape == (3, 4, 8, 8)
    dx, dcontext = unet.backward(np.ones_like(out))
    assert dx.shape == x.shape and dcontext.shape == context.shape


def test_same_seed_same_weights():
    a, b, c = UNet(tiny_config(), seed=5), UNet(tiny_config(), seed=5), UNet(tiny_config(), seed=6)
    assert all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
    assert not np.array_equal(a.conv_in.weight.data, c.conv_in.weight.data)


def test_timestep_embedding_formula():
    t = np.array([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 8)
    for b in range(3):
        for k in range(4):
            w = 10000.0 ** (-k / 4)
            assert emb[b, k] == pytest.approx(math.cos(t[b] * w))
            assert emb[b, 4 + k] == pytest.approx(math.sin(t[b] * w))


def test_config_json_round_trip_and_unknown_keys():
    cfg = tiny_config()
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.block_channels, tuple)
    with pytest.raises(ValueError, match="unknown UNetConfig keys: channel_mult"):
        UNetConfig.from_dict({**cfg.to_dict(), "channel_mult": [1, 2]})


# ------------------------------------------------------------------ inference mode and callbacks


@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_no_grad_matches_and_keeps_no_caches(dtype, tolerance):
    """Inference mode fuses each GroupNorm with the SiLU after it (layers.group_norm_silu): the same
    output as the forward pass that keeps caches, up to rounding (relative to the largest value)."""
    unet = UNet(tiny_config(), seed=7).astype(dtype)
    x, t, context, mask = tiny_inputs(np.random.default_rng(9), dtype)
    with no_grad():
        fast = unet(x, t, context, mask)
    assert all(getattr(m, "_cache", None) is None for m in unet.modules())
    with pytest.raises(RuntimeError, match="without a forward pass"):
        unet.backward(np.ones_like(fast))
    want = unet(x, t, context, mask)
    assert fast.dtype == want.dtype == dtype
    assert np.abs(fast - want).max() <= tolerance * np.abs(want).max()


@pytest.mark.parametrize("attention_levels", [(False, True), (False, False)])
def test_guidance_halves_run_the_start_once_in_inference(attention_levels):
    """Rows [x; x] at [t; t] with two contexts (classifier-free guidance's layout): in no_grad the
    blocks before the first that reads the context run on one half, and the output equals the
    caching forward pass's, which runs every row; halves that differ in x or t run in full.
    Without attention in the down path the halves part at the mid block."""
    unet = UNet(tiny_config(attention_levels=attention_levels), seed=7).double()
    x, t, context, mask = tiny_inputs(np.random.default_rng(9))
    x, t = np.concatenate([x, x]), np.array([40.0, 700.0, 40.0, 700.0])
    context, mask = np.concatenate([context, context[::-1]]), np.concatenate([mask, mask[::-1]])
    layers = {"conv_in": unet.conv_in, "level 0": unet.down_blocks[0].resnets[0].conv1,
              "level 1": unet.down_blocks[1].resnets[0].conv1, "mid": unet.mid_block.resnets[0].conv1}
    rows = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.forward = lambda a, _f=type(layer).forward, _l=layer, _n=name: rows[_n].append(len(a)) or _f(_l, a)
    other_t = t + np.array([0.0, 0.0, 0.0, 1.0])
    other_x = x + np.arange(4)[:, None, None, None] * 1e-3
    for args in [(x, t), (x, other_t), (other_x, t)]:
        with no_grad():
            fast = unet(*args, context, mask)
        np.testing.assert_allclose(fast, unet(*args, context, mask), rtol=1e-12, atol=1e-12)
    shared = {"conv_in": 2, "level 0": 2, "level 1": 4 if attention_levels[1] else 2, "mid": 4}
    assert {name: seen[0] for name, seen in rows.items()} == shared
    assert all(seen[1:] == [4] * 5 for seen in rows.values()), rows  # the caching pass, then the other inputs


def test_attention_callback_reports_cross_attention_maps():
    unet = UNet(tiny_config(), seed=8)
    x, t, context, mask = tiny_inputs(np.random.default_rng(10), np.float32)
    seen = []
    unet.set_attention_callback(lambda name, probs: seen.append((name, probs.shape, probs.sum(-1))))
    unet(x, t, context, mask)
    names = [name for name, _, _ in seen]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in names
    assert len(names) == 4  # down level 1, mid, and the two up-path transformers of level 1
    for _, shape, sums in seen:
        assert shape[0] == 2 and shape[1] == 2 and shape[3] == 3  # (B, heads, H·W, L)
        np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    unet.set_attention_callback(None)
    unet(x, t, context, mask)
    assert len(seen) == 4
    unconditional = UNet(tiny_config(context_dim=None, context_length=None, learned_null_context=False))
    with pytest.raises(ValueError, match="no cross-attention"):
        unconditional.set_attention_callback(print)


@pytest.mark.skipif(not _cupy_usable(), reason="CuPy with a usable GPU is not available")
def test_cupy_backend_matches_numpy():
    """Same seed, same inputs: the CuPy forward, backward and null-context gradient equal NumPy's."""
    x, t, context, mask = tiny_inputs(np.random.default_rng(13))
    dout = np.random.default_rng(14).standard_normal(x.shape)
    dropped = np.array([False, True])
    results = []
    for backend in ("numpy", "cupy"):
        unet = UNet(tiny_config(), seed=10).double().to(backend)
        dev = [to_device(a, backend) for a in (x, t, context, mask, dropped, dout)]
        ctx, m = unet.replace_with_null_context(dev[2], dev[3], dev[4])
        out = unet(dev[0], dev[1], ctx, m)
        dx, dcontext = unet.backward(dev[5])
        remaining = unet.null_context_backward(dcontext, dev[4])
        results.append([to_numpy(a) for a in (out, dx, remaining)] + [to_numpy(p.grad) for p in unet.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ training


def test_overfits_eight_images():
    """AdamW drives the ε-prediction loss on 8 fixed (image, noise, t) triples far down."""
    cfg = UNetConfig(sample_size=16, block_channels=(8, 16), attention_levels=(False, True), heads=2, dim_head=4,
                     groups=4, time_embed_dim=16)
    unet = UNet(cfg, seed=0)
    gen = np.random.default_rng(11)
    x0 = gen.standard_normal((8, 1, 16, 16)).astype(np.float32)
    noise = gen.standard_normal((8, 1, 16, 16)).astype(np.float32)
    t = gen.uniform(0, 1000, 8).astype(np.float32)
    alpha_bar = (np.cos(t / 1000 * np.pi / 2) ** 2).reshape(8, 1, 1, 1)  # (B,) → (B, 1, 1, 1)
    x_t = (np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise).astype(np.float32)
    opt = AdamW(unet.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        unet.zero_grad()
        loss, dout = mse_loss(unet(x_t, t), noise)
        unet.backward(dout)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.3 * losses[0], losses


# ------------------------------------------------------------------ clear errors


def test_clear_errors():
    cond = UNet(tiny_config())
    uncond = UNet(tiny_config(context_dim=None, context_length=None, learned_null_context=False))
    x, t, context, mask = tiny_inputs(np.random.default_rng(12), np.float32)
    with pytest.raises(ValueError, match=r"x of shape \(B, 1, H, W\)"):
        cond(np.zeros((2, 3, 8, 8), np.float32), t)
    with pytest.raises(ValueError, match="multiples of 2"):
        cond(np.zeros((2, 1, 8, 7), np.float32), t)
    with pytest.raises(ValueError, match="context_dim=6"):
        cond(x, t, np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, context)
    with pytest.raises(ValueError, match="context_mask given without a context"):
        cond(x, t, None, mask)
    with pytest.raises(ValueError, match="timesteps t of shape"):
        cond(x, np.zeros(3), context)
    with pytest.raises(ValueError, match="no learned null context"):
        uncond.null_context(2)
    with pytest.raises(ValueError, match="context_length must equal"):
        cond.replace_with_null_context(np.zeros((2, 4, 6), np.float32), None, np.array([True, False]))
    with pytest.raises(ValueError, match="groups=4 must divide"):
        tiny_config(block_channels=(8, 18))
    with pytest.raises(ValueError, match="learned_null_context needs"):
        tiny_config(context_dim=None)
    with pytest.raises(ValueError, match="equal length"):
        tiny_config(attention_levels=(True,))
