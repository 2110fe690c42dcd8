"""2-D convolution by im2col + one matrix product, and nearest-neighbour 2× upsampling.

This is the reference implementation, written to be read (the cs231n "layers" file); the layer
classes run a faster one with the same results, ``fast_conv.py`` (the "fast layers" file), unless
``tinydiff.backend.use_reference()`` asks for this one.

Symbols: x input (N, C, H, W), W weight (O, C, kh, kw), b bias (O,), stride s, padding p,
output (N, O, Ho, Wo) with Ho = ⌊(H + 2p − kh)/s⌋ + 1 (the same for Wo), x_pad the input with p
zeros on every side, dout = ∂L/∂out.

**Forward.** A convolution layer (a cross-correlation, as in PyTorch) computes

    out[n, o, y, x] = b[o] + Σ_{c,i,j} W[o, c, i, j] · x_pad[n, c, y·s + i, x·s + j]       (1)

im2col copies every patch that (1) reads into one column of a matrix,

    cols[(c, i, j), (n, y, x)] = x_pad[n, c, y·s + i, x·s + j]           (C·kh·kw, N·Ho·Wo)   (2)

so that (1) becomes a single matrix product with the weight seen as (O, C·kh·kw):

    out[o, (n, y, x)] = b[o] + Σ_(c,i,j) W[o, (c, i, j)] · cols[(c, i, j), (n, y, x)]        (3)

**Backward.** (3) is a matrix product, so its gradients are the usual ones (as for a linear layer):

    dW = dout · colsᵀ,      db[o] = Σ_{n,y,x} dout[n, o, y, x],      dcols = Wᵀ · dout     (4)

with dout seen as (O, N·Ho·Wo). Each entry of cols is a copy of one input pixel (2), so the input
gradient is col2im, the adjoint of im2col: every entry of dcols is added back to the pixel it was
copied from (a pixel appears in up to kh·kw columns and sums their gradients; entries that came
from the zero padding are dropped):

    dx[n, c, y·s + i − p, x·s + j − p] += dcols[(c, i, j), (n, y, x)]                      (5)

Both copies loop over the kh·kw kernel offsets (9 for a 3×3 kernel), each moving a whole
(C, N, Ho, Wo) block at once, never over single pixels.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """⌊(size + 2·padding − kernel) / stride⌋ + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_output_shape(x, w, stride: int, padding: int) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of x (N, C, H, W) with w (O, C, kh, kw); a clear error for a
    channel mismatch or a kernel larger than the padded input."""
    _, c, h, wd = x.shape
    _, c_w, kh, kw = w.shape
    if c != c_w:
        raise ValueError(f"conv2d: input has {c} channels but the weight expects {c_w}")
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: input {h}×{wd} is smaller than the {kh}×{kw} kernel with padding {padding}")
    return ho, wo


def im2col(x, kh: int, kw: int, stride: int, padding: int):
    """cols (C·kh·kw, N·Ho·Wo) of equation (2) from x (N, C, H, W)."""
    xp = get_xp(x)
    n, c, h, wd = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    p = padding
    x_pad = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))  # (N, C, H + 2p, W + 2p)
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # kernel offset (i, j) reads x_pad[n, c, y·s + i, x·s + j] for every output (y, x)
            window = x_pad[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]  # (N, C, Ho, Wo)
            cols[:, i, j] = window.transpose(1, 0, 2, 3)  # (N, C, Ho, Wo) → (C, N, Ho, Wo)
    return cols.reshape(c * kh * kw, n * ho * wo)  # (C, kh, kw, N, Ho, Wo) → (C·kh·kw, N·Ho·Wo)


def col2im(dcols, x_shape: tuple, kh: int, kw: int, stride: int, padding: int):
    """dx (N, C, H, W) of equation (5): the adjoint of ``im2col``, from dcols (C·kh·kw, N·Ho·Wo)."""
    xp = get_xp(dcols)
    n, c, h, wd = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    p = padding
    dcols6 = dcols.reshape(c, kh, kw, n, ho, wo)  # (C·kh·kw, N·Ho·Wo) → (C, kh, kw, N, Ho, Wo)
    dx_pad = xp.zeros((n, c, h + 2 * p, wd + 2 * p), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            # the pixels that offset (i, j) copied; within one offset no pixel is hit twice
            window = dx_pad[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]  # (N, C, Ho, Wo), a view
            window += dcols6[:, i, j].transpose(1, 0, 2, 3)  # (C, N, Ho, Wo) → (N, C, Ho, Wo)
    return dx_pad[:, :, p : p + h, p : p + wd]  # the gradient that reached the padding is dropped


class Conv2dCache(NamedTuple):
    x_shape: tuple  # (N, C, H, W)
    cols: object  # (C·kh·kw, N·Ho·Wo), equation (2)
    w: object  # (O, C, kh, kw)
    stride: int
    padding: int
    has_bias: bool


def conv2d_forward(x, w, b=None, stride: int = 1, padding: int = 0):
    """Equation (1) as im2col (2) and one matrix product (3).

    Shapes: x (N, C, H, W), w (O, C, kh, kw), b (O,) or None → out (N, O, Ho, Wo).
    """
    n = x.shape[0]
    o, c, kh, kw = w.shape
    ho, wo = conv_output_shape(x, w, stride, padding)
    cols = im2col(x, kh, kw, stride, padding)  # (C·kh·kw, N·Ho·Wo)
    out = w.reshape(o, c * kh * kw) @ cols  # (O, C·kh·kw) @ (C·kh·kw, N·Ho·Wo) → (O, N·Ho·Wo)
    out = get_xp(out).ascontiguousarray(out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))  # (O, N, Ho, Wo) → (N, O, Ho, Wo)
    if b is not None:
        out += b.reshape(1, o, 1, 1)
    return out, Conv2dCache(x.shape, cols, w, stride, padding, b is not None)


def conv2d_backward(dout, cache: Conv2dCache):
    """Equations (4) and (5). Returns (dx (N, C, H, W), dw (O, C, kh, kw), db (O,) or None)."""
    x_shape, cols, w, stride, padding, has_bias = cache
    o, c, kh, kw = w.shape
    d_mat = dout.transpose(1, 0, 2, 3).reshape(o, -1)  # (N, O, Ho, Wo) → (O, N, Ho, Wo) → (O, N·Ho·Wo)
    dw = (d_mat @ cols.T).reshape(w.shape)  # (O, C·kh·kw) → (O, C, kh, kw)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    dcols = w.reshape(o, c * kh * kw).T @ d_mat  # (C·kh·kw, O) @ (O, N·Ho·Wo) → (C·kh·kw, N·Ho·Wo)
    dx = col2im(dcols, x_shape, kh, kw, stride, padding)
    return dx, dw, db


def upsample_nearest2x_forward(x):
    """Each pixel becomes a 2×2 block.  Shapes: (N, C, H, W) → (N, C, 2H, 2W).

    Each row, then each column, repeated twice: two copies that run along contiguous memory,
    2–4× faster than one copy out of a broadcast 6-D view."""
    return x.repeat(2, axis=2).repeat(2, axis=3), x.shape


def upsample_nearest2x_backward(dout, x_shape):
    """Each input pixel fed four outputs, so its gradient is the sum of that 2×2 block: the two
    columns of each block, then its two rows, added as strided slices (NumPy's sum over the two
    size-2 axes of a (N, C, H, 2, W, 2) view is 10–18× slower, a reduction per pair)."""
    cols = dout[:, :, :, 0::2] + dout[:, :, :, 1::2]  # (N, C, 2H, 2W) → (N, C, 2H, W)
    return cols[:, :, 0::2] + cols[:, :, 1::2]  # (N, C, 2H, W) → (N, C, H, W)
