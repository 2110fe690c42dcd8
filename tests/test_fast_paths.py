"""The fast implementations against the readable references they replace, and the switch between them.

``tinydiff/nn/conv.py`` is the reference convolution (im2col over the batch, one matrix product,
col2im); ``tinydiff/nn/fast_conv.py`` computes the same numbers faster (chunks, shifted copies,
1×1 matmuls, Winograd F(2×2, 3×3)). In float64 they must agree to rounding (1e-12) in the output
and in all three gradients, for every geometry whose code path differs; in float32 the Winograd
path rounds differently from a direct sum (its transforms add and subtract before multiplying),
so it is held to a stated tolerance instead.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tinydiff import backend
from tinydiff.nn import Conv2d, conv, fast_conv, gradcheck_module

GEOMETRIES = [  # (N, C, O, H, W, kernel, stride, padding): what each exercises in fast_conv
    (3, 4, 5, 8, 8, 3, 1, 1),  # 3×3 'same', even size: Winograd forward, dW and dx (O < 2C)
    (2, 3, 4, 4, 6, 3, 1, 1),  # the same on a non-square 4×6 image
    (2, 2, 6, 8, 4, 3, 1, 1),  # Winograd forward, dW by im2col, dx by col2im (O ≥ 2C)
    (3, 3, 4, 7, 5, 3, 1, 1),  # odd size: im2col by shifted runs
    (2, 3, 4, 7, 6, 3, 2, 1),  # strided: window copies, dx by col2im
    (2, 3, 4, 7, 6, 1, 1, 0),  # 1×1: batched matmul
    (2, 3, 4, 7, 6, 1, 2, 0),  # 1×1 strided: im2col
    (2, 3, 4, 7, 6, 3, 1, 0),  # padding 0: dx by the transposed conv with padding 2
    (2, 3, 4, 2, 3, 5, 1, 2),  # a 5×5 kernel wider than the 2×3 image
    (2, 3, 4, 2, 2, 3, 1, 1),  # 3×3 on 2×2 (smaller than the kernel): Winograd with one tile
]


def _inputs(n, c, o, h, w, kernel, dtype, seed=0):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, c, h, w)).astype(dtype)
    weight = (gen.standard_normal((o, c, kernel, kernel)) / kernel).astype(dtype)
    bias = gen.standard_normal(o).astype(dtype)
    return x, weight, bias


@pytest.fixture(params=["winograd", "im2col"])
def small_batch_path(request, monkeypatch):
    """Both paths of a 3×3 'same' convolution of a small batch: Winograd (its thresholds of tiles
    and of channels lowered to 0) and im2col (the default below ``WINOGRAD_MIN_ROWS`` tiles)."""
    if request.param == "winograd":
        monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_ROWS", 0)
        monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_PRODUCT_PER_PIXEL", 0)
    one_tile = np.zeros((1, 1, 2, 2))
    assert fast_conv._winograd_applies(one_tile, 1, 3, 3, 1, 1, 1) == (request.param == "winograd")
    return request.param


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_conv2d_equals_the_reference_in_float64(geometry, with_bias, small_batch_path):
    n, c, o, h, w, kernel, stride, padding = geometry
    x, weight, bias = _inputs(n, c, o, h, w, kernel, np.float64)
    bias = bias if with_bias else None
    out_ref, cache_ref = conv.conv2d_forward(x, weight, bias, stride, padding)
    out_fast, cache_fast = fast_conv.conv2d_forward(x, weight, bias, stride, padding)
    np.testing.assert_allclose(out_fast, out_ref, rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(1).standard_normal(out_ref.shape)
    grads_ref = conv.conv2d_backward(dout, cache_ref)
    grads_fast = fast_conv.conv2d_backward(dout, cache_fast)
    for name, got, want in zip(("dx", "dw", "db"), grads_fast, grads_ref):
        if want is None:
            assert got is None, name
        else:
            assert got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("n,c,o,size", [(16, 32, 32, 8), (32, 64, 64, 4), (8, 96, 32, 8)])
def test_winograd_conv2d_in_float32_is_within_rounding_of_the_reference(n, c, o, size):
    """The U-Net's 3×3 shapes in float32: forward, input and weight gradient (all Winograd) within
    a relative 1e-5 of the float64 result (a direct float32 sum is within about 1e-6)."""
    x, weight, bias = _inputs(n, c, o, size, size, 3, np.float32)
    exact, cache64 = conv.conv2d_forward(x.astype(np.float64), weight.astype(np.float64), bias.astype(np.float64), 1, 1)
    out, cache = fast_conv.conv2d_forward(x, weight, bias, 1, 1)
    assert out.dtype == np.float32
    assert fast_conv._winograd_applies(x, o, 3, 3, 1, 1, 1)
    assert np.abs(out - exact).max() / np.abs(exact).max() < 1e-5
    dout = np.random.default_rng(2).standard_normal(out.shape)
    dx_exact, dw_exact, _ = conv.conv2d_backward(dout, cache64)
    dx, dw, _ = fast_conv.conv2d_backward(dout.astype(np.float32), cache)
    assert dw.dtype == np.float32
    assert np.abs(dx - dx_exact).max() / np.abs(dx_exact).max() < 1e-5
    assert np.abs(dw - dw_exact).max() / np.abs(dw_exact).max() < 1e-5


def test_winograd_scratch_reuse_keeps_the_zero_padding(monkeypatch):
    """The Winograd path reuses one scratch buffer for every layer; a call on a large image leaves
    numbers where a smaller image's padding lies, and the padding must read as zeros anyway."""
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_ROWS", 0)
    monkeypatch.setattr(fast_conv, "WINOGRAD_MIN_PRODUCT_PER_PIXEL", 0)
    big, _, _ = _inputs(2, 3, 4, 8, 8, 3, np.float64, seed=5)
    x, weight, bias = _inputs(3, 3, 4, 4, 4, 3, np.float64, seed=6)
    want = conv.conv2d_forward(x, weight, bias, 1, 1)[0]
    for _ in range(2):
        fast_conv.conv2d_forward(big * 100, weight, bias, 1, 1)
        np.testing.assert_allclose(fast_conv.conv2d_forward(x, weight, bias, 1, 1)[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,c,o,size,winograd", [
    (7, 32, 32, 8, False), (8, 32, 32, 8, True),  # 16 tiles per image: 112, then 128 (WINOGRAD_MIN_ROWS)
    (8, 32, 31, 8, False),  # C·O = 992 < 16·8·8 (WINOGRAD_MIN_PRODUCT_PER_PIXEL)
    (32, 8, 8, 4, False), (32, 16, 16, 4, True),  # 4 tiles per image at 4×4, and C·O against 16·4·4 = 256
    (2, 32, 32, 16, False), (2, 64, 64, 16, True),  # 16×16: 64 tiles per image, C·O against 4,096
])
def test_winograd_runs_from_its_thresholds_of_tiles_and_channels_and_im2col_below(monkeypatch, n, c, o, size,
                                                                                   winograd):
    """A batch of fewer than ``WINOGRAD_MIN_ROWS`` tiles (N·H/2·W/2), or with fewer channels than
    the image's size asks for, runs im2col, else Winograd: counted by the calls each makes,
    forward and backward (dx by the transposed convolution, whose C and O swap, and dW)."""
    calls = []
    for name in ("_winograd_3x3", "_winograd_weight_grad", "_im2col_chunks"):
        original = getattr(fast_conv, name)
        monkeypatch.setattr(fast_conv, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, weight, bias = _inputs(n, c, o, size, size, 3, np.float64)
    out, cache = fast_conv.conv2d_forward(x, weight, bias, 1, 1)
    fast_conv.conv2d_backward(np.ones_like(out), cache)
    assert set(calls) == ({"_winograd_3x3", "_winograd_weight_grad"} if winograd else {"_im2col_chunks"}), calls


def test_winograd_keeps_its_transformed_input_for_the_weight_gradient_only_when_gradients_are_wanted(monkeypatch):
    """With gradients wanted the forward pass keeps V = Bᵀ d B in its cache and dW reuses it (the
    backward pass transforms only dout, for dx); under no_grad nothing is kept. dW from the kept V,
    from V recomputed, and the reference's agree."""
    from tinydiff.nn import no_grad

    x, weight, bias = _inputs(8, 32, 32, 8, 8, 3, np.float64)  # 128 tiles, C·O = 16·8·8: Winograd
    dout = np.random.default_rng(1).standard_normal((8, 32, 8, 8))
    with no_grad():
        assert fast_conv.conv2d_forward(x, weight, bias, 1, 1)[1].v is None
    out, cache = fast_conv.conv2d_forward(x, weight, bias, 1, 1)
    assert cache.v.shape == (4, 4, 4, 4, 8, 32)
    transforms = []
    original = fast_conv._winograd_input_transform
    monkeypatch.setattr(fast_conv, "_winograd_input_transform", lambda *a: transforms.append(a[0].shape) or original(*a))
    _, dw, _ = fast_conv.conv2d_backward(dout, cache)
    assert transforms == [dout.shape]  # dx's transposed convolution only
    want = conv.conv2d_backward(dout, conv.conv2d_forward(x, weight, bias, 1, 1)[1])[1]
    np.testing.assert_allclose(dw, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast_conv._winograd_weight_grad(x, dout), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reference", [False, True])
def test_conv2d_layer_runs_the_implementation_the_switch_selects_and_its_gradients_check(reference):
    layer = Conv2d(3, 4, 3, padding=1).double()
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 6))
    with backend.use_reference(reference):
        layer(x)
        assert layer._cache[0] is (conv if reference else fast_conv)
        errors = gradcheck_module(layer, x)
    assert max(errors.values()) < 1e-6, errors


