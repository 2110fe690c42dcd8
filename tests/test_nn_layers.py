"""Layer classes and the Module machinery: gradient checks of every layer (parameters and inputs),
parameter naming, gradient accumulation, inference mode, dtype moves, state dicts, train/eval, and
clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tinydiff.backend import BackendError, backend_of, rng, to_device, to_numpy
from tinydiff.nn import (
    GELU,
    Attention,
    Conv2d,
    Dropout,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    Parameter,
    Sequential,
    SiLU,
    StateDictError,
    Upsample,
    gradcheck_module,
    is_grad_enabled,
    manual_seed,
    no_grad,
)

TOL = 1e-6


def randn(shape, backend, seed=10, scale=1.0):
    return to_device(scale * np.random.default_rng(seed).standard_normal(shape), backend)


def prepared(module: Module, backend: str) -> Module:
    """float64 on ``backend``, with non-trivial affine parameters (γ = 1, β = 0 would hide bugs)."""
    module.double().to(backend)
    for i, p in enumerate(module.parameters()):
        p.data[...] = randn(p.shape, backend, seed=100 + i)
    return module


def assert_gradcheck(module, *inputs, **kwargs):
    errors = gradcheck_module(module, *inputs, seed=2024, num_samples=16, **kwargs)
    assert errors and max(errors.values()) < TOL, errors
    return errors


# --------------------------------------------------------------------------- gradient checks


def test_linear_layer_gradcheck_3d_input(backends):
    errors = assert_gradcheck(prepared(Linear(5, 4), backends), randn((2, 3, 5), backends))
    assert set(errors) == {"input.0", "weight", "bias"}


def test_linear_layer_without_bias_gradcheck(backends):
    layer = prepared(Linear(5, 4, bias=False), backends)
    assert layer.bias is None
    assert set(assert_gradcheck(layer, randn((3, 5), backends))) == {"input.0", "weight"}


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv2d_layer_gradcheck(backends, kernel, stride, padding):
    layer = prepared(Conv2d(3, 4, kernel, stride=stride, padding=padding), backends)
    assert_gradcheck(layer, randn((2, 3, 6, 5), backends))


def test_group_norm_layer_gradcheck(backends):
    assert_gradcheck(prepared(GroupNorm(2, 4), backends), randn((2, 4, 3, 3), backends, scale=2.0))


def test_layer_norm_layer_gradcheck(backends):
    assert_gradcheck(prepared(LayerNorm(6), backends), randn((2, 3, 6), backends, scale=2.0))


def test_embedding_layer_gradcheck_with_repeated_ids(backends):
    ids = to_device(np.array([[0, 2, 2], [4, 0, 2]]), backends)
    errors = assert_gradcheck(prepared(Embedding(5, 3), backends), ids)
    assert set(errors) == {"weight"}  # integer ids are passed through, not checked


@pytest.mark.parametrize("layer", [SiLU(), GELU(), GELU("tanh"), Upsample()], ids=["silu", "gelu", "gelu-tanh", "up"])
def test_parameter_free_layer_gradcheck(backends, layer):
    assert_gradcheck(layer, randn((2, 3, 4, 4), backends, scale=2.0))


class SeededDropout(Dropout):
    """Dropout whose generator is reset on every forward, so finite differences see one mask."""

    def forward(self, x):
        self.generator = rng(3)
        return super().forward(x)


def test_dropout_layer_gradcheck_with_fixed_generator(backends):
    assert_gradcheck(SeededDropout(0.3), randn((4, 5), backends))


def test_self_attention_layer_gradcheck_with_mask(backends):
    attn = prepared(Attention(6, heads=2, dim_head=3), backends)
    mask = to_device(np.array([[1, 1, 0, 1], [1, 0, 0, 0]], bool), backends)
    errors = assert_gradcheck(attn, randn((2, 4, 6), backends), None, mask)
    assert {"input.0", "to_q.weight", "to_k.weight", "to_v.weight", "to_out.weight", "to_out.bias"} == set(errors)


def test_cross_attention_layer_gradcheck_with_mask_returns_dx_and_dcontext(backends):
    attn = prepared(Attention(6, context_dim=5, heads=2, dim_head=4), backends)
    x, ctx = randn((2, 3, 6), backends, 1), randn((2, 4, 5), backends, 2)
    mask = to_device(np.array([[1, 1, 1, 0], [0, 1, 0, 0]], bool), backends)
    errors = assert_gradcheck(attn, x, ctx, mask, input_names=["x", "context"])
    assert {"x", "context"} <= set(errors)
    attn(x, ctx, mask)
    grads = attn.backward(randn((2, 3, 6), backends, 3))
    assert isinstance(grads, tuple) and len(grads) == 2
    assert grads[0].shape == x.shape and grads[1].shape == ctx.shape


def test_attention_with_fully_masked_sample_is_finite_and_gradchecks(backends):
    attn = prepared(Attention(4, context_dim=3, heads=2, dim_head=2), backends)
    mask = to_device(np.array([[1, 0, 1], [0, 0, 0]], bool), backends)
    x, ctx = randn((2, 2, 4), backends, 1), randn((2, 3, 3), backends, 2)
    assert np.isfinite(to_numpy(attn(x, ctx, mask))).all()
    assert_gradcheck(attn, x, ctx, mask)


def test_attention_probs_callback_sees_normalised_probabilities(backends):
    attn = prepared(Attention(4, context_dim=3, heads=2, dim_head=2), backends)
    seen = []
    attn.probs_callback = seen.append
    attn(randn((2, 5, 4), backends), randn((2, 3, 3), backends))
    assert seen[0].shape == (2, 2, 5, 3)
    np.testing.assert_allclose(to_numpy(seen[0]).sum(axis=-1), 1.0)


def test_sequential_gradcheck_runs_children_backward_in_reverse(backends):
    model = prepared(Sequential([Conv2d(2, 4, 3, padding=1), GroupNorm(2, 4), SiLU(), Upsample(), Conv2d(4, 3, 1)]),
                     backends)
    errors = assert_gradcheck(model, randn((2, 2, 3, 3), backends))
    assert {"input.0", "0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"} == set(errors)


# --------------------------------------------------------------------------- module machinery


class Block(Module):
    def __init__(self):
        self.conv = Conv2d(4, 4, 3, padding=1)
        self.norm = GroupNorm(2, 4)


class Net(Module):
    def __init__(self):
        self.proj = Linear(3, 4)
        self.blocks = ModuleList([Block(), Block()])
        self.head = Linear(4, 2, bias=False)


def test_named_parameters_use_dotted_pytorch_names_in_definition_order():
    names = [name for name, _ in Net().named_parameters()]
    assert names == [
        "proj.weight", "proj.bias",
        "blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.0.norm.weight", "blocks.0.norm.bias",
        "blocks.1.conv.weight", "blocks.1.conv.bias", "blocks.1.norm.weight", "blocks.1.norm.bias",
        "head.weight",
    ]
    assert Net().num_parameters() == 3 * 4 + 4 + 2 * (4 * 4 * 9 + 4 + 4 + 4) + 4 * 2


def test_backward_adds_into_grad_and_zero_grad_clears_it(backends):
    layer = prepared(Linear(3, 2), backends)
    x, dout = randn((4, 3), backends, 1), randn((4, 2), backends, 2)
    layer(x)
    layer.backward(dout)
    once = to_numpy(layer.weight.grad).copy()
    assert np.abs(once).max() > 0
    layer(x)
    layer.backward(dout)  # a second backward accumulates (+=), as for a reused tensor
    np.testing.assert_allclose(to_numpy(layer.weight.grad), 2 * once)
    np.testing.assert_allclose(to_numpy(layer.bias.grad), 2 * to_numpy(dout).sum(axis=0))
    layer.zero_grad()
    assert not to_numpy(layer.weight.grad).any() and not to_numpy(layer.bias.grad).any()


def test_no_grad_keeps_no_cache_and_backward_then_raises():
    attn = Attention(4, heads=2, dim_head=2)
    with no_grad():
        assert not is_grad_enabled()
        attn(np.ones((1, 3, 4), np.float32))
    assert is_grad_enabled()
    assert all(getattr(m, "_cache", None) is None for m in attn.modules())
    with pytest.raises(RuntimeError, match=r"Attention\.backward called without a forward pass .*no_grad"):
        attn.backward(np.ones((1, 3, 4), np.float32))


def test_no_grad_restores_grad_mode_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert is_grad_enabled()


def test_backward_twice_without_forward_raises():
    layer = SiLU()
    layer(np.ones(3))
    layer.backward(np.ones(3))
    with pytest.raises(RuntimeError, match="backward called twice"):
        layer.backward(np.ones(3))


def test_double_and_float_cast_parameters_and_reset_grads():
    net = Net().double()
    assert all(p.data.dtype == np.float64 and p.grad.dtype == np.float64 for p in net.parameters())
    net.float()
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32 for p in net.parameters())


def test_to_moves_every_parameter_to_the_backend(backends):
    net = Net().to(backends)
    assert {backend_of(p.data) for p in net.parameters()} == {backends}
    assert {backend_of(p.grad) for p in net.parameters()} == {backends}


def test_manual_seed_makes_initialisation_reproducible():
    manual_seed(5)
    a = Net().state_dict()
    manual_seed(5)
    b = Net().state_dict()
    manual_seed(6)
    c = Net().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["proj.weight"], c["proj.weight"])


def _tiny_models():
    """name → build(seed) for every model with seeded initial weights, at toy sizes."""
    from tinydiff.models import CLIP, AutoencoderConfig, AutoencoderKL, CLIPConfig, ImageEncoder, ImageEncoderConfig
    from tinydiff.models import TextEncoder, TextEncoderConfig, UNet, UNetConfig
    from tinydiff.models.classifier import ClassifierConfig, DigitClassifier
    from tinydiff.train.pixel_digits import PixelDigitModel

    unet = UNetConfig(sample_size=8, block_channels=(8, 16), attention_levels=(False, True), context_dim=6,
                      context_length=3, learned_null_context=True, heads=2, dim_head=4, groups=4, time_embed_dim=16)
    text = TextEncoderConfig(width=16, layers=1, heads=2, projection_dim=8)
    image = ImageEncoderConfig(channels=(8, 8, 8, 8), groups=4, projection_dim=8)
    return {
        "unet": lambda seed: UNet(unet, seed=seed),
        "autoencoder": lambda seed: AutoencoderKL(AutoencoderConfig(block_channels=(4, 8, 8), groups=2), seed=seed),
        "classifier": lambda seed: DigitClassifier(ClassifierConfig(channels=(4, 4, 8, 8), groups=2), seed=seed),
        "text_encoder": lambda seed: TextEncoder(text, seed=seed),
        "image_encoder": lambda seed: ImageEncoder(image, seed=seed),
        "clip": lambda seed: CLIP(CLIPConfig(text, image), seed=seed),
        "pixel_digits": lambda seed: PixelDigitModel(unet, seed=seed),
    }


TINY_MODELS = _tiny_models()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_a_models_initial_weights_depend_on_its_seed_only(name):
    build = TINY_MODELS[name]
    first = build(3).state_dict()
    manual_seed(11)  # whatever happened before must not matter: other layers, other models
    Linear(4, 4), build(4), Embedding(5, 2)
    again = build(3).state_dict()
    assert list(again) == list(first)
    assert all(np.array_equal(first[k], again[k]) for k in first), [k for k in first if not np.array_equal(first[k], again[k])]
    other = build(4).state_dict()
    assert not all(np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_building_a_model_leaves_the_default_generator_alone(name):
    # regression: a model's constructor used to reseed the generator every layer draws from, so
    # a layer built after a model had that model's seed's weights, whatever manual_seed said
    manual_seed(5)
    expected = Linear(4, 4).weight.data.copy()
    manual_seed(5)
    TINY_MODELS[name](0)
    np.testing.assert_array_equal(Linear(4, 4).weight.data, expected)


def test_a_generator_passed_to_a_model_is_the_one_its_seed_would_make():
    from tinydiff.models import UNet, UNetConfig

    config = UNetConfig(sample_size=8, block_channels=(8, 16), attention_levels=(False, True), groups=4)
    a, b = UNet(config, seed=9).state_dict(), UNet(config, generator=rng(9)).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_state_dict_round_trip_reproduces_outputs():
    manual_seed(1)
    src = Sequential([Linear(3, 5), GELU(), LayerNorm(5), Linear(5, 2)])
    manual_seed(2)
    dst = Sequential([Linear(3, 5), GELU(), LayerNorm(5), Linear(5, 2)])
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    assert not np.allclose(src(x), dst(x))
    dst.load_state_dict({k: v.astype(np.float64) for k, v in src.state_dict().items()})  # dtype converted
    assert all(p.data.dtype == np.float32 for p in dst.parameters())
    np.testing.assert_array_equal(src(x), dst(x))


def test_strict_load_lists_missing_unexpected_and_misshaped_keys():
    net = Net()
    state = {k: v.copy() for k, v in net.state_dict().items()}
    del state["head.weight"]
    state["extra.weight"] = np.zeros(3)
    state["proj.bias"] = np.zeros(7)
    with pytest.raises(StateDictError) as info:
        net.load_state_dict(state)
    message = str(info.value)
    assert "missing keys: head.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "proj.bias: checkpoint (7,) vs model (4,)" in message
    assert isinstance(info.value, KeyError) and not message.startswith("'")  # not KeyError's quoting


def test_non_strict_load_ignores_missing_and_unexpected_but_not_misshaped():
    net = Linear(3, 4)
    net.load_state_dict({"weight": np.ones((4, 3)), "other": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(net.weight.data, 1.0)
    with pytest.raises(StateDictError, match=r"bias: checkpoint \(2,\) vs model \(4,\)"):
        net.load_state_dict({"bias": np.zeros(2)}, strict=False)


def test_train_and_eval_switch_dropout_in_every_child():
    model = Sequential([Linear(8, 8), Dropout(0.5)])
    x = np.ones((16, 8), np.float32)
    model.eval()
    assert not model[1].training
    with no_grad():
        np.testing.assert_array_equal(model(x), model[0](x))  # dropout is the identity in eval
    model.train()
    assert model[1].training
    assert (model(x) == 0).any()


def test_parameter_accumulate_rejects_a_wrongly_shaped_gradient():
    p = Parameter(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"gradient for w has shape \(3, 2\), expected \(2, 3\)"):
        p.accumulate(np.zeros((3, 2)), "w")


# --------------------------------------------------------------------------- bad input


def test_linear_rejects_wrong_feature_count():
    with pytest.raises(ValueError, match=r"Linear expects 5 features on axis -1 .*got shape \(2, 4\)"):
        Linear(5, 3)(np.zeros((2, 4), np.float32))


def test_linear_rejects_scalar_input():
    with pytest.raises(ValueError, match="Linear expects 5 features"):
        Linear(5, 3)(np.float32(1.0) * np.ones((), np.float32))


def test_linear_rejects_wrong_dtype_naming_both():
    with pytest.raises(TypeError, match="Linear has float32 parameters but got a float64 input"):
        Linear(5, 3)(np.zeros((2, 5)))


def test_conv2d_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"Conv2d expects a 4-D input \(N, C, H, W\), got shape \(3, 8, 8\)"):
        Conv2d(3, 4, 3)(np.zeros((3, 8, 8), np.float32))


def test_conv2d_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"Conv2d expects 3 features on axis 1 .*got shape \(1, 2, 8, 8\)"):
        Conv2d(3, 4, 3)(np.zeros((1, 2, 8, 8), np.float32))


def test_conv2d_rejects_integer_input():
    with pytest.raises(TypeError, match="Conv2d has float32 parameters but got a int64 input"):
        Conv2d(3, 4, 3)(np.zeros((1, 3, 8, 8), np.int64))


def test_group_norm_rejects_wrong_channels_and_too_low_rank():
    with pytest.raises(ValueError, match=r"GroupNorm expects 4 features on axis 1 .*got shape \(2, 6, 3\)"):
        GroupNorm(2, 4)(np.zeros((2, 6, 3), np.float32))
    # regression: a 1-D input used to fail with a bare IndexError from x.shape[1]
    with pytest.raises(ValueError, match=r"GroupNorm expects 4 features on axis 1 .*got shape \(4,\)"):
        GroupNorm(2, 4)(np.zeros(4, np.float32))


def test_group_norm_rejects_indivisible_channels_at_construction():
    with pytest.raises(ValueError, match="6 channels are not divisible into 4 groups"):
        GroupNorm(4, 6)


def test_layer_norm_rejects_wrong_trailing_shape_and_dtype():
    with pytest.raises(ValueError, match=r"LayerNorm\(8,\) got an input of shape \(2, 7\)"):
        LayerNorm(8)(np.zeros((2, 7), np.float32))
    with pytest.raises(TypeError, match="LayerNorm has float32 parameters but got a float64 input"):
        LayerNorm(8)(np.zeros((2, 8)))


def test_attention_rejects_wrong_context_shape_and_mask_shape():
    attn = Attention(6, context_dim=5, heads=2, dim_head=3)
    x = np.zeros((2, 3, 6), np.float32)
    with pytest.raises(ValueError, match=r"Attention expects context of shape \(B=2, Lc, 5\), got \(2, 4, 4\)"):
        attn(x, np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"Attention expects context of shape \(B=2, Lc, 5\), got \(3, 4, 5\)"):
        attn(x, np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"Attention mask must have shape \(2, 4\), got \(2, 3\)"):
        attn(x, np.zeros((2, 4, 5), np.float32), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"Attention expects a 3-D input"):
        attn(np.zeros((3, 6), np.float32))


def test_embedding_rejects_float_and_out_of_range_ids():
    emb = Embedding(10, 4)
    with pytest.raises(TypeError, match="Embedding expects integer ids, got dtype float32"):
        emb(np.zeros(3, np.float32))
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 10\), got range \[0, 10\]"):
        emb(np.array([0, 10]))
    with pytest.raises(IndexError, match=r"got range \[-1, 3\]"):
        emb(np.array([-1, 3]))


def test_layer_constructors_reject_bad_options():
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        GELU("fast")
    with pytest.raises(ValueError, match=r"Dropout probability must be in \[0, 1\), got 1.0"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="scale_factor=2, mode='nearest' only"):
        Upsample(scale_factor=3)


class FakeCupyArray:
    """Looks like a CuPy array to tinydiff.backend.backend_of (its class lives in a 'cupy' module)."""

    __module__ = "cupy._core.core"

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)


def test_layer_rejects_an_array_from_another_backend():
    with pytest.raises(BackendError, match="arrays from two backends"):
        Linear(5, 3)(FakeCupyArray((2, 5), np.float32))


def test_module_placed_on_another_backend_rejects_a_numpy_input():
    """The other direction: a NumPy input reaching a layer whose parameters live on CuPy. Each
    layer checks against one of its own parameter arrays, read at call time (Attention: to_q's)."""
    lin = Linear(5, 3)
    lin.weight.data = FakeCupyArray((3, 5), np.float32)
    with pytest.raises(BackendError, match="arrays from two backends"):
        lin(np.zeros((2, 5), np.float32))
    attn = Attention(6, heads=2, dim_head=3)
    attn.to_q.weight.data = FakeCupyArray((6, 6), np.float32)
    with pytest.raises(BackendError, match="arrays from two backends"):
        attn(np.zeros((2, 3, 6), np.float32))


@pytest.mark.parametrize("make, shape", [
    (lambda: Linear(5, 3), (2, 5)),
    (lambda: Conv2d(2, 3, 3, padding=1), (1, 2, 4, 4)),
    (lambda: GroupNorm(2, 4), (1, 4, 3)),
    (lambda: LayerNorm(4), (2, 4)),
    (lambda: Attention(6, heads=2, dim_head=3), (1, 3, 6)),
], ids=["Linear", "Conv2d", "GroupNorm", "LayerNorm", "Attention"])
def test_input_dtype_check_follows_astype(make, shape):
    """The dtype a layer expects is its parameters' dtype now, not the one it was built with."""
    layer = make().double()
    with pytest.raises(TypeError, match=f"{type(layer).__name__} has float64 parameters but got a float32 input"):
        layer(np.zeros(shape, np.float32))
    assert layer(np.zeros(shape)).dtype == np.float64
    layer.float()
    assert layer(np.zeros(shape, np.float32)).dtype == np.float32


def test_named_modules_names_every_module_by_the_path_its_parameters_have():
    """Module.named_modules: "" for the root, dotted names below it, each module once; every
    parameter's name is the name of the module that holds it plus the parameter's own name."""
    from tinydiff.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(in_channels=1, out_channels=1, sample_size=8, block_channels=(8, 16),
                           attention_levels=(False, True), context_dim=8, context_length=3, heads=2, dim_head=4,
                           groups=4, time_embed_dim=16))
    named = list(unet.named_modules())
    assert named[0] == ("", unet)
    assert [m for _, m in named] == list(unet.modules())
    names = dict(named)
    for name, param in unet.named_parameters():
        owner, _, attr = name.rpartition(".")
        assert getattr(names[owner], attr) is param
    assert [n for n, _ in unet.named_modules("unet")][:2] == ["unet", f"unet.{next(iter(unet.named_children()))[0]}"]
