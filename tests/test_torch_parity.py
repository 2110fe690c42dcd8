"""PyTorch parity (optional: skipped when torch is not installed).

A PyTorch state dict of the same shape loads one-to-one into the matching tinydiff layer and gives
the same output; for conv2d, group norm and attention the hand-written gradients also match torch
autograd. Everything runs in float64 so agreement is to ~1e-12, not float32 noise.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

from tinydiff.backend import to_device, to_numpy  # noqa: E402
from tinydiff.nn import GELU, Attention, Conv2d, Embedding, GroupNorm, LayerNorm, Linear, Sequential, SiLU  # noqa: E402


def loaded(tiny, torch_module, backend):
    """The tinydiff layer in float64 on ``backend`` with the torch module's weights (torch's made float64 too)."""
    torch_module.double()
    tiny.double().to(backend)
    tiny.load_state_dict({k: v.detach().numpy() for k, v in torch_module.state_dict().items()})
    return tiny


def perturb_affine(module):
    """Norm layers start at γ = 1, β = 0, which would hide a transposed or missing affine."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def run_both(tiny, torch_module, x: np.ndarray, backend, *extra_torch, **kw):
    out_tiny = to_numpy(tiny(to_device(x, backend), **kw))
    out_torch = torch_module(torch.from_numpy(x), *extra_torch).detach().numpy()
    return out_tiny, out_torch


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_linear_matches_torch(backends):
    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3)
    np.testing.assert_allclose(*run_both(loaded(Linear(5, 3), ref, backends), ref, randn(2, 4, 5), backends), rtol=1e-12)


def test_conv2d_matches_torch(backends):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    tiny = loaded(Conv2d(3, 4, 3, stride=2, padding=1), ref, backends)
    np.testing.assert_allclose(*run_both(tiny, ref, randn(2, 3, 7, 6), backends), rtol=1e-11, atol=1e-12)


def test_group_norm_matches_torch(backends):
    torch.manual_seed(0)
    ref = perturb_affine(torch.nn.GroupNorm(2, 6))
    tiny = loaded(GroupNorm(2, 6), ref, backends)
    np.testing.assert_allclose(*run_both(tiny, ref, 3 * randn(2, 6, 4, 5) + 1, backends), rtol=1e-11, atol=1e-12)


def test_layer_norm_matches_torch(backends):
    torch.manual_seed(0)
    ref = perturb_affine(torch.nn.LayerNorm(8))
    tiny = loaded(LayerNorm(8), ref, backends)
    np.testing.assert_allclose(*run_both(tiny, ref, 2 * randn(3, 5, 8) - 1, backends), rtol=1e-11, atol=1e-12)


def test_embedding_matches_torch(backends):
    torch.manual_seed(0)
    ref = torch.nn.Embedding(10, 4)
    tiny = loaded(Embedding(10, 4), ref, backends)
    ids = np.array([[1, 9, 1], [0, 3, 3]])
    np.testing.assert_array_equal(to_numpy(tiny(to_device(ids, backends))), ref(torch.from_numpy(ids)).detach().numpy())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(backends, approximate):
    x = 3 * randn(4, 7)
    out, want = run_both(GELU(approximate), torch.nn.GELU(approximate=approximate), x, backends)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-15)


def test_silu_matches_torch(backends):
    np.testing.assert_allclose(*run_both(SiLU(), torch.nn.SiLU(), 5 * randn(4, 7), backends), rtol=1e-12, atol=1e-15)


def test_sequential_state_dict_keys_match_torch(backends):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.SiLU(), torch.nn.Linear(6, 2))
    tiny = loaded(Sequential([Linear(4, 6), SiLU(), Linear(6, 2)]), ref, backends)
    assert list(tiny.state_dict()) == list(ref.state_dict())
    np.testing.assert_allclose(*run_both(tiny, ref, randn(3, 4), backends), rtol=1e-12)


class TorchAttention(torch.nn.Module):
    """The reference: diffusers-style projections around torch's scaled_dot_product_attention."""

    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_out = torch.nn.Linear(inner, query_dim)

    def forward(self, x, context=None, mask=None):
        source = x if context is None else context
        b = x.shape[0]

        def split(t):  # (B, L, h·d) → (B, h, L, d)
            return t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)

        attn_mask = None if mask is None else mask[:, None, None, :]
        o = TF.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(source)), split(self.to_v(source)),
                                            attn_mask=attn_mask)
        return self.to_out(o.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_matches_torch_output_and_gradients(backends, cross):
    torch.manual_seed(0)
    context_dim = 5 if cross else 6
    ref = TorchAttention(6, context_dim, heads=2, dim_head=4)
    tiny = loaded(Attention(6, context_dim=context_dim, heads=2, dim_head=4), ref, backends)
    x, ctx, dout = randn(2, 3, 6, seed=1), randn(2, 4, context_dim, seed=2), randn(2, 3, 6, seed=3)
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], bool)  # partly masked (torch gives NaN for fully masked rows)
    if not cross:
        ctx, mask = None, mask[:, :3]

    xt = torch.from_numpy(x).requires_grad_()
    ct = None if ctx is None else torch.from_numpy(ctx).requires_grad_()
    out_t = ref(xt, ct, torch.from_numpy(mask))
    out_t.backward(torch.from_numpy(dout))

    out = tiny(to_device(x, backends), None if ctx is None else to_device(ctx, backends), to_device(mask, backends))
    np.testing.assert_allclose(to_numpy(out), out_t.detach().numpy(), rtol=1e-11, atol=1e-12)
    grads = tiny.backward(to_device(dout, backends))
    if cross:
        dx, dctx = grads
        np.testing.assert_allclose(to_numpy(dctx), ct.grad.numpy(), rtol=1e-10, atol=1e-12)
    else:
        dx = grads
    np.testing.assert_allclose(to_numpy(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for name, p in tiny.named_parameters():
        np.testing.assert_allclose(to_numpy(p.grad), dict(ref.named_parameters())[name].grad.numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=name)


def test_conv2d_gradients_match_torch_autograd(backends):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    tiny = loaded(Conv2d(3, 4, 3, stride=2, padding=1), ref, backends)
    x = randn(2, 3, 7, 6)
    xt = torch.from_numpy(x).requires_grad_()
    out_t = ref(xt)
    dout = randn(*out_t.shape, seed=1)
    out_t.backward(torch.from_numpy(dout))
    tiny(to_device(x, backends))
    dx = tiny.backward(to_device(dout, backends))
    np.testing.assert_allclose(to_numpy(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(tiny.weight.grad), ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(tiny.bias.grad), ref.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_group_norm_gradients_match_torch_autograd(backends):
    torch.manual_seed(0)
    ref = perturb_affine(torch.nn.GroupNorm(3, 6))
    tiny = loaded(GroupNorm(3, 6), ref, backends)
    x = 2 * randn(2, 6, 3, 4) + 0.5
    xt = torch.from_numpy(x).requires_grad_()
    dout = randn(*x.shape, seed=1)
    ref(xt).backward(torch.from_numpy(dout))
    tiny(to_device(x, backends))
    dx = tiny.backward(to_device(dout, backends))
    np.testing.assert_allclose(to_numpy(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(tiny.weight.grad), ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(tiny.bias.grad), ref.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
