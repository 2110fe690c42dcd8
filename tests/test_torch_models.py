"""The PyTorch mirrors of benchmarks/torch_models.py compute what tinydiff's networks compute.

Optional: skipped when torch is not installed. With tinydiff's weights copied in (the state
dicts map one-to-one), the mirrors' forward passes match tinydiff's in float64 to ~1e-12, and
tinydiff's hand-written backward passes match torch autograd: the U-Net's (through skips, time
embedding, cross-attention with a padding mask and the learned null context), the
autoencoder's and the text encoder's. This is what makes bench_torch.py time the same work.
Small configs keep the file under a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_models  # noqa: E402

from tinydiff.models import (  # noqa: E402
    AutoencoderConfig, AutoencoderKL, TextEncoder, TextEncoderConfig, UNet, UNetConfig,
)
from tinydiff.models.autoencoder import vae_loss  # noqa: E402
from tinydiff.nn import mse_loss  # noqa: E402
from tinydiff.text.tokenizer import Tokenizer  # noqa: E402

TOL = {"rtol": 1e-10, "atol": 1e-12}

# A latent-style text-conditional U-Net (attention at the low level and in the middle, two
# ResBlocks per level) and a pixel-style unconditional one (attention at the top level).
UNET_CONFIGS = {
    "conditional": UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_channels=(8, 16),
                              layers_per_block=2, attention_levels=(False, True), context_dim=12,
                              context_length=5, learned_null_context=True, heads=2, dim_head=4, groups=4,
                              time_embed_dim=16),
    "unconditional": UNetConfig(in_channels=1, out_channels=1, sample_size=8, block_channels=(8, 8, 16),
                                attention_levels=(True, False, False), heads=2, dim_head=4, groups=4,
                                time_embed_dim=16),
}


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def randomize(tiny_model, seed=1):
    """Norm layers start at γ = 1, β = 0 and would hide a swapped scale and shift: perturb every
    parameter a little (the null context too) before mirroring."""
    gen = np.random.default_rng(seed)
    for p in tiny_model.parameters():
        p.data += 0.1 * gen.standard_normal(p.shape)
    return tiny_model


def unet_pair(name):
    tiny = randomize(UNet(UNET_CONFIGS[name]).double())
    return tiny, torch_models.mirror(tiny)


def unet_inputs(config, batch=3):
    """x, t and (if conditional) a context with a padding mask: row 1 padded after 2 tokens."""
    x = randn(batch, config.in_channels, config.sample_size, config.sample_size)
    t = np.random.default_rng(1).uniform(0, 999, batch)
    if config.context_dim is None:
        return x, t, None, None
    context = randn(batch, config.context_length, config.context_dim, seed=2)
    mask = np.ones((batch, config.context_length), dtype=bool)
    mask[1, 2:] = False
    return x, t, context, mask


def as_torch(*arrays):
    return [None if a is None else torch.from_numpy(a) for a in arrays]


def assert_grads_match(tiny, reference):
    grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for name, p in tiny.named_parameters():
        np.testing.assert_allclose(p.grad, grads[name], **TOL, err_msg=name)


def test_mirrors_have_tinydiffs_parameter_names_and_shapes():
    tinies = [UNet(c) for c in UNET_CONFIGS.values()] + [AutoencoderKL(), TextEncoder(TextEncoderConfig())]
    for tiny in tinies:
        reference = torch_models.mirror(tiny)
        assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == \
               {k: tuple(v.shape) for k, v in tiny.state_dict().items()}


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_forward_matches(name):
    tiny, reference = unet_pair(name)
    inputs = unet_inputs(tiny.config)
    np.testing.assert_allclose(tiny(*inputs), reference(*as_torch(*inputs)).detach().numpy(), **TOL)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_backward_matches_autograd(name):
    """MSE loss against a target; for the conditional model one row uses the learned null context
    (condition dropout, as in training), so the null embedding gets a gradient as well."""
    tiny, reference = unet_pair(name)
    x, t, context, mask = unet_inputs(tiny.config)
    target = randn(*x.shape, seed=3)
    dropped = np.array([False, False, True])

    if context is not None:
        context, mask = tiny.replace_with_null_context(context, mask, dropped)
    loss, dpred = mse_loss(tiny(x, t, context, mask), target)
    dx, dcontext = tiny.backward(dpred)

    x, t, context, mask = unet_inputs(tiny.config)  # afresh: the null context replaced rows above
    tx = torch.tensor(x, requires_grad=True)
    tcontext = tcontext_used = tmask = None
    if context is not None:
        tcontext = torch.tensor(context, requires_grad=True)
        rows = torch.from_numpy(dropped)
        tcontext_used = torch.where(rows[:, None, None], reference.null_context(3), tcontext)
        tmask = torch.from_numpy(mask) | rows[:, None]
    torch_loss = F.mse_loss(reference(tx, torch.from_numpy(t), tcontext_used, tmask), torch.from_numpy(target))
    torch_loss.backward()

    assert loss == pytest.approx(torch_loss.item(), rel=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **TOL)
    if tcontext is not None:
        np.testing.assert_allclose(tiny.null_context_backward(dcontext, dropped), tcontext.grad.numpy(), **TOL)
    assert_grads_match(tiny, reference)


def test_autoencoder_forward_and_backward_match():
    config = AutoencoderConfig(block_channels=(4, 8, 8), groups=2, sample_size=16)
    tiny = randomize(AutoencoderKL(config).double())
    reference = torch_models.mirror(tiny)
    x, eps = randn(2, 1, 16, 16), randn(2, 4, 4, 4, seed=1)

    outputs = tiny(x, eps)
    loss, grads, _ = vae_loss(x, *outputs, kl_weight=0.1)
    tiny.backward(*grads)
    tx, teps = as_torch(x, eps)
    torch_outputs = reference(tx, teps)
    torch_loss = torch_models.vae_loss(tx, *torch_outputs, kl_weight=0.1)
    torch_loss.backward()

    for a, b in zip(outputs, torch_outputs):  # x̂, μ, log σ²
        np.testing.assert_allclose(a, b.detach().numpy(), **TOL)
    assert loss == pytest.approx(torch_loss.item(), rel=1e-12)
    assert_grads_match(tiny, reference)


def test_text_encoder_forward_and_backward_match():
    tokens = Tokenizer.from_captions().encode(["a bold 7", "the digit 3, thin, leaning left", "four"])
    config = TextEncoderConfig(width=16, heads=2, projection_dim=8)
    tiny = randomize(TextEncoder(config).double())
    reference = torch_models.mirror(tiny)
    d_hidden, d_pooled = randn(3, tokens.ids.shape[1], 16), randn(3, 8, seed=1)

    hidden, pooled = tiny(tokens.ids, tokens.mask)
    tiny.backward(d_hidden, d_pooled)
    torch_hidden, torch_pooled = reference(torch.from_numpy(tokens.ids.astype(np.int64)), torch.from_numpy(tokens.mask))
    ((torch_hidden * torch.from_numpy(d_hidden)).sum() + (torch_pooled * torch.from_numpy(d_pooled)).sum()).backward()

    np.testing.assert_allclose(hidden, torch_hidden.detach().numpy(), **TOL)
    np.testing.assert_allclose(pooled, torch_pooled.detach().numpy(), **TOL)
    assert_grads_match(tiny, reference)
