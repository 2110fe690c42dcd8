"""2-D convolution, fast: im2col + GEMM a few images at a time (the cs231n "fast layers" file).

``conv.py`` is the reference: the same equations written plainly (im2col over the whole batch,
one matrix product, col2im). The functions here compute the same numbers (tests/test_fast_paths.py
compares them in float64) and are what the ``Conv2d`` layer runs unless
``tinydiff.backend.use_reference()`` is on. This docstring explains each trick.

Convolution as a matrix product, for a chunk of m images:

    cols[(c, i, j), (n, y, x)] = x_pad[n, c, y·s + i, x·s + j]       (C·kh·kw, m·Ho·Wo)
    out[o, (n, y, x)]          = Σ_(c,i,j) W[o, (c, i, j)] · cols     (one GEMM per chunk)

The loops below run over the kh·kw kernel offsets (9 for a 3×3 kernel) and over chunks of
images, never over pixels. Why this shape (measured on the project's 2-core CPUs; numbers in
benchmarks/README.md):

* **Channel-major columns.** cols is indexed (c, i, j) × (n, y, x), so the block of one kernel
  offset, ``cols6[:, i, j]`` of shape (C, m, Ho, Wo), is a plain copy of a window of x seen
  channel-first. The GEMM's output comes out channel-first too and is put back in
  (N, O, Ho, Wo) order once, with the bias added during that copy.
* **A few images at a time** (``CHUNK_BYTES`` of cols, at most 2 MiB: 14 images of 64 channels
  at 8×8, one image of 32 channels at 32×32). The copy that builds cols, the GEMM that reads it
  and the GEMM's output stay in the CPU's caches, and the skinny GEMMs run close to the
  square-matrix rate. One cols for the whole batch (75 MB for 64 images of 32×32×32) would go
  to memory and back, and NumPy's temporaries over ~32 MB are fresh mmap'd pages that fault on
  every call.
* **"Same" convolutions copy long runs.** A window of an 8×8 image is 8 floats wide, so copying
  it runs in 8-float pieces. For stride 1 with output size = input size (every 3×3, padding 1
  convolution of the U-Net, and its transposed-convolution backward), ``_fill_by_shifts`` copies
  each offset's block as the flattened image shifted by one number, in runs of about H·W floats,
  and zeroes the columns that wrapped across a row edge: im2col 2–2.5× faster at 8×8 and 4×4.
* **1×1 convolutions skip im2col.** With stride 1 and no padding they are one matrix product per
  image, W (O, C) · x[n] (C, H·W), which a batched matmul does in the (N, C, H, W) layout itself
  (``_pointwise``): about 2× faster than transposing to channel-major and back.
* **No padded copy of x.** The cols buffer is zeroed once and reused for every chunk, and for
  every later call with the same geometry (one workspace per thread, ``_cols_workspace``);
  entries that fall in the zero padding are simply never written. Reusing it matters: a fresh
  2 MiB buffer is fresh pages from the OS, and the page faults of writing them cost about as
  much as the copy itself.
* **Winograd for 3×3 "same" convolutions of even-sized images** (the latent U-Net's 3×3
  convolutions at 8×8 and 4×4 but its 4-channel input and output: forward, input gradient and
  weight gradient): ``_winograd_3x3``
  computes each 2×2 block of outputs from a 4×4 tile of input with 16 multiplications instead of
  36 (Lavin & Gray 2016, F(2×2, 3×3)), so its matrix products do 4/9 of im2col's. Its transforms
  are a few additions over whole arrays; the docstring of ``_winograd_3x3`` derives them, and
  ``_winograd_weight_grad`` runs the same algorithm backwards (its adjoint) for dW. Those
  transforms are about 30 NumPy calls whatever the size, so a small batch (fewer than
  ``WINOGRAD_MIN_ROWS`` tiles in all, e.g. under 8 images of 8×8) runs im2col instead. They also
  move about 7 numbers per input and per output number through memory, whatever the channels,
  while the product they shrink costs C·O multiply-adds per pixel: with few channels on large
  images (the VAE decoder's 16 channels at 32×32) the transforms dominate and im2col, whose
  chunks stay in cache, is 1.5-3× faster. So Winograd runs only where C·O ≥
  ``WINOGRAD_MIN_PRODUCT_PER_PIXEL`` · H·W.
* **The cache keeps x, not cols.** Backward rebuilds each chunk's cols (a cheap in-cache copy)
  rather than holding 9× the activations' memory until the backward pass; inference
  (``no_grad``) keeps nothing but references. Winograd's transformed input V is kept, while
  gradients are wanted, for dW (4× the input's memory: 35 MB for the latent U-Net at batch 64;
  a training step 2-5 % faster than recomputing it).
* **Backward.** dW = Σ_chunks dout·colsᵀ, computed as (cols·doutᵀ)ᵀ (the faster BLAS layout),
  or by Winograd where the forward pass used it (no cols at all).
  The input gradient of a stride-1 convolution is itself a correlation: dx = dout ⋆ W', W' the
  kernel rotated by 180° with its in/out channels swapped, padding kh−1−p (the "transposed
  convolution"), so it runs the same im2col + GEMM as the forward pass. A strided convolution,
  or one with few input channels (see ``_dx_by_transposed_conv``), uses col2im instead:
  dcols = Wᵀ·dout, and each offset's slice is added back to the pixels it came from.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import NamedTuple

from ..backend import backend_of, get_xp
from .conv import conv_output_shape, conv_output_size
from .module import is_grad_enabled

CHUNK_BYTES = 2 << 20  # one chunk's cols, about an L2 cache. 0.5-2 MiB ran alike on one thread; the
#                        largest means the fewest GEMM calls (each one a sync point for multi-threaded BLAS)
GPU_CHUNK_BYTES = 1 << 30  # on a GPU, caches don't help and every chunk is more kernel launches: one chunk


WINOGRAD_MIN_ROWS = 128  # tiles (N·H/2·W/2, the rows of Winograd's 16 products) below which im2col runs:
#                           on the U-Net's layers Winograd's fixed cost (its transforms' NumPy calls) made a
#                           3×3 conv 40-90 % slower than im2col at 2-4 images of 8×8 or 2-8 of 4×4, and it
#                           was 13-30 % faster from 16 images of 8×8 or 32 of 4×4; at 128 tiles it depends
#                           on the channels (benchmarks/README.md)
WINOGRAD_MIN_PRODUCT_PER_PIXEL = 16  # Winograd needs C·O ≥ 16·H·W, else im2col runs. Measured at 16 and 64 images
#                           (Winograd's time / im2col's, C = O): 4×4: C = 8 1.4, 16 0.9, 32 0.7; 8×8: C = 16 1.1,
#                           32 0.99, 64 0.8; 16×16: C = 32 1.2-1.5, 64 1.0-1.1, 128 0.86; 32×32: C = 64 1.6, 128 1.1
WORKSPACE_BYTES = 64 << 20  # per thread: cols buffers kept for reuse (least recently used dropped first)
_workspaces = threading.local()  # each thread its own buffers (backend.map_rows runs convs in parallel)


def _chunk_bytes(x) -> int:
    return GPU_CHUNK_BYTES if backend_of(x) == "cupy" else CHUNK_BYTES


def _cols_workspace(xp, shape: tuple, dtype, geometry: tuple):
    """A zero-initialised cols buffer of ``shape``, the same one for every call with the same
    shape and ``geometry`` (input size, stride, padding) on this thread. im2col writes the same
    entries on every such call, so the entries it never writes (padding) stay zero.
    On CuPy a new buffer every time (its memory pool already recycles device memory)."""
    if xp.__name__ != "numpy":
        return xp.zeros(shape, dtype=dtype)
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = OrderedDict()
    key = (shape, xp.dtype(dtype).str, geometry)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    buffer = cache[key] = xp.zeros(shape, dtype=dtype)
    while sum(b.nbytes for b in cache.values()) > WORKSPACE_BYTES and len(cache) > 1:
        cache.popitem(last=False)
    return buffer


class FastConv2dCache(NamedTuple):
    x: object  # (N, C, H, W), the input itself (not a copy): backward rebuilds cols from it
    w: object  # (O, C, kh, kw)
    stride: int
    padding: int
    has_bias: bool
    v: object = None  # Winograd's transformed input V (4, 4, H/2, W/2, N, C) when the forward pass ran it


def _valid_range(offset: int, size: int, out_size: int, stride: int, padding: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose input index y·stride + offset − padding lies in [0, size);
    for the other outputs this kernel offset sees the zero padding."""
    lo = max(0, -((offset - padding) // stride))  # ⌈(padding − offset) / stride⌉, at least 0
    hi = min(out_size, (size - 1 + padding - offset) // stride + 1)
    return lo, max(lo, hi)


def _offset_slices(kh, kw, h, wd, ho, wo, stride, pad_h, pad_w):
    """For each kernel offset (i, j): (i, j, output window, input window) of the positions where
    x_pad[y·s + i, x·s + j] is a real pixel (offsets that see only padding are skipped)."""
    for i in range(kh):
        y0, y1 = _valid_range(i, h, ho, stride, pad_h)
        for j in range(kw):
            x0, x1 = _valid_range(j, wd, wo, stride, pad_w)
            if y1 > y0 and x1 > x0:
                r0, c0 = y0 * stride + i - pad_h, x0 * stride + j - pad_w  # first input row, column
                in_rows = slice(r0, r0 + (y1 - y0 - 1) * stride + 1, stride)
                in_cols = slice(c0, c0 + (x1 - x0 - 1) * stride + 1, stride)
                yield i, j, (slice(y0, y1), slice(x0, x1)), (in_rows, in_cols)


def _fill_by_shifts(cols6, x, pad_h: int, pad_w: int) -> None:
    """im2col for a stride-1 convolution whose output is the input's size ("same" padding),
    copying runs of about H·W floats instead of Wo: cols6 (C, kh, kw, m, H, W), x (m, C, H, W).

    Flatten each image, pixel (y, x) at p = y·W + x. Kernel offset (i, j) reads the pixel
    (y + dy, x + dx) with dy = i − pad_h, dx = j − pad_w, which is flat position p + s with
    s = dy·W + dx; so its block of cols is the flattened image shifted by s, one copy per offset.
    Where y + dy leaves the image, p + s leaves [0, H·W) and is not copied: those entries keep the
    workspace's zeros. Where x + dx leaves the image, p + s wraps into the row above or below, so
    those columns are zeroed after the copy.
    """
    c, kh, kw, m, h, wd = cols6.shape
    hw = h * wd
    xt = x.reshape(m, c, hw).transpose(1, 0, 2)  # (m, C, H, W) → (m, C, H·W) → (C, m, H·W), a view
    for i in range(kh):
        for j in range(kw):
            dy, dx = i - pad_h, j - pad_w
            s = dy * wd + dx
            if abs(s) >= hw:  # the offset sees only padding
                continue
            block = cols6[:, i, j].reshape(c, m, hw)  # (C, m, H, W) → (C, m, H·W), a view
            if s >= 0:
                block[:, :, : hw - s] = xt[:, :, s:]
            else:
                block[:, :, -s:] = xt[:, :, : hw + s]
            if dx < 0:
                cols6[:, i, j, :, :, :-dx] = 0
            elif dx > 0:
                cols6[:, i, j, :, :, wd - dx :] = 0


def _im2col_chunks(x, kh: int, kw: int, stride: int, pad_h: int, pad_w: int):
    """Yield (start, cols) for consecutive chunks of the images of x (N, C, H, W): cols
    (C·kh·kw, m·Ho·Wo) holds the patches of images start … start+m−1 in the layout above.

    One buffer serves every chunk (use each cols before asking for the next); it starts as
    zeros, and only entries that see a real pixel are ever written.
    """
    xp = get_xp(x)
    n, c, h, wd = x.shape
    ho, wo = conv_output_size(h, kh, stride, pad_h), conv_output_size(wd, kw, stride, pad_w)
    per_image = c * kh * kw * ho * wo * x.itemsize
    chunk = max(1, min(n, _chunk_bytes(x) // per_image))
    same_size = stride == 1 and (ho, wo) == (h, wd)  # then _fill_by_shifts copies long runs
    slices = [] if same_size else list(_offset_slices(kh, kw, h, wd, ho, wo, stride, pad_h, pad_w))
    cols6 = None
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if cols6 is None or cols6.shape[3] != m:  # the first chunk, or a shorter last one
            cols6 = _cols_workspace(xp, (c, kh, kw, m, ho, wo), x.dtype, (h, wd, stride, pad_h, pad_w))
        if same_size:
            _fill_by_shifts(cols6, x[start : start + m], pad_h, pad_w)
        else:
            xt = x[start : start + m].transpose(1, 0, 2, 3)  # (m, C, H, W) → (C, m, H, W), a view
            for i, j, (ys, xs), (in_rows, in_cols) in slices:
                cols6[:, i, j, :, ys, xs] = xt[:, :, in_rows, in_cols]
        yield start, cols6.reshape(c * kh * kw, m * ho * wo)


# --------------------------------------------------------------------------- Winograd F(2×2, 3×3)

_W_B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # Bᵀ (4, 4): input transform
_W_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # G (4, 3): kernel transform
_W_A_T = ((1, 1, 1, 0), (0, 1, -1, -1))  # Aᵀ (2, 4): output transform
_W_A_SIGNS = (1, 1, 1, -1)  # the sign of row ξ of A (each row of A is ± a sum of dY's rows)


def _winograd_applies(x, out_channels: int, kh: int, kw: int, stride: int, pad_h: int, pad_w: int) -> bool:
    """3×3, stride 1, padding 1 (output size = input size), even height and width, at least
    ``WINOGRAD_MIN_ROWS`` tiles in the batch, enough channels for the image's size (C·O ≥
    ``WINOGRAD_MIN_PRODUCT_PER_PIXEL`` · H·W), on NumPy (on a GPU the im2col product is one large
    kernel launch already)."""
    n, c, h, wd = x.shape
    return ((kh, kw, stride, pad_h, pad_w) == (3, 3, 1, 1, 1) and h % 2 == 0 and wd % 2 == 0
            and n * (h // 2) * (wd // 2) >= WINOGRAD_MIN_ROWS
            and c * out_channels >= WINOGRAD_MIN_PRODUCT_PER_PIXEL * h * wd and backend_of(x) == "numpy")


def _scratch(xp, dtype, *shapes):
    """Views of one flat buffer per thread and dtype, one view of each shape (not zeroed). The
    buffer only grows, so after the first call of the largest layer no call allocates: fresh pages
    from the OS would cost page faults on every call."""
    sizes = [int(math.prod(shape)) for shape in shapes]
    arenas = getattr(_workspaces, "scratch", None)
    if arenas is None:
        arenas = _workspaces.scratch = {}
    key = xp.dtype(dtype).str
    if key not in arenas or arenas[key].size < sum(sizes):
        arenas[key] = xp.empty(sum(sizes), dtype=dtype)
    views, start = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(arenas[key][start : start + size].reshape(shape))
        start += size
    return views


def _winograd_kron(xp, dtype):
    """G ⊗ G (16, 9): vec(G g Gᵀ) = (G ⊗ G) vec(g) for a 3×3 kernel g, both vectors row-major."""
    g = xp.asarray(_W_G, dtype=dtype)
    return (g[:, None, :, None] * g[None, :, None, :]).reshape(16, 9)


def _winograd_input_transform(x, xpad, t, v) -> None:
    """V = Bᵀ d B for every 4×4 input tile d of x (N, C, H, W) zero-padded by 1, written into v
    (4, 4, H/2, W/2, N, C); xpad (H+2, W+2, N, C) and t (4, H/2, W+2, N, C) are scratch.
    Bᵀ · d and · B are applied as rows then columns, each as the four sums and differences that
    Bᵀ's rows spell out (d0 − d2, d1 + d2, d2 − d1, d1 − d3)."""
    xp = get_xp(x)
    th, tw = x.shape[2] // 2, x.shape[3] // 2
    xpad[0], xpad[-1], xpad[:, 0], xpad[:, -1] = 0, 0, 0, 0  # the zero padding
    xpad[1:-1, 1:-1] = x.transpose(2, 3, 0, 1)  # (N, C, H, W) → (H, W, N, C)
    # rows: d_k = row 2·ty + k of every tile ty, (th, W+2, N, C) each
    d = [xpad[k : k + 2 * th : 2] for k in range(4)]
    xp.subtract(d[0], d[2], out=t[0])
    xp.add(d[1], d[2], out=t[1])
    xp.subtract(d[2], d[1], out=t[2])
    xp.subtract(d[1], d[3], out=t[3])
    # columns: e_k = column 2·tx + k of every tile tx, (4, th, tw, N, C) each
    e = [t[:, :, k : k + 2 * tw : 2] for k in range(4)]
    xp.subtract(e[0], e[2], out=v[:, 0])
    xp.add(e[1], e[2], out=v[:, 1])
    xp.subtract(e[2], e[1], out=v[:, 2])
    xp.subtract(e[1], e[3], out=v[:, 3])


def _winograd_3x3(x, w, b, v=None):
    """3×3 convolution with padding 1 of x (N, C, H, W), H and W even, by Winograd's minimal
    filtering algorithm F(2×2, 3×3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
    Networks", section 4). w (O, C, 3, 3), b (O,) or None → out (N, O, H, W). ``v``: an array
    (4, 4, H/2, W/2, N, C) to hold the transformed input V (kept for the weight gradient), else
    V goes to scratch memory.

    **One dimension first, F(2, 3):** two outputs of a 3-tap correlation of d = (d0 … d3) with
    g = (g0, g1, g2), y0 = d0 g0 + d1 g1 + d2 g2 and y1 = d1 g0 + d2 g1 + d3 g2, cost 6
    multiplications directly but 4 this way:

        m1 = (d0 − d2) g0,   m2 = (d1 + d2)(g0 + g1 + g2)/2,
        m3 = (d2 − d1)(g0 − g1 + g2)/2,   m4 = (d1 − d3) g2,
        y0 = m1 + m2 + m3,   y1 = m2 − m3 − m4,

    in matrices y = Aᵀ[(G g) ⊙ (Bᵀ d)] with Bᵀ, G and Aᵀ the constants above (expand m2 + m3 and
    m2 − m3 to check). **Nested for two dimensions, F(2×2, 3×3):** a 2×2 block of outputs from the
    4×4 tile d of input that it reads, and the 3×3 kernel g,

        Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A          (16 multiplications instead of 4·9 = 36)

    **A convolution layer** sums over input channels c; the sum commutes with Aᵀ · A, so with
    U[o, c] = G g[o, c] Gᵀ and V[c, tile] = Bᵀ d[c, tile] B (both 4×4, indexed by (ξ, ν)):

        M[ξ, ν][o, tile] = Σ_c U[ξ, ν][o, c] · V[ξ, ν][c, tile],   Y[o, tile] = Aᵀ M[o, tile] A

    i.e. 16 independent matrix products, one per (ξ, ν), each (N·tiles, C) · (C, O): the GEMM
    FLOPs are 16/36 = 4/9 of im2col's. Tiles start every 2 pixels of the zero-padded input, so
    the (H/2)·(W/2) tiles of an image overlap by 2 rows and columns.

    **Layout.** Everything runs with (N, C) (or (N, O)) as the last, contiguous axes: the padded
    input is (H+2, W+2, N, C), so every transform step is one NumPy operation over whole arrays
    whose inner runs are N·C numbers long, and V is already the stack of 16 (tiles·N, C) matrices.
    Bᵀ · d and · B are applied as rows then columns (``_winograd_input_transform``), on strided
    views that pick the 4 rows (columns) of every tile at once. The output transform does the
    same with Aᵀ's two rows.
    In float32 the results differ from im2col's by rounding only (relative 1e-6; tested).
    """
    xp = get_xp(x, w)
    n, c, h, wd = x.shape
    o = w.shape[0]
    th, tw = h // 2, wd // 2  # tiles per column and per row
    rows = th * tw * n  # rows of each of the 16 matrix products, ordered (tile y, tile x, image)
    kron = _winograd_kron(xp, x.dtype)
    u_t = (w.reshape(o * c, 9) @ kron.T).T.reshape(16, o, c).transpose(0, 2, 1)  # (O·C, 16) → (16, O, C) → Uᵀ (16, C, O)
    xpad, t, v_scratch, m, s, y = _scratch(
        xp, x.dtype, (h + 2, wd + 2, n, c), (4, th, wd + 2, n, c), (4, 4, th, tw, n, c) if v is None else (0,),
        (16, rows, o), (2, 4, th, tw, n, o), (2, 2, th, tw, n, o))
    v = v_scratch if v is None else v
    _winograd_input_transform(x, xpad, t, v)
    xp.matmul(v.reshape(16, rows, c), u_t, out=m)  # M[ξ, ν] = V[ξ, ν] Uᵀ[ξ, ν]: (16, rows, C) @ (16, C, O)
    m = m.reshape(4, 4, th, tw, n, o)
    # Y = Aᵀ M A. Rows (Aᵀ: m0 + m1 + m2 and m1 − m2 − m3), then columns
    xp.add(m[0], m[1], out=s[0])
    s[0] += m[2]
    xp.subtract(m[1], m[2], out=s[1])
    s[1] -= m[3]
    if b is not None:  # column 1 enters both outputs of every row with weight +1: the bias goes there
        s[:, 1] += b
    # columns; the last addition writes straight into the output's (N, O, H, W) layout, through
    # a strided view, so the transpose back from (…, N, O) costs no pass of its own
    out = xp.empty((n, o, th, 2, tw, 2), dtype=x.dtype)  # pixel (2·ty + a, 2·tx + b)
    y_out = out.transpose(3, 5, 2, 4, 0, 1)  # (N, O, th, 2, tw, 2) → (2, 2, th, tw, N, O), a view
    xp.add(s[:, 0], s[:, 2], out=y[:, 0])
    xp.add(y[:, 0], s[:, 1], out=y_out[:, 0])  # s0 + s1 + s2
    xp.subtract(s[:, 1], s[:, 3], out=y[:, 1])
    xp.subtract(y[:, 1], s[:, 2], out=y_out[:, 1])  # s1 − s2 − s3
    return out.reshape(n, o, h, wd)


def _winograd_weight_grad(x, dout, v=None):
    """dW of a 3×3 convolution with padding 1 (x (N, C, H, W), H and W even, dout (N, O, H, W))
    as the adjoint of ``_winograd_3x3`` with respect to the kernel: 4/9 of im2col's GEMM FLOPs
    again, and no im2col at all. Returns dw (O, C, 3, 3).

    The forward pass is Y = Aᵀ M A, M[ξ, ν] = V[ξ, ν] Uᵀ[ξ, ν] (rows: tiles), U = G g Gᵀ. Each
    step is linear, so its adjoint is its transpose, applied in reverse order:

        dM = A dY Aᵀ                       (per tile and output channel: 2×2 → 4×4)
        dU[ξ, ν] = Vᵀ[ξ, ν] dM[ξ, ν]        (Σ over tiles: 16 products (C, rows) · (rows, O))
        dg = Gᵀ dU G                       (per (o, c): 4×4 → 3×3)

    A (4, 2) has rows (1, 0), (1, 1), (1, −1), (0, −1): row ξ of A dY is dy0, dy0 + dy1,
    dy0 − dy1 or −dy1 (dy0, dy1 the tile's two rows), and the same over columns. The two minus
    signs of row 3 are left out of dM, so that rows 0 and 3 are dY's own rows (the transpose
    writes them, no copy), and put back as a sign s_ξ s_ν on each dU[ξ, ν] (s = (1, 1, 1, −1)).
    V = Bᵀ d B is the forward pass's (``v``, kept in the cache while gradients are wanted: 4× the
    input's memory until backward, for a training step about 5 % faster), or recomputed from x.
    """
    xp = get_xp(x, dout)
    n, c, h, wd = x.shape
    o = dout.shape[1]
    th, tw = h // 2, wd // 2
    rows = th * tw * n
    if v is None:
        xpad, t, v, dm = _scratch(xp, x.dtype, (h + 2, wd + 2, n, c), (4, th, wd + 2, n, c), (4, 4, th, tw, n, c),
                                  (4, 4, th, tw, n, o))
        _winograd_input_transform(x, xpad, t, v)
    else:
        (dm,) = _scratch(xp, x.dtype, (4, 4, th, tw, n, o))
    # dM without row 3's signs. Rows and columns 0 and 3 are dY's: (N, O, H, W) → (2, 2, th, tw, N, O)
    dm[0::3, 0::3] = dout.reshape(n, o, th, 2, tw, 2).transpose(3, 5, 2, 4, 0, 1)
    xp.add(dm[0, 0::3], dm[3, 0::3], out=dm[1, 0::3])  # rows 1, 2: dy0 ± dy1
    xp.subtract(dm[0, 0::3], dm[3, 0::3], out=dm[2, 0::3])
    xp.add(dm[:, 0], dm[:, 3], out=dm[:, 1])  # columns 1, 2 of every row
    xp.subtract(dm[:, 0], dm[:, 3], out=dm[:, 2])
    du = xp.matmul(v.reshape(16, rows, c).transpose(0, 2, 1), dm.reshape(16, rows, o))  # dU[ξ, ν] up to sign: (16, C, rows) @ (16, rows, O) → (16, C, O)
    sign = xp.asarray(_W_A_SIGNS, dtype=x.dtype)
    kron_t = (_winograd_kron(xp, x.dtype) * (sign[:, None] * sign[None, :]).reshape(16, 1)).T  # (G ⊗ G)ᵀ with s_ξ s_ν: (9, 16)
    dw = kron_t @ du.reshape(16, c * o)  # dg = Gᵀ dU G, as (G ⊗ G)ᵀ vec(dU): (9, 16) @ (16, C·O)
    return xp.ascontiguousarray(dw.reshape(3, 3, c, o).transpose(3, 2, 0, 1))  # (3, 3, C, O) → (O, C, 3, 3)


def _correlate(x, w, b, stride: int, pad_h: int, pad_w: int):
    """out[n, o, y, x] = b[o] + Σ_{c,i,j} w[o, c, i, j] · x_pad[n, c, y·s + i, x·s + j], chunk by
    chunk.  x (N, C, H, W), w (O, C, kh, kw), b (O,) or None → out (N, O, Ho, Wo)."""
    xp = get_xp(x, w)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if _winograd_applies(x, o, kh, kw, stride, pad_h, pad_w):
        return _winograd_3x3(x, w, b)
    ho, wo = conv_output_size(h, kh, stride, pad_h), conv_output_size(wd, kw, stride, pad_w)
    w_mat = w.reshape(o, c * kh * kw)  # (O, C·kh·kw)
    out = xp.empty((n, o, ho, wo), dtype=x.dtype)
    for start, cols in _im2col_chunks(x, kh, kw, stride, pad_h, pad_w):
        m = cols.shape[1] // (ho * wo)
        chunk_out = (w_mat @ cols).reshape(o, m, ho, wo).transpose(1, 0, 2, 3)  # (O, m·Ho·Wo) → (m, O, Ho, Wo)
        if b is None:
            out[start : start + m] = chunk_out
        else:  # the bias is added while copying into place
            xp.add(chunk_out, b.reshape(1, o, 1, 1), out=out[start : start + m])
    return out


def conv2d_forward(x, w, b=None, stride: int = 1, padding: int = 0):
    """Cross-correlation, as PyTorch's Conv2d.

    Shapes: x (N, C, H, W), w (O, C, kh, kw), b (O,) or None → out (N, O, Ho, Wo) with
    Ho = ⌊(H + 2p − kh)/s⌋ + 1 (same for Wo).
    out[n, o, y, x] = b[o] + Σ_{c,i,j} W[o, c, i, j] · x_pad[n, c, y·s + i, x·s + j]
    """
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    conv_output_shape(x, w, stride, padding)  # checks the channels and the kernel's size
    if _pointwise(kh, kw, stride, padding):
        out = get_xp(x, w).matmul(w.reshape(o, c), x.reshape(n, c, h * wd))  # (O, C) @ (N, C, H·W) → (N, O, H·W)
        if b is not None:
            out += b.reshape(1, o, 1)
        out = out.reshape(n, o, h, wd)
    elif is_grad_enabled() and _winograd_applies(x, o, kh, kw, stride, padding, padding):
        v = get_xp(x).empty((4, 4, h // 2, wd // 2, n, c), dtype=x.dtype)  # V, kept for dW
        return _winograd_3x3(x, w, b, v), FastConv2dCache(x, w, stride, padding, b is not None, v)
    else:
        out = _correlate(x, w, b, stride, padding, padding)
    return out, FastConv2dCache(x, w, stride, padding, b is not None)


def _pointwise(kh: int, kw: int, stride: int, padding: int) -> bool:
    """A 1×1 convolution with stride 1 and no padding is a matrix product per image,
    out[n] = W · x[n] with x[n] seen as (C, H·W): no im2col, and no transposes, since the batched
    product reads and writes the (N, C, H, W) layout as it is."""
    return kh == kw == 1 and stride == 1 and padding == 0


def _dx_by_transposed_conv(c: int, o: int, kh: int, kw: int, stride: int, padding: int) -> bool:
    """Whether dx is computed as the correlation dout ⋆ W' (else by col2im).

    Only for stride 1 and padding ≤ kernel − 1 (so that padding kh−1−p is not negative), and a
    kernel larger than 1×1 (for 1×1, col2im is a plain copy). Cost per pixel: the correlation
    copies O·kh·kw numbers (im2col of dout); col2im writes C·kh·kw and adds them back
    (a read-modify-write, about two copies). So: O < 2C.
    """
    return stride == 1 and kh * kw > 1 and padding < min(kh, kw) and o < 2 * c


def _col2im(dcols, m: int, c: int, h: int, wd: int, kh: int, kw: int, stride: int, padding: int):
    """The adjoint of im2col: each entry of dcols (C·kh·kw, m·Ho·Wo) is added back to the input
    pixel it was copied from (entries that came from the zero padding are dropped).
    Returns dx (m, C, H, W) as a view."""
    xp = get_xp(dcols)
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    dcols6 = dcols.reshape(c, kh, kw, m, ho, wo)  # (C·kh·kw, m·Ho·Wo) → (C, kh, kw, m, Ho, Wo)
    dxt = xp.zeros((c, m, h, wd), dtype=dcols.dtype)  # dx, channel-major like cols
    for i, j, (ys, xs), (in_rows, in_cols) in _offset_slices(kh, kw, h, wd, ho, wo, stride, padding, padding):
        dxt[:, :, in_rows, in_cols] += dcols6[:, i, j, :, ys, xs]  # one offset never hits a pixel twice
    return dxt.transpose(1, 0, 2, 3)  # (C, m, H, W) → (m, C, H, W)


def conv2d_backward(dout, cache: FastConv2dCache):
    """dW = dout·colsᵀ,  db = Σ_{n,y,x} dout,  and dx, either as the correlation of dout with the
    rotated, channel-swapped kernel (stride 1):

        dx[n, c, y, x] = Σ_{o,i,j} W[o, c, kh−1−i, kw−1−j] · dout_pad[n, o, y + i, x + j],
        dout_pad = dout padded by kh−1−p (kw−1−p),

    or by col2im (scatter-add) of dcols = Wᵀ·dout.

    Returns (dx (N, C, H, W), dw (O, C, kh, kw), db (O,) or None).
    """
    x, w, stride, padding, has_bias, _ = cache
    xp = get_xp(dout, w)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = dout.shape[2], dout.shape[3]
    # db: Σ over n, then over (y, x); several times faster than one sum over axes (0, 2, 3)
    db = dout.sum(axis=0).reshape(o, ho * wo).sum(axis=1) if has_bias else None  # (O, Ho, Wo) → (O, Ho·Wo) → (O,)
    if _pointwise(kh, kw, stride, padding):
        d3, x3 = dout.reshape(n, o, h * wd), x.reshape(n, c, h * wd)  # (N, ·, H, W) → (N, ·, H·W)
        dx = xp.matmul(w.reshape(o, c).T, d3).reshape(x.shape)  # dx[n] = Wᵀ · dout[n]
        dw = xp.tensordot(d3, x3, axes=([0, 2], [0, 2])).reshape(w.shape)  # Σ_n dout[n] · x[n]ᵀ
        return dx, dw, db
    w_mat = w.reshape(o, c * kh * kw)  # (O, C·kh·kw)
    transposed = _dx_by_transposed_conv(c, o, kh, kw, stride, padding)
    winograd = _winograd_applies(x, o, kh, kw, stride, padding, padding)
    if winograd and transposed:  # no cols needed: dW by Winograd, dx by the transposed conv below
        dw = _winograd_weight_grad(x, dout, cache.v)
    else:
        dw_t = xp.zeros((c * kh * kw, o), dtype=dout.dtype)  # dWᵀ, summed over the chunks
        dx = None if transposed else xp.empty(x.shape, dtype=dout.dtype)
        for start, cols in _im2col_chunks(x, kh, kw, stride, padding, padding):
            m = cols.shape[1] // (ho * wo)
            d_mat = dout[start : start + m].transpose(1, 0, 2, 3).reshape(o, -1)  # (m, O, Ho, Wo) → (O, m·Ho·Wo)
            dw_t += cols @ d_mat.T  # (C·kh·kw, O) = (dout·colsᵀ)ᵀ
            if not transposed:
                dx[start : start + m] = _col2im(w_mat.T @ d_mat, m, c, h, wd, kh, kw, stride, padding)
        dw = xp.ascontiguousarray(dw_t.T).reshape(w.shape)  # (O, C·kh·kw) → (O, C, kh, kw)
    if transposed:
        w_rot = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]  # (O, C, kh, kw) → (C, O, kh, kw), rotated 180°
        dx = _correlate(dout, w_rot, None, 1, kh - 1 - padding, kw - 1 - padding)
    return dx, dw, db
