"""The diffusion transformer: gradient checks of the whole network, naive references for patches,
positions, joint attention and one block, adaLN-Zero's zero start, the prompt's padding mask,
the U-Net's interface (null context, callbacks, Denoiser, training step), and clear errors."""

import math

import numpy as np
import pytest

from tinydiff.backend import to_device, to_numpy
from tinydiff.config import ConfigError
from tinydiff.diffusion.denoiser import Denoiser
from tinydiff.diffusion.samplers import sample_euler
from tinydiff.diffusion.schedules import make_schedule
from tinydiff.models.dit import (
    DiT, DiTConfig, JointAttention, JointTransformerBlock, masked_mean, patchify, position_embedding_2d, unpatchify,
)
from tinydiff.nn import AdamW, Linear, gradcheck, gradcheck_module, mse_loss, no_grad
from tinydiff.train.diffusion import DiffusionTrainingConfig, diffusion_grads

TOL = 1e-6
EPS = 1e-5  # as in test_unet: balances float64 rounding of L = Σ g ⊙ out against the O(ε²) error


def tiny_config(**overrides):
    """2 blocks of width 8 (2 heads), 2×2 patches of a 2×4×4 input (4 tokens), (B, 3, 5) contexts."""
    fields = dict(in_channels=2, out_channels=3, sample_size=4, patch_size=2, width=8, depth=2, heads=2,
                  mlp_ratio=2, timestep_dim=6, context_dim=5, context_length=3, learned_null_context=True)
    fields.update(overrides)
    return DiTConfig(**fields)


UNCONDITIONAL = dict(context_dim=None, context_length=None, learned_null_context=False)


def tiny_inputs(gen, dtype=np.float64):
    x = gen.standard_normal((2, 2, 4, 4)).astype(dtype)
    t = np.array([3, 700])  # integer timesteps: cast by the model, skipped by gradcheck_module
    context = gen.standard_normal((2, 3, 5)).astype(dtype)
    mask = np.array([[True, True, False], [True, True, True]])  # one padded token
    return x, t, context, mask


def unzero(model, gen, scale=0.5):
    """Random values in every layer adaLN-Zero starts at zero (each block's modulations, the final
    modulation and projection). A fresh DiT is the identity in every block and outputs 0, so
    half the gradients would be trivially zero: a dropped term there could not show."""
    for _, p in model.named_parameters():
        if not np.any(to_numpy(p.data)):
            p.data[...] = to_device(scale * gen.standard_normal(p.shape), None, dtype=p.data.dtype)
    return model


