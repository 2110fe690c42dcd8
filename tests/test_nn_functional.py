"""The functional forward/backward pairs: finite-difference gradient checks and naive-loop references.

Every pair is checked in float64 with tinydiff.nn.gradcheck (relative error < 1e-6; a correct
backward gives ~1e-9). Conv2d, attention and group norm are also compared with references written
here as plain loops over pixels, heads and groups, derived independently from the definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinydiff.backend import fast_or_reference, rng, to_device, to_numpy, use_reference
from tinydiff.nn import conv, fast_conv
from tinydiff.nn import functional as F
from tinydiff.nn.gradcheck import gradcheck

TOL = 1e-6


def randn(shape, backend, seed=0, scale=1.0):
    """float64 normal draws made on the CPU and moved to ``backend``."""
    return to_device(scale * np.random.default_rng(seed).standard_normal(shape), backend)


def check_pair(forward, backward, tensors: dict, num_samples: int = 16):
    """Gradient-check a pair: ``forward(**tensors) -> (out, cache)``, ``backward(dout, cache)`` returns
    the gradients in the order of ``tensors`` (extra trailing entries, e.g. None biases, ignored)."""
    names = list(tensors)
    seen = {}

    def fwd():
        return forward(**tensors)[0]

    def bwd(dout):
        _, cache = forward(**tensors)
        grads = backward(dout, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        seen.update(zip(names, grads))
        return dict(zip(names, grads))

    # gradcheck draws its upstream gradient from rng(seed); a seed unlike the inputs' keeps it
    # from being proportional to an input (which can make a true gradient vanish, e.g. group norm)
    errors = gradcheck(fwd, bwd, tensors, num_samples=num_samples, seed=2024)
    assert max(errors.values()) < TOL, errors
    for name, grad in seen.items():  # a vanishing gradient would make the relative error meaningless
        assert float(abs(grad).max()) > 1e-6, f"gradient of {name} is zero: the check proves nothing"
    return errors


# --------------------------------------------------------------------------- linear and embedding


def test_linear_gradcheck_with_bias_on_3d_input(backends):
    tensors = dict(x=randn((2, 3, 5), backends, 0), w=randn((4, 5), backends, 1), b=randn((4,), backends, 2))
    check_pair(lambda x, w, b: F.linear_forward(x, w, b), F.linear_backward, tensors)


def test_linear_gradcheck_without_bias_and_returns_none_db(backends):
    tensors = dict(x=randn((2, 3, 5), backends, 0), w=randn((4, 5), backends, 1))
    check_pair(lambda x, w: F.linear_forward(x, w), F.linear_backward, tensors)
    out, cache = F.linear_forward(tensors["x"], tensors["w"])
    assert F.linear_backward(out, cache)[2] is None


def test_embedding_gradcheck_with_repeated_ids(backends):
    ids = to_device(np.array([[1, 3, 1], [0, 1, 3]]), backends)
    tensors = dict(weight=randn((5, 4), backends))
    check_pair(lambda weight: F.embedding_forward(ids, weight), F.embedding_backward, tensors, num_samples=20)


def test_embedding_backward_sums_rows_of_repeated_ids(backends):
    ids = to_device(np.array([2, 0, 2, 2]), backends)
    dout = randn((4, 3), backends, 5)
    _, cache = F.embedding_forward(ids, randn((4, 3), backends))
    dweight = to_numpy(F.embedding_backward(dout, cache))
    d = to_numpy(dout)
    np.testing.assert_allclose(dweight[2], d[0] + d[2] + d[3])
    np.testing.assert_allclose(dweight[0], d[1])
    assert not dweight[1].any() and not dweight[3].any()  # unused rows get no gradient


# --------------------------------------------------------------------------- convolution


CONV_CASES = [  # (kernel, stride, padding)
    (1, 1, 0),
    (1, 1, 1),
    (1, 2, 0),
    (3, 1, 0),
    (3, 1, 1),
    (3, 2, 0),
    (3, 2, 1),
]


@pytest.fixture(params=["fast", "reference"])
def conv_path(request):
    """Runs the test with ``use_reference`` off ("fast") or on ("reference") and gives the module
    whose conv2d_forward/backward pair the Conv2d layer then runs (fast_conv or conv)."""
    with use_reference(request.param == "reference"):
        pair = fast_or_reference(fast_conv, conv)
        assert pair is (conv if request.param == "reference" else fast_conv)
        yield pair


@pytest.mark.parametrize("kernel,stride,padding", CONV_CASES)
def test_conv2d_gradcheck(backends, conv_path, kernel, stride, padding):
    tensors = dict(
        x=randn((2, 3, 7, 6), backends, 0),  # non-square input
        w=randn((4, 3, kernel, kernel), backends, 1),
        b=randn((4,), backends, 2),
    )
    check_pair(lambda x, w, b: conv_path.conv2d_forward(x, w, b, stride, padding), conv_path.conv2d_backward, tensors)


def test_conv2d_gradcheck_of_even_same_size_inputs(backends, conv_path):
    """3×3 'same' convolutions of even-sized images (the U-Net's 8×8 and 4×4), whose fast forward
    and input gradient take the Winograd path, and 2×2 images (smaller than the kernel)."""
    for size in [(4, 6), (2, 2)]:
        tensors = dict(x=randn((2, 3) + size, backends, 0), w=randn((4, 3, 3, 3), backends, 1), b=randn((4,), backends, 2))
        check_pair(lambda x, w, b: conv_path.conv2d_forward(x, w, b, 1, 1), conv_path.conv2d_backward, tensors)


def test_conv2d_without_bias_gradcheck_and_none_db(backends, conv_path):
    tensors = dict(x=randn((2, 2, 5, 4), backends, 0), w=randn((3, 2, 3, 3), backends, 1))
    check_pair(lambda x, w: conv_path.conv2d_forward(x, w, None, 1, 1), conv_path.conv2d_backward, tensors)
    out, cache = conv_path.conv2d_forward(tensors["x"], tensors["w"], None, 1, 1)
    assert conv_path.conv2d_backward(out, cache)[2] is None


def naive_conv2d(x, w, b, stride, padding):
    """out[n, o, y, x] = b[o] + Σ_{c,i,j} w[o, c, i, j] · x_pad[n, c, y·s + i, x·s + j], one pixel at a time."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for b_ in range(n):
        for oc in range(o):
            for y in range(ho):
                for x_ in range(wo):
                    patch = xp[b_, :, y * stride : y * stride + kh, x_ * stride : x_ * stride + kw]
                    out[b_, oc, y, x_] = (w[oc] * patch).sum() + b[oc]
    return out


def naive_conv2d_backward(dout, x, w, stride, padding):
    """Each output pixel received w·patch + b, so it sends dout·w back to its patch, dout·patch to w
    and dout to b."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dxp, dw, db = np.zeros_like(xp), np.zeros_like(w), np.zeros(o)
    for b_ in range(n):
        for oc in range(o):
            for y in range(dout.shape[2]):
                for x_ in range(dout.shape[3]):
                    g = dout[b_, oc, y, x_]
                    ys, xs = y * stride, x_ * stride
                    dxp[b_, :, ys : ys + kh, xs : xs + kw] += g * w[oc]
                    dw[oc] += g * xp[b_, :, ys : ys + kh, xs : xs + kw]
                    db[oc] += g
    return dxp[:, :, padding : padding + h, padding : padding + wd], dw, db


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 1, 1, (7, 6)), (3, 2, 1, (7, 6)), (1, 1, 0, (7, 6)), (1, 2, 0, (7, 6)), (3, 2, 0, (7, 6)),
    (3, 1, 1, (8, 6)),  # even 'same': the fast path's Winograd forward and input gradient
])
def test_conv2d_matches_naive_loops_forward_and_all_three_gradients(backends, conv_path, kernel, stride, padding, size):
    g = np.random.default_rng(3)
    x, w, b = g.standard_normal((2, 3) + size), g.standard_normal((4, 3, kernel, kernel)), g.standard_normal(4)
    out, cache = conv_path.conv2d_forward(*(to_device(a, backends) for a in (x, w, b)), stride, padding)
    ref = naive_conv2d(x, w, b, stride, padding)
    np.testing.assert_allclose(to_numpy(out), ref, rtol=1e-12, atol=1e-12)
    dout = g.standard_normal(ref.shape)
    dx, dw, db = conv_path.conv2d_backward(to_device(dout, backends), cache)
    for got, want in zip((dx, dw, db), naive_conv2d_backward(dout, x, w, stride, padding)):
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,size", [(3, (7, 6)), (5, (7, 6)), (3, (1, 1)), (3, (2, 3)), (5, (2, 3)), (5, (1, 4))])
def test_same_size_conv2d_by_flat_shifts_matches_naive_loops(kernel, size):
    """Stride 1 with padding (k − 1)/2 builds cols by shifting flattened images (fast_conv's
    _fill_by_shifts): offsets whose shift wraps across a row edge, leaves the image, or sees only
    padding (kernels wider than the image) must all read zeros there. The sizes are odd or the
    kernels 5×5, so that the Winograd path does not take these convolutions."""
    g = np.random.default_rng(4)
    padding = (kernel - 1) // 2
    x, w, b = g.standard_normal((3, 2) + size), g.standard_normal((4, 2, kernel, kernel)), g.standard_normal(4)
    for _ in range(2):  # the second call reuses the first one's workspace
        out, cache = fast_conv.conv2d_forward(x, w, b, 1, padding)
        np.testing.assert_allclose(out, naive_conv2d(x, w, b, 1, padding), rtol=1e-12, atol=1e-12)
    dout = g.standard_normal(out.shape)
    for got, want in zip(fast_conv.conv2d_backward(dout, cache), naive_conv2d_backward(dout, x, w, 1, padding)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv_output_size_formula():
    assert F.conv_output_size(7, 3, 2, 1) == 4  # ⌊(7 + 2 − 3)/2⌋ + 1
    assert F.conv_output_size(32, 3, 1, 1) == 32  # "same" padding


def test_conv2d_rejects_kernel_larger_than_input(conv_path):
    with pytest.raises(ValueError, match="smaller than the 3×3 kernel"):
        conv_path.conv2d_forward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)))


def test_conv2d_rejects_channel_mismatch(conv_path):
    with pytest.raises(ValueError, match="input has 2 channels but the weight expects 3"):
        conv_path.conv2d_forward(np.zeros((1, 2, 4, 4)), np.zeros((1, 3, 3, 3)))


# --------------------------------------------------------------------------- upsampling


def test_upsample_nearest2x_gradcheck(backends):
    check_pair(lambda x: F.upsample_nearest2x_forward(x), F.upsample_nearest2x_backward,
               dict(x=randn((2, 3, 3, 4), backends)))


def test_upsample_nearest2x_copies_each_pixel_to_a_2x2_block(backends):
    x = to_device(np.arange(6.0).reshape(1, 1, 2, 3), backends)
    out = to_numpy(F.upsample_nearest2x_forward(x)[0])
    np.testing.assert_array_equal(out[0, 0], np.repeat(np.repeat(to_numpy(x)[0, 0], 2, axis=0), 2, axis=1))


def test_upsample_nearest2x_backward_sums_each_2x2_block_as_a_loop_does():
    dout = np.random.default_rng(5).standard_normal((2, 3, 6, 8))  # non-square: H = 3, W = 4
    dx = F.upsample_nearest2x_backward(dout, (2, 3, 3, 4))
    expected = np.zeros((2, 3, 3, 4))
    for y in range(3):
        for x in range(4):
            expected[:, :, y, x] = dout[:, :, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].sum(axis=(2, 3))
    np.testing.assert_allclose(dx, expected, rtol=1e-15, atol=0)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("shape,groups", [((2, 6, 3, 4), 3), ((2, 4, 5), 2), ((3, 4, 2, 2), 1), ((2, 4, 3, 3), 4)])
def test_group_norm_gradcheck(backends, shape, groups):
    c = shape[1]
    tensors = dict(x=randn(shape, backends, 0, scale=2.0), gamma=randn((c,), backends, 1), beta=randn((c,), backends, 2))
    check_pair(lambda x, gamma, beta: F.group_norm_forward(x, groups, gamma, beta), F.group_norm_backward, tensors)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="6 channels cannot be split into 4 groups"):
        F.group_norm_forward(np.zeros((1, 6, 2, 2)), 4, np.ones(6), np.zeros(6))


def naive_group_norm(x, groups, gamma, beta, eps=1e-5):
    """Normalise each (sample, group) block with its own mean and biased variance, then γ·x̂ + β per channel."""
    n, c = x.shape[:2]
    per = c // groups
    out = np.empty_like(x)
    for b in range(n):
        for g in range(groups):
            block = x[b, g * per : (g + 1) * per]
            mean = sum(block.ravel()) / block.size
            var = sum((v - mean) ** 2 for v in block.ravel()) / block.size
            for ch in range(g * per, (g + 1) * per):
                out[b, ch] = gamma[ch] * (x[b, ch] - mean) / math.sqrt(var + eps) + beta[ch]
    return out


def naive_group_norm_dx(dout, x, groups, gamma, eps=1e-5):
    """dx per block = Jᵀ (γ ⊙ dout) with the explicit Jacobian of x ↦ x̂:
    ∂x̂_i/∂x_j = (δ_ij − 1/m − x̂_i x̂_j / m) / σ, built as an m×m matrix."""
    n, c = x.shape[:2]
    per = c // groups
    dx = np.empty_like(x)
    for b in range(n):
        for g in range(groups):
            sl = slice(g * per, (g + 1) * per)
            block = x[b, sl].ravel()
            m = block.size
            sigma = math.sqrt(block.var() + eps)
            x_hat = (block - block.mean()) / sigma
            jac = (np.eye(m) - 1.0 / m - np.outer(x_hat, x_hat) / m) / sigma
            gin = (dout[b, sl] * gamma[sl].reshape((-1,) + (1,) * (x.ndim - 2))).ravel()
            dx[b, sl] = (jac.T @ gin).reshape(x[b, sl].shape)
    return dx


def test_group_norm_matches_naive_loops_forward_and_gradients(backends):
    g = np.random.default_rng(4)
    x, gamma, beta = 3.0 * g.standard_normal((2, 6, 3, 3)) + 1.0, g.standard_normal(6), g.standard_normal(6)
    x_d, gamma_d, beta_d = (to_device(a, backends) for a in (x, gamma, beta))
    out, cache = F.group_norm_forward(x_d, 3, gamma_d, beta_d)  # the group count stays a Python int
    np.testing.assert_allclose(to_numpy(out), naive_group_norm(x, 3, gamma, beta), rtol=1e-10, atol=1e-12)
    dout = g.standard_normal(x.shape)
    dx, dgamma, dbeta = (to_numpy(a) for a in F.group_norm_backward(to_device(dout, backends), cache))
    np.testing.assert_allclose(dx, naive_group_norm_dx(dout, x, 3, gamma), rtol=1e-10, atol=1e-12)
    x_hat = (naive_group_norm(x, 3, np.ones(6), np.zeros(6)))
    np.testing.assert_allclose(dgamma, [(dout[:, ch] * x_hat[:, ch]).sum() for ch in range(6)], rtol=1e-10)
    np.testing.assert_allclose(dbeta, [dout[:, ch].sum() for ch in range(6)], rtol=1e-10)


@pytest.mark.parametrize("shape,normalized", [((2, 3, 8), (8,)), ((2, 3, 4), (3, 4))])
def test_layer_norm_gradcheck(backends, shape, normalized):
    tensors = dict(x=randn(shape, backends, 0, scale=2.0), gamma=randn(normalized, backends, 1),
                   beta=randn(normalized, backends, 2))
    check_pair(lambda x, gamma, beta: F.layer_norm_forward(x, gamma, beta), F.layer_norm_backward, tensors)


def test_layer_norm_output_has_zero_mean_unit_variance_before_affine(backends):
    x = randn((4, 16), backends, 0, scale=5.0) + 3.0
    out = to_numpy(F.layer_norm_forward(x, to_device(np.ones(16), backends), to_device(np.zeros(16), backends))[0])
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=-1), 1.0, rtol=1e-5)  # ε = 1e-5 against a variance of ~25


# --------------------------------------------------------------------------- pointwise, softmax, dropout


def test_silu_gradcheck(backends):
    check_pair(lambda x: F.silu_forward(x), F.silu_backward, dict(x=randn((3, 7), backends, scale=3.0)))


def test_sigmoid_does_not_overflow_for_large_inputs(backends):
    with np.errstate(all="raise"):
        s = to_numpy(F.sigmoid(to_device(np.array([-1000.0, 0.0, 1000.0]), backends)))
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradcheck(backends, approximate):
    check_pair(lambda x: F.gelu_forward(x, approximate), F.gelu_backward, dict(x=randn((3, 7), backends, scale=2.0)))


def test_gelu_exact_is_x_times_normal_cdf(backends):
    xs = np.linspace(-4, 4, 17)
    out = to_numpy(F.gelu_forward(to_device(xs, backends), "none")[0])
    np.testing.assert_allclose(out, [x * 0.5 * (1 + math.erf(x / math.sqrt(2))) for x in xs], rtol=1e-12, atol=1e-15)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        F.gelu_forward(np.zeros(2), "fast")


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_gradcheck(backends, axis):
    check_pair(lambda x: F.softmax_forward(x, axis), F.softmax_backward, dict(x=randn((2, 5, 3), backends, scale=3.0)))


def test_softmax_is_stable_for_huge_logits(backends):
    p = to_numpy(F.softmax_forward(to_device(np.array([[1000.0, 1000.0, -1000.0]]), backends))[0])
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


def test_dropout_gradcheck_with_fixed_generator(backends):
    # a fresh generator with the same seed on every call gives the same mask each time
    check_pair(lambda x: F.dropout_forward(x, 0.4, rng(7)), F.dropout_backward, dict(x=randn((4, 6), backends)))


def test_dropout_mask_is_zero_or_inverse_keep_probability_and_seeded(backends):
    x = to_device(np.ones((200, 50)), backends)
    out = to_numpy(F.dropout_forward(x, 0.25, rng(1))[0])
    assert set(np.unique(out)) <= {0.0, 1.0 / 0.75}
    dropped = (out == 0).mean()
    assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / out.size)  # within 4 standard errors
    np.testing.assert_array_equal(out, to_numpy(F.dropout_forward(x, 0.25, rng(1))[0]))  # same seed, same mask
    np.testing.assert_array_equal(out, F.dropout_forward(np.ones((200, 50)), 0.25, rng(1))[0])  # and on the CPU


def test_dropout_is_identity_in_eval_and_at_p_zero(backends):
    x = randn((3, 4), backends)
    for out, cache in (F.dropout_forward(x, 0.5, rng(0), training=False), F.dropout_forward(x, 0.0, rng(0))):
        assert out is x and cache.mask is None
        assert F.dropout_backward(x, cache) is x


def test_dropout_rejects_p_of_one():
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        F.dropout_forward(np.ones(3), 1.0, rng(0))


# --------------------------------------------------------------------------- attention


def attention_inputs(backends, lq=3, lk=5, seed=0):
    g = np.random.default_rng(seed)
    return {name: to_device(g.standard_normal((2, 2, length, 4)), backends) for name, length in
            (("q", lq), ("k", lk), ("v", lk))}


def test_attention_gradcheck_without_mask(backends):
    check_pair(lambda q, k, v: F.attention_forward(q, k, v), F.attention_backward, attention_inputs(backends))


def test_attention_gradcheck_with_key_mask(backends):
    mask = to_device(np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)[:, None, None, :], backends)
    check_pair(lambda q, k, v: F.attention_forward(q, k, v, mask), F.attention_backward, attention_inputs(backends))


def test_attention_fully_masked_row_is_finite_and_has_no_query_or_key_gradient(backends):
    # sample 1 has every key masked: its output is the plain mean of V and must not depend on Q or K
    mask = to_device(np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)[:, None, None, :], backends)
    tensors = attention_inputs(backends)
    out, cache = F.attention_forward(tensors["q"], tensors["k"], tensors["v"], mask)
    out = to_numpy(out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], np.broadcast_to(to_numpy(tensors["v"])[1].mean(axis=1, keepdims=True),
                                                       out[1].shape), rtol=1e-12)
    dq, dk, dv = (to_numpy(a) for a in F.attention_backward(to_device(np.ones(out.shape), backends), cache))
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    assert not dq[1].any() and not dk[1].any()
    check_pair(lambda q, k, v: F.attention_forward(q, k, v, mask), F.attention_backward, tensors)


def naive_attention(q, k, v, mask=None):
    """For each sample, head and query: scores over the allowed keys, softmax, weighted sum of values.
    mask (B, Lk) bool or None. Returns out and the probabilities."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = np.zeros((b, h, lq, v.shape[-1]))
    probs = np.zeros((b, h, lq, lk))
    for bi in range(b):
        allowed = [j for j in range(lk) if mask is None or mask[bi, j]]
        fully_masked = not allowed
        if fully_masked:  # no key to attend to: tinydiff defines the output as the mean of V
            allowed = list(range(lk))
        for hi in range(h):
            for i in range(lq):
                scores = [0.0 if fully_masked else float(q[bi, hi, i] @ k[bi, hi, j]) / math.sqrt(d) for j in allowed]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, wgt in zip(allowed, weights):
                    probs[bi, hi, i, j] = wgt / total
                    out[bi, hi, i] += (wgt / total) * v[bi, hi, j]
    return out, probs


def naive_attention_backward(dout, q, k, v, probs, mask=None):
    """Per head, with the explicit softmax Jacobian diag(p) − p pᵀ for each query row."""
    b, h, lq, d = q.shape
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bi in range(b):
        fully_masked = mask is not None and not mask[bi].any()
        for hi in range(h):
            for i in range(lq):
                p = probs[bi, hi, i]
                dv[bi, hi] += np.outer(p, dout[bi, hi, i])
                if fully_masked:
                    continue  # constant scores: no gradient to q or k
                dp = v[bi, hi] @ dout[bi, hi, i]  # (Lk,)
                ds = (np.diag(p) - np.outer(p, p)) @ dp / math.sqrt(d)
                dq[bi, hi, i] += ds @ k[bi, hi]
                dk[bi, hi] += np.outer(ds, q[bi, hi, i])
    return dq, dk, dv


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_matches_per_head_softmax_loops(backends, use_mask):
    g = np.random.default_rng(5)
    q, k, v = g.standard_normal((2, 3, 4, 6)), g.standard_normal((2, 3, 5, 6)), g.standard_normal((2, 3, 5, 2))
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool) if use_mask else None
    dev_mask = None if mask is None else to_device(mask[:, None, None, :], backends)
    out, cache = F.attention_forward(*(to_device(a, backends) for a in (q, k, v)), dev_mask)
    ref_out, ref_p = naive_attention(q, k, v, mask)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(cache.p), ref_p, rtol=1e-10, atol=1e-12)
    dout = g.standard_normal(ref_out.shape)
    got = F.attention_backward(to_device(dout, backends), cache)
    for a, want in zip(got, naive_attention_backward(dout, q, k, v, ref_p, mask)):
        np.testing.assert_allclose(to_numpy(a), want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- broadcasting adjoint


def test_unbroadcast_is_the_adjoint_of_broadcasting(backends):
    # <broadcast(b), g> = <b, unbroadcast(g)> for every b, g: the defining property of an adjoint
    g = randn((4, 3, 5), backends, 0)
    for shape in [(3, 5), (1, 5), (3, 1), (4, 1, 5), (5,), ()]:
        b = randn(shape, backends, 1)
        lhs = float((to_device(np.broadcast_to(to_numpy(b), (4, 3, 5)), backends) * g).sum())
        rhs = float((b * F.unbroadcast(g, shape)).sum())
        assert F.unbroadcast(g, shape).shape == tuple(shape)
        assert math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)