def test_backward_uses_the_implementation_of_its_forward_pass_even_if_the_switch_changed():
    layer = Conv2d(2, 3, 3, padding=1).double()
    x = np.random.default_rng(4).standard_normal((2, 2, 4, 4))
    with backend.use_reference(True):
        out = layer(x)
    dx = layer.backward(np.ones_like(out))  # the switch is off again: the reference cache still works
    want, cache = conv.conv2d_forward(x, layer.weight.data, layer.bias.data, 1, 1)
    np.testing.assert_allclose(dx, conv.conv2d_backward(np.ones_like(want), cache)[0], rtol=1e-12)


def test_use_reference_as_a_call_and_as_a_block_restores_the_previous_choice():
    before = backend.reference_enabled()  # False unless the tests run with TINYDIFF_REFERENCE=1
    with backend.use_reference():
        assert backend.reference_enabled() is True
        assert backend.fast_or_reference("fast", "reference") == "reference"
        with backend.use_reference(False):
            assert backend.fast_or_reference("fast", "reference") == "fast"
        assert backend.reference_enabled() is True
    assert backend.reference_enabled() is before
    try:
        backend.use_reference(not before)
        assert backend.reference_enabled() is (not before)
    finally:
        backend.use_reference(before)


@pytest.mark.parametrize("value,expected", [("1", "True"), ("0", "False"), ("", "False")])
def test_tinydiff_reference_environment_variable(value, expected):
    code = "from tinydiff import backend; print(backend.reference_enabled())"
    env = {"TINYDIFF_REFERENCE": value, "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == expected, done.stderr


def test_tinydiff_reference_rejects_an_unknown_value_in_one_line():
    code = "from tinydiff import backend\ntry:\n    backend.reference_enabled()\nexcept backend.BackendError as e:\n    print(e)"
    env = {"TINYDIFF_REFERENCE": "maybe", "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "TINYDIFF_REFERENCE='maybe' is not understood; use 1 (reference code) or 0 (fast code)"


# --------------------------------------------------------------------------- erf for GELU

def test_erf_rational_is_within_its_stated_error_of_scipy():
    """``activations.erf_rational`` (a rational approximation evaluated in float64): within 6.6e-8
    of scipy's erf over [−8, 8], absolutely and relative to erf near 0; within 1e-7 once rounded to
    float32; exactly ±1 past the clip at |x| = 4 only up to float32 rounding; odd."""
    import scipy.special

    from tinydiff.nn import activations

    x = np.concatenate([np.linspace(-8.0, 8.0, 400_001), np.geomspace(1e-30, 1.0, 2001)])
    exact = scipy.special.erf(x)
    approx = activations.erf_rational(x)
    assert approx.dtype == np.float64
    assert np.abs(approx - exact).max() < 6.6e-8
    small = (np.abs(x) < 0.5) & (x != 0)
    assert (np.abs(approx - exact)[small] / np.abs(exact[small])).max() < 6.6e-8
    np.testing.assert_array_equal(activations.erf_rational(-x), -approx)
    x32 = x.astype(np.float32)
    approx32 = activations.erf_rational(x32)
    assert approx32.dtype == np.float32 and approx32.shape == x32.shape
    assert np.abs(approx32 - scipy.special.erf(x32.astype(np.float64))).max() < 1e-7
    grid = x32[:3000].reshape(30, 100)  # any shape, and sizes that are not a multiple of the chunk
    np.testing.assert_array_equal(activations.erf_rational(grid), approx32[:3000].reshape(30, 100))


def test_gelu_uses_the_fast_erf_on_float32_only_and_the_reference_switch_restores_scipy():
    import scipy.special

    from tinydiff.nn import activations

    x = np.random.default_rng(7).standard_normal((5, 70_000)).astype(np.float32) * 3  # several chunks
    phi_scipy = (0.5 * (1.0 + scipy.special.erf(x * np.float32(1 / np.sqrt(2))))).astype(np.float32)
    with backend.use_reference():
        out_ref, cache_ref = activations.gelu_forward(x)
    np.testing.assert_array_equal(cache_ref.phi, phi_scipy)  # the reference: scipy's erf, bitwise
    out, cache = activations.gelu_forward(x)
    assert out.dtype == np.float32
    assert not np.array_equal(cache.phi, phi_scipy)  # the fast erf ran
    assert np.abs(cache.phi - phi_scipy).max() < 1.5e-7  # two float32 units of Φ near 1 (1.2e-7)
    assert np.abs(out - out_ref).max() < 1e-7 * np.abs(x).max()
    x64 = x[:, :100].astype(np.float64)  # float64 (gradient checks, references): scipy's erf always
    out64, _ = activations.gelu_forward(x64)
    np.testing.assert_array_equal(out64, x64 * (0.5 * (1.0 + scipy.special.erf(x64 * (1.0 / np.sqrt(2.0))))))


# --------------------------------------------------------------------------- the training step

def test_the_reference_switch_runs_the_one_process_diffusion_step_whatever_threads_says():
    """Under ``use_reference`` a step asked to split its rows over 3 cores runs
    ``reference_step`` in this process: no worker starts, and loss and gradients are bitwise
    those of threads=1 (the split step sums blocks scaled by 3/8, 3/8, 2/8: other roundings;
    both runs use the reference layers, whose rounding differs from the fast ones')."""
    import multiprocessing

    from tinydiff.models import UNet, UNetConfig
    from tinydiff.nn import Embedding
    from tinydiff.train.diffusion import DiffusionTrainingConfig, LabelConditioning, diffusion_grads

    config = UNetConfig(in_channels=1, out_channels=1, sample_size=8, block_channels=(8, 16), layers_per_block=1,
                        attention_levels=(False, True), context_dim=8, context_length=1, learned_null_context=True,
                        heads=2, dim_head=4, groups=4, time_embed_dim=16)
    gen = np.random.default_rng(0)
    data, labels = gen.uniform(-1, 1, (32, 1, 8, 8)), gen.integers(0, 10, 32)
    results = {}
    for threads in (1, 3):
        unet, embedding = UNet(config, seed=1).double(), Embedding(10, 8, generator=np.random.default_rng(2)).double()
        step = diffusion_grads(unet, data, DiffusionTrainingConfig(batch_size=8, cond_drop_prob=0.3),
                               LabelConditioning(embedding, labels), threads=threads)
        with backend.use_reference():
            loss, logs = step(0, np.random.default_rng(5))
            assert multiprocessing.active_children() == []  # no gradient workers were started
        step.close()
        grads = [p.grad.copy() for p in unet.parameters() + embedding.parameters()]
        results[threads] = (loss, logs, grads)
    (loss1, logs1, g1), (loss3, logs3, g3) = results[1], results[3]
    assert loss3 == loss1 and logs3 == logs1 and logs1["dropped"] > 0
    for a, b in zip(g1, g3):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- in-place arithmetic

def _layer_cases():
    """name → (layer, inputs): each layer or block that sums, scales or normalises in place."""
    from tinydiff.models.blocks import ResBlock, SpatialTransformer, TransformerBlock
    from tinydiff.nn import GELU, Attention, GroupNorm, LayerNorm, Linear, SiLU

    gen = np.random.default_rng(3)

    def f(*shape):
        return gen.standard_normal(shape)

    mask = np.array([[True, True, False], [True, False, False]])
    return {
        "Linear": (Linear(4, 5), (f(2, 3, 4),)),
        "SiLU": (SiLU(), (f(2, 3, 4),)),
        "GELU": (GELU(), (f(2, 3, 4),)),
        "LayerNorm": (LayerNorm(4), (f(2, 3, 4),)),
        "GroupNorm": (GroupNorm(2, 4), (f(2, 4, 3, 3),)),
        "self-attention": (Attention(6, heads=2, dim_head=3), (f(2, 4, 6),)),
        "masked cross-attention": (Attention(6, 5, heads=2, dim_head=3), (f(2, 4, 6), f(2, 3, 5), mask)),
        "ResBlock with shortcut": (ResBlock(4, 6, 8, 2), (f(2, 4, 4, 4), f(2, 8))),
        "ResBlock without": (ResBlock(4, 4, None, 2), (f(2, 4, 4, 4),)),
        "TransformerBlock": (TransformerBlock(6, 2, 3, 5), (f(2, 4, 6), f(2, 3, 5), mask)),
        "SpatialTransformer": (SpatialTransformer(4, 2, 3, 5, 2), (f(2, 4, 2, 2), f(2, 3, 5), mask)),
    }


@pytest.mark.parametrize("name", list(_layer_cases()))
def test_in_place_sums_never_write_into_inputs_outputs_or_upstream_gradients(name):
    """Residual sums, SiLU, softmax and the attention scores are computed in place, into arrays
    the layer made itself: its inputs, the output it returned and the gradient handed to backward
    are left as they were, and a second forward/backward repeats the first bit for bit."""
    layer, inputs = _layer_cases()[name]
    layer.double()
    kept = [x.copy() for x in inputs]
    results = []
    for _ in range(2):
        layer.zero_grad()
        out = layer(*inputs)
        out_kept = out.copy()
        dout = np.random.default_rng(4).standard_normal(out.shape)
        dout_kept = dout.copy()
        grads = layer.backward(dout)
        grads = grads if isinstance(grads, tuple) else (grads,)
        np.testing.assert_array_equal(dout, dout_kept)
        np.testing.assert_array_equal(out, out_kept)
        for x, x_kept in zip(inputs, kept):
            np.testing.assert_array_equal(x, x_kept)
        results.append([out] + [g for g in grads if g is not None] + [p.grad.copy() for p in layer.parameters()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- GroupNorm → SiLU in inference

def _group_norm_silu_inputs(shape, channels, seed):
    """x with a mean far from zero and uneven scales; γ, β neither ones nor zeros (each term matters)."""
    gen = np.random.default_rng(seed)
    x = 3.0 * gen.standard_normal(shape) + gen.standard_normal((1, channels) + (1,) * (len(shape) - 2)) + 1.5
    return x, gen.uniform(0.5, 2.0, channels) * gen.choice([-1, 1], channels), gen.standard_normal(channels)


@pytest.mark.parametrize("shape,groups", [((3, 8, 4, 4), 4), ((2, 6, 5), 3), ((2, 4, 3, 2), 1), ((2, 4, 3, 3), 4)])
def test_fused_group_norm_silu_equals_the_two_layers_in_float64(shape, groups):
    from tinydiff.nn import fast_norm
    from tinydiff.nn import functional as F

    x, gamma, beta = _group_norm_silu_inputs(shape, shape[1], seed=sum(shape))
    want = F.silu_forward(F.group_norm_forward(x, groups, gamma, beta, 1e-5)[0])[0]
    got = fast_norm.group_norm_silu_forward(x, groups, gamma, beta, 1e-5)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_fused_group_norm_silu_in_float32_is_within_rounding_of_float64():
    from tinydiff.nn import fast_norm

    x, gamma, beta = _group_norm_silu_inputs((16, 32, 8, 8), 32, seed=1)
    exact = fast_norm.group_norm_silu_forward(x, 8, gamma, beta)
    got = fast_norm.group_norm_silu_forward(x.astype(np.float32), 8, gamma.astype(np.float32), beta.astype(np.float32))
    assert got.dtype == np.float32
    assert np.abs(got - exact).max() / np.abs(exact).max() < 1e-6


def test_group_norm_silu_runs_fused_only_in_inference_on_the_fast_path(monkeypatch):
    """With caches wanted (training) or under ``use_reference`` the two layers run and keep their
    caches; in ``no_grad`` the fused function runs and neither layer can run backward after it."""
    from tinydiff.nn import GroupNorm, SiLU, fast_norm, group_norm_silu, no_grad

    calls = []
    original = fast_norm.group_norm_silu_forward
    monkeypatch.setattr(fast_norm, "group_norm_silu_forward", lambda *a: calls.append(1) or original(*a))
    norm, act = GroupNorm(2, 4).double(), SiLU()
    x, gamma, beta = _group_norm_silu_inputs((2, 4, 3, 3), 4, seed=2)
    norm.weight.data[...], norm.bias.data[...] = gamma, beta
    want = act(norm(x))
    np.testing.assert_array_equal(group_norm_silu(norm, act, x), want)  # caches kept: the layers ran
    assert calls == []
    norm.backward(act.backward(np.ones_like(want)))  # both caches were there
    with no_grad(), backend.use_reference():
        np.testing.assert_array_equal(group_norm_silu(norm, act, x), want)
    assert calls == []
    group_norm_silu(norm, act, x)
    with no_grad():
        np.testing.assert_allclose(group_norm_silu(norm, act, x), want, rtol=1e-12, atol=1e-12)
    assert calls == [1]
    with pytest.raises(RuntimeError, match="without a forward pass"):
        act.backward(np.ones_like(want))
    with pytest.raises(ValueError, match="expects 4 features"), no_grad():
        group_norm_silu(norm, act, x[:, :3])


# --------------------------------------------------------------------------- attention

def _attention_inputs(b, h, lq, lk, d, dv, dtype, seed):
    gen = np.random.default_rng(seed)
    q, k = (3 * gen.standard_normal((b, h, n, d)).astype(dtype) for n in (lq, lk))
    return q, k, gen.standard_normal((b, h, lk, dv)).astype(dtype)


ATTENTION_MASKS = {
    "none": None,
    "keys": np.array([[True, False, True, True, False], [False, False, False, False, False]])[:, None, None, :],
    "full": np.random.default_rng(0).random((2, 3, 4, 5)) < 0.6,  # a different mask per query and head
}


@pytest.mark.parametrize("mask_name", list(ATTENTION_MASKS))
def test_fast_attention_equals_the_reference_in_float64(mask_name):
    """Forward (output and P, the second image's queries fully masked in "keys") and the backward
    run on each one's cache: equal to rounding, with Lq ≠ Lk and dv ≠ d."""
    from tinydiff.nn import attention, fast_attention

    mask = ATTENTION_MASKS[mask_name]
    q, k, v = _attention_inputs(2, 3, 4, 5, 6, 7, np.float64, seed=1)
    out_ref, cache_ref = attention.attention_forward(q, k, v, mask)
    out, cache = fast_attention.attention_forward(q, k, v, mask)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.p, cache_ref.p, rtol=1e-12, atol=1e-15)
    assert cache.p.shape == (2, 3, 4, 5)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    for got, want in zip(attention.attention_backward(dout, cache), attention.attention_backward(dout, cache_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_fast_attention_in_float32_is_within_rounding_and_the_switch_selects_the_reference(monkeypatch):
    """The U-Net's attention shape in float32; ``nn.functional.attention_forward`` is the fast one,
    and under ``use_reference`` it runs ``attention.attention_forward`` itself."""
    from tinydiff.nn import attention, fast_attention
    from tinydiff.nn import functional as F

    q, k, v = _attention_inputs(8, 4, 16, 16, 8, 8, np.float32, seed=3)
    exact, _ = attention.attention_forward(*(a.astype(np.float64) for a in (q, k, v)))
    out, cache = F.attention_forward(q, k, v)
    assert out.dtype == cache.p.dtype == np.float32
    assert np.abs(out - exact).max() / np.abs(exact).max() < 1e-6
    calls = []
    original = attention.attention_forward
    monkeypatch.setattr(attention, "attention_forward", lambda *a: calls.append(1) or original(*a))
    F.attention_forward(q, k, v)
    assert calls == []
    with backend.use_reference():
        out_ref, _ = F.attention_forward(q, k, v)
    assert calls == [1]
    assert F.attention_forward is fast_attention.attention_forward