def assert_small(errors):
    bad = {name: err for name, err in errors.items() if not err < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


# ------------------------------------------------------------------ naive references (float64)


def lin(layer, x):
    out = x @ layer.weight.data.T
    return out if layer.bias is None else out + layer.bias.data


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def gelu(x):
    """x Φ(x), Φ(x) = ½(1 + erf(x/√2)) (the exact GELU)."""
    return x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def naive_joint_attention(attn, hx, hc, mask):
    """Loops over samples, heads and queries: every query (the image tokens', then the text
    tokens' unless the block is ``context_pre_only``) attends to every image token and to the
    real text tokens; softmax written out."""
    b, n, d = hx.shape
    heads, dh = attn.heads, attn.dim_head
    text_queries = attn.add_q_proj is not None
    out_x, out_c = np.zeros_like(hx), np.zeros_like(hc) if text_queries else None
    for i in range(b):
        q = hx[i] @ attn.to_q.weight.data.T
        if text_queries:
            q = np.concatenate([q, hc[i] @ attn.add_q_proj.weight.data.T])
        k = np.concatenate([hx[i] @ attn.to_k.weight.data.T, hc[i] @ attn.add_k_proj.weight.data.T])
        v = np.concatenate([hx[i] @ attn.to_v.weight.data.T, hc[i] @ attn.add_v_proj.weight.data.T])
        allowed = [j for j in range(len(k)) if j < n or mask is None or mask[i, j - n]]
        o = np.zeros((len(q), d))
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            for r in range(len(q)):
                scores = np.array([q[r, cols] @ k[j, cols] / math.sqrt(dh) for j in allowed])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                o[r, cols] = sum(wj * v[j, cols] for wj, j in zip(w, allowed))
        out_x[i] = lin(attn.to_out, o[:n])
        if text_queries:
            out_c[i] = lin(attn.to_add_out, o[n:])
    return out_x, out_c


def reference_block(block, x, ctx, c_act, mask):
    """One MMDiT block straight from the equations in the module docstring."""
    def stream(h, a, m, ff):
        h = h + m[2][:, None] * a  # x + α₁ ⊙ attn
        g = layer_norm(h) * (1 + m[4][:, None]) + m[3][:, None]
        return h + m[5][:, None] * lin(ff[2], gelu(lin(ff[0], g)))  # + α₂ ⊙ MLP

    mx = np.split(lin(block.adaLN_modulation, c_act), 6, axis=1)  # β₁ γ₁ α₁ β₂ γ₂ α₂
    hx = layer_norm(x) * (1 + mx[1][:, None]) + mx[0][:, None]
    mc = np.split(lin(block.adaLN_modulation_context, c_act), block.context_chunks, axis=1)
    hc = layer_norm(ctx) * (1 + mc[1][:, None]) + mc[0][:, None]
    ax, ac = naive_joint_attention(block.attn, hx, hc, mask)
    return stream(x, ax, mx, block.ff), None if ac is None else stream(ctx, ac, mc, block.ff_context)


# ------------------------------------------------------------------ gradient checks


def test_dit_gradcheck_every_parameter_input_and_context():
    gen = np.random.default_rng(0)
    dit = unzero(DiT(tiny_config(), seed=1).double(), gen)  # see unzero: else half the grads are 0
    x, t, context, mask = tiny_inputs(gen)
    errors = gradcheck_module(dit, x, t, context, mask, num_samples=3, eps=EPS, input_names=["x", "context"])
    assert set(errors) == {"x", "context"} | {name for name, _ in dit.named_parameters()}  # null: its own test
    assert_small(errors)


@pytest.mark.parametrize("unconditional", [True, False])
def test_dit_gradcheck_without_context(unconditional):
    """An unconditional DiT (no text stream), and a conditional one called without a context."""
    cfg = tiny_config(**UNCONDITIONAL) if unconditional else tiny_config()
    gen = np.random.default_rng(1)
    dit = unzero(DiT(cfg, seed=2).double(), gen)
    x = gen.standard_normal((2, 2, 4, 4))
    errors = gradcheck_module(dit, x, np.array([1, 900]), num_samples=2, eps=EPS)
    used = {n for n, _ in dit.named_parameters() if "context" not in n and "pooled_text" not in n and "add_" not in n
            and n != "null_embedding"}
    assert used <= set(errors)
    assert_small({k: errors[k] for k in used | {"input.0"}})
    dit(x, np.array([1.0, 2.0]))
    assert dit.backward(np.ones((2, 3, 4, 4)))[1] is None


def test_null_context_gradient_flows():
    gen = np.random.default_rng(3)
    dit = unzero(DiT(tiny_config(), seed=3).double(), gen)
    x, t, context, mask = tiny_inputs(gen)
    dropped = np.array([True, False])
    null = dit.null_embedding

    def forward():
        ctx, m = dit.replace_with_null_context(context, mask, dropped)
        return dit(x, t, ctx, m)

    def backward(dout):
        dit.zero_grad()
        forward()
        _, dcontext = dit.backward(dout)
        remaining = dit.null_context_backward(dcontext, dropped)
        assert np.all(remaining[0] == 0) and np.array_equal(remaining[1], dcontext[1])
        return {"null": null.grad}

    assert_small(gradcheck(forward, backward, {"null": null.data}, eps=EPS, num_samples=6))
    assert np.abs(null.grad).sum() > 0
    assert dit.null_context(3).shape == (3, 3, 5)


def test_gradients_accumulate_across_backward_calls():
    gen = np.random.default_rng(4)
    dit = unzero(DiT(tiny_config(), seed=4).double(), gen)
    x, t, context, mask = tiny_inputs(gen)
    dout = gen.standard_normal((2, 3, 4, 4))
    dit(x, t, context, mask)
    dit.backward(dout)
    once = [p.grad.copy() for p in dit.parameters()]
    dit(x, t, context, mask)
    dit.backward(dout)
    for g1, p in zip(once, dit.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g1, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ forward against references


def test_patchify_matches_naive_loop_and_unpatchify_inverts_it():
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 6))
    p = 2
    tokens = patchify(x, p)
    assert tokens.shape == (2, 2 * 3, 3 * p * p)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (C, p, p)
                np.testing.assert_array_equal(tokens[b, i * 3 + j], patch.reshape(-1))
    np.testing.assert_array_equal(unpatchify(tokens, p, 3, 4, 6), x)