# --------------------------------------------------------------------------- the checker itself


def test_gradcheck_catches_a_wrong_backward_and_restores_the_inputs():
    x = np.random.default_rng(1).standard_normal((3, 4))
    before = x.copy()
    errors = gradcheck(lambda: x**3, lambda dout: {"x": 2 * x**2 * dout}, {"x": x})  # true gradient is 3x²
    assert errors["x"] > 1e-2
    np.testing.assert_array_equal(x, before)


def test_gradcheck_refuses_float32():
    x = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda: x * 2, lambda dout: {"x": 2 * dout}, {"x": x})


def test_gradcheck_rejects_a_wrongly_shaped_gradient():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"analytic gradient for x has shape \(3, 2\), expected \(2, 3\)"):
        gradcheck(lambda: x * 2, lambda dout: {"x": (2 * dout).T}, {"x": x})


def test_gradcheck_rejects_a_non_contiguous_input():
    # regression: reshape(-1) of a transposed view is a copy, so the perturbations never reached
    # forward() and a correct backward was reported with relative error 1
    x = np.random.default_rng(1).standard_normal((3, 4)).T
    with pytest.raises(ValueError, match="x is not C-contiguous"):
        gradcheck(lambda: x * 2, lambda dout: {"x": 2 * dout}, {"x": x})


def test_conv2d_in_many_small_chunks_equals_one_chunk(monkeypatch):
    """fast_conv processes the batch a few images at a time; chunk boundaries must not change anything."""
    conv = fast_conv
    gen = np.random.default_rng(11)
    x = gen.standard_normal((5, 3, 7, 6))
    w = gen.standard_normal((4, 3, 3, 3))
    b = gen.standard_normal(4)
    for stride, padding in [(1, 1), (2, 1), (1, 0)]:
        out, cache = conv.conv2d_forward(x, w, b, stride, padding)
        dout = gen.standard_normal(out.shape)
        grads = conv.conv2d_backward(dout, cache)
        monkeypatch.setattr(conv, "CHUNK_BYTES", 1)  # one image per chunk, uneven last chunk irrelevant
        out_small, cache_small = conv.conv2d_forward(x, w, b, stride, padding)
        grads_small = conv.conv2d_backward(dout, cache_small)
        monkeypatch.undo()
        np.testing.assert_allclose(out_small, out, rtol=1e-12, atol=1e-12)
        for g_small, g in zip(grads_small, grads):
            np.testing.assert_allclose(g_small, g, rtol=1e-12, atol=1e-12)


def test_conv2d_workspace_reuse_across_geometries_with_the_same_cols_shape():
    """fast_conv reuses its cols buffer between calls; two convolutions whose cols have the same
    shape but whose padding falls in different places (3×3, padding 1 on 7×7 and padding 0 on
    9×9; odd sizes keep them off the Winograd path) must each see zeros exactly where their own
    padding is, whatever ran before."""
    gen = np.random.default_rng(12)
    w = gen.standard_normal((2, 3, 3, 3))
    x_pad1, x_pad0 = gen.standard_normal((2, 3, 7, 7)), gen.standard_normal((2, 3, 9, 9))
    for _ in range(2):  # alternate, so each call finds the other's writes if the buffers were shared
        for x, padding in [(x_pad1, 1), (x_pad0, 0), (x_pad1, 1)]:
            out, _ = fast_conv.conv2d_forward(x, w, None, 1, padding)  # no bias: the reference gets zeros
            np.testing.assert_allclose(out, naive_conv2d(x, w, np.zeros(2), 1, padding), rtol=1e-10, atol=1e-12)