def test_position_embedding_closed_form():
    dim, grid_h, grid_w = 8, 3, 4
    pe = position_embedding_2d(grid_h, grid_w, dim, np, np.float64)
    assert pe.shape == (grid_h * grid_w, dim)
    i, j = 2, 3  # token n = i·grid_w + j
    omega = [10000.0 ** (-k / 2) for k in range(2)]  # ω_k = 10000^(−k/(dim/4))
    expected = [math.cos(j * w) for w in omega] + [math.sin(j * w) for w in omega] + \
               [math.cos(i * w) for w in omega] + [math.sin(i * w) for w in omega]
    np.testing.assert_allclose(pe[i * grid_w + j], expected, rtol=1e-12, atol=1e-15)


def test_pooled_text_is_the_mean_of_the_real_tokens():
    context = np.random.default_rng(19).standard_normal((2, 4, 3))
    mask = np.array([[True, True, False, False], [True, True, True, False]])
    pooled, weights = masked_mean(context, mask)
    for b in range(2):
        np.testing.assert_allclose(pooled[b], context[b, mask[b]].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(masked_mean(context, None)[0], context.mean(axis=1), rtol=1e-12)
    assert weights.shape == (2, 4, 1)


@pytest.mark.parametrize("pre_only", [False, True])
def test_joint_attention_matches_naive_loop(pre_only):
    gen = np.random.default_rng(6)
    attn = JointAttention(8, heads=2, with_context=True, context_pre_only=pre_only).double()
    hx, hc = gen.standard_normal((2, 4, 8)), gen.standard_normal((2, 3, 8))
    mask = np.array([[True, False, True], [True, True, False]])
    out_x, out_c = attn(hx, hc, mask)
    ref_x, ref_c = naive_joint_attention(attn, hx, hc, mask)
    np.testing.assert_allclose(out_x, ref_x, rtol=1e-10, atol=1e-12)
    if pre_only:
        assert out_c is None and ref_c is None and attn.add_q_proj is None and attn.to_add_out is None
    else:
        np.testing.assert_allclose(out_c, ref_c, rtol=1e-10, atol=1e-12)


def test_block_matches_equations():
    """Shift, scale, gate of each sub-layer and stream, in DiT's chunk order β₁ γ₁ α₁ β₂ γ₂ α₂."""
    gen = np.random.default_rng(7)
    block = unzero(JointTransformerBlock(8, heads=2, mlp_ratio=2, with_context=True).double(), gen)
    x, ctx, c_act = gen.standard_normal((2, 4, 8)), gen.standard_normal((2, 3, 8)), gen.standard_normal((2, 8))
    mask = np.array([[True, True, False], [True, True, True]])
    out_x, out_c = block(x, ctx, c_act, mask)
    ref_x, ref_c = reference_block(block, x, ctx, c_act, mask)
    np.testing.assert_allclose(out_x, ref_x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out_c, ref_c, rtol=1e-10, atol=1e-12)


def test_fresh_dit_outputs_exactly_zero_and_fresh_blocks_are_the_identity():
    dit = DiT(tiny_config(), seed=8).double()
    x, t, context, mask = tiny_inputs(np.random.default_rng(8))
    assert np.array_equal(dit(x, t, context, mask), np.zeros((2, 3, 4, 4)))
    gen = np.random.default_rng(9)
    block = JointTransformerBlock(8, heads=2, mlp_ratio=2, with_context=True).double()
    h, ctx, c_act = gen.standard_normal((2, 4, 8)), gen.standard_normal((2, 3, 8)), gen.standard_normal((2, 8))
    out_h, out_ctx = block(h, ctx, c_act, None)
    assert np.array_equal(out_h, h) and np.array_equal(out_ctx, ctx)


def test_masked_prompt_token_changes_nothing():
    """A padded token's state never matters: the output is the same bit for bit, its gradient is
    exactly zero; changing a real token does change the output."""
    gen = np.random.default_rng(10)
    dit = unzero(DiT(tiny_config(depth=3), seed=10).double(), gen)
    x, t, context, mask = tiny_inputs(gen)  # token 2 of sample 0 is padding
    out = dit(x, t, context, mask)
    _, dcontext = dit.backward(gen.standard_normal(out.shape))
    assert np.all(dcontext[0, 2] == 0) and np.abs(dcontext[0, :2]).min() > 0
    changed = context.copy()
    changed[0, 2] = 10 * gen.standard_normal(5)
    assert np.array_equal(dit(x, t, changed, mask), out)
    changed[0, 1] += 0.1  # a real token
    assert not np.allclose(dit(x, t, changed, mask)[0], out[0])


# ------------------------------------------------------------------ the U-Net's interface


def test_config_json_round_trip_and_errors():
    cfg = tiny_config()
    assert DiTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown DiTConfig keys: depths"):
        DiTConfig.from_dict({**cfg.to_dict(), "depths": 2})
    with pytest.raises(ValueError, match="patch_size=3 does not divide sample_size=8"):
        DiTConfig(patch_size=3)
    with pytest.raises(ValueError, match="width=10 is not divisible by heads=4"):
        DiTConfig(width=10)
    with pytest.raises(ValueError, match="learned_null_context needs"):
        DiTConfig(context_dim=None)


def test_same_seed_same_weights_whatever_was_built_before():
    a = DiT(tiny_config(), seed=5)
    Linear(3, 3)  # draws from the default generator (a layer built without one): the DiT must not
    b, c = DiT(tiny_config(), seed=5), DiT(tiny_config(), seed=6)
    assert all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
    assert not np.array_equal(a.patch_embed.weight.data, c.patch_embed.weight.data)


def test_no_grad_matches_and_keeps_no_caches():
    gen = np.random.default_rng(11)
    dit = unzero(DiT(tiny_config(), seed=11), gen)
    x, t, context, mask = tiny_inputs(gen, np.float32)
    with no_grad():
        fast = dit(x, t, context, mask)
    assert all(getattr(m, "_cache", None) is None for m in dit.modules())
    with pytest.raises(RuntimeError, match="without a forward pass"):
        dit.backward(np.ones_like(fast))
    np.testing.assert_array_equal(fast, dit(x, t, context, mask))
    assert fast.dtype == np.float32


def test_attention_callback_kinds():
    gen = np.random.default_rng(12)
    dit = DiT(tiny_config(), seed=12)
    x, t, context, mask = tiny_inputs(gen, np.float32)
    for kind, shape in [("cross", (2, 2, 4, 3)), ("self", (2, 2, 4, 4)), ("joint", (2, 2, 7, 7))]:
        seen = []
        dit.set_attention_callback(lambda name, probs: seen.append((name, probs)), kind)
        assert dit.has_attention_callbacks
        dit(x, t, context, mask)
        assert [name for name, _ in seen] == ["blocks.0.attn", "blocks.1.attn"]
        assert seen[0][1].shape == shape
        assert seen[1][1].shape[2] == 4  # the last block has image queries only
    np.testing.assert_allclose(seen[0][1].sum(-1), 1.0, rtol=1e-5)  # joint rows sum to 1
    assert np.all(seen[0][1][0, :, :, 6] == 0)  # the padded token gets no attention
    dit.set_attention_callback(None)
    assert not dit.has_attention_callbacks
    with pytest.raises(ValueError, match="no text tokens"):
        DiT(tiny_config(**UNCONDITIONAL)).set_attention_callback(print)


def test_drop_in_for_denoiser_sampler_and_training_step():
    """The Denoiser (with CFG on the learned null context), a sampler and ``diffusion_grads`` run
    the DiT exactly as they run the U-Net."""
    gen = np.random.default_rng(13)
    dit = unzero(DiT(tiny_config(out_channels=2), seed=13), gen, scale=0.1)  # predicts ε: as many channels as x
    schedule = make_schedule("linear", 1000)
    context = gen.standard_normal((2, 3, 5)).astype(np.float32)
    denoiser = Denoiser(dit, schedule, context=context, uncond_context=dit.null_context(2), guidance_scale=3.0)
    x = 10 * gen.standard_normal((2, 2, 4, 4)).astype(np.float32)
    with no_grad():
        sample = sample_euler(denoiser, x, np.array([10.0, 3.0, 1.0, 0.0]))
    assert sample.shape == x.shape and np.isfinite(sample).all()

    class RandomContexts:  # any conditioning: encode(indices, generator) → (context, mask)
        def encode(self, indices, generator):
            return generator.standard_normal((len(indices), 3, 5)).astype(np.float32), None

        def backward(self, dcontext):
            self.dcontext = dcontext

    conditioning = RandomContexts()
    data = gen.standard_normal((8, 2, 4, 4)).astype(np.float32)
    step = diffusion_grads(dit, data, DiffusionTrainingConfig(batch_size=4, cond_drop_prob=0.5), conditioning)
    dit.zero_grad()
    loss, _ = step(0, np.random.default_rng(0))
    assert np.isfinite(loss) and conditioning.dcontext.shape == (4, 3, 5)
    assert all(np.abs(p.grad).sum() > 0 for p in dit.parameters())


def test_backends_match_numpy(backends):
    """Same seed, same inputs: forward, backward and the null-context gradient on each backend
    equal NumPy's."""
    x, t, context, mask = tiny_inputs(np.random.default_rng(14))
    dout = np.random.default_rng(15).standard_normal((2, 3, 4, 4))
    dropped = np.array([False, True])
    results = []
    for backend in ("numpy", backends):
        dit = unzero(DiT(tiny_config(), seed=14).double(), np.random.default_rng(16)).to(backend)
        dev = [to_device(a, backend) for a in (x, t, context, mask, dropped, dout)]
        ctx, m = dit.replace_with_null_context(dev[2], dev[3], dev[4])
        out = dit(dev[0], dev[1], ctx, m)
        dx, dcontext = dit.backward(dev[5])
        remaining = dit.null_context_backward(dcontext, dev[4])
        results.append([to_numpy(a) for a in (out, dx, remaining)] + [to_numpy(p.grad) for p in dit.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


def test_overfits_eight_latents():
    """AdamW drives the ε-prediction loss on 8 fixed (latent, noise, t) triples far down."""
    dit = DiT(tiny_config(width=16, **UNCONDITIONAL), seed=0)
    gen = np.random.default_rng(17)
    x0 = gen.standard_normal((8, 2, 4, 4)).astype(np.float32)
    noise = gen.standard_normal((8, 2, 4, 4)).astype(np.float32)
    t = gen.uniform(0, 1000, 8).astype(np.float32)
    alpha_bar = (np.cos(t / 1000 * np.pi / 2) ** 2).reshape(8, 1, 1, 1)  # (B,) → (B, 1, 1, 1)
    x_t = (np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise).astype(np.float32)
    target = np.concatenate([noise, noise[:, :1]], axis=1)  # out_channels = 3
    opt = AdamW(dit.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        dit.zero_grad()
        loss, dout = mse_loss(dit(x_t, t), target)
        dit.backward(dout)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.3 * losses[0], losses


def test_clear_errors():
    cond = DiT(tiny_config())
    uncond = DiT(tiny_config(**UNCONDITIONAL))
    x, t, context, mask = tiny_inputs(np.random.default_rng(18), np.float32)
    with pytest.raises(ValueError, match=r"x of shape \(B, 2, H, W\)"):
        cond(np.zeros((2, 3, 4, 4), np.float32), t)
    with pytest.raises(ValueError, match="multiples of 2, got 4×5"):
        cond(np.zeros((2, 2, 4, 5), np.float32), t)
    with pytest.raises(ValueError, match="context_dim=5"):
        cond(x, t, np.zeros((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, context)
    with pytest.raises(ValueError, match="context_mask given without a context"):
        cond(x, t, None, mask)
    with pytest.raises(ValueError, match="timesteps t of shape"):
        cond(x, np.zeros(3), context)
    with pytest.raises(ValueError, match="context_length must equal"):
        cond.replace_with_null_context(np.zeros((2, 4, 5), np.float32), None, np.array([True, False]))


@pytest.mark.parametrize("model", ["UNet", "DiT"])
def test_both_denoisers_check_their_prompt_input_alike(model):
    """The U-Net and the DiT share one context check; each message names its model."""
    from tinydiff.models.unet import UNet, UNetConfig

    def build(context_dim):
        if model == "UNet":
            return UNet(UNetConfig(in_channels=2, out_channels=2, sample_size=4, block_channels=(8, 16),
                                   attention_levels=(False, True), context_dim=context_dim, heads=2, dim_head=4,
                                   groups=4, time_embed_dim=16))
        return DiT(tiny_config(context_dim=context_dim, learned_null_context=context_dim is not None))

    x, t = np.zeros((2, 2, 4, 4)), np.array([10, 20])
    with pytest.raises(ValueError, match=f"this {model} is unconditional .*{model}Config"):
        build(None)(x, t, np.zeros((2, 3, 8)))
    net = build(8)
    with pytest.raises(ValueError, match=rf"{model} expects context of shape \(B=2, L, context_dim=8\)"):
        net(x, t, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="context_mask given without a context"):
        net(x, t, None, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"context_mask must be a bool array of shape \(2, 3\)"):
        net(x, t, np.zeros((2, 3, 8)), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"context_mask must be a bool array of shape \(2, 3\), got float64"):
        net(x, t, np.zeros((2, 3, 8)), np.ones((2, 3)))


def test_a_dit_without_a_null_context_says_so_in_its_own_name():
    """The null-context methods are the U-Net's; their error names the class that was built."""
    with pytest.raises(ValueError, match="this DiT has no learned null context"):
        DiT(tiny_config(learned_null_context=False)).null_context(2)
