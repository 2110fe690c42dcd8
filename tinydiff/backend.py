"""The array-module abstraction: the only place that imports numpy or cupy for compute.

Model code never names an array library. It asks for one:

    xp = get_xp(x)          # numpy or cupy, whichever owns ``x``
    y = xp.maximum(x, 0)

and converts only at the boundaries (``to_numpy`` for saving and plotting, ``to_device`` for
inputs). The pattern is CuPy's ``get_array_module``; SciPy calls the same idea an array namespace.

Default backend: ``TINYDIFF_BACKEND=numpy|cupy`` in the environment, or ``set_backend(name)``.
Dtype policy: float32 for training and sampling; float64 for gradient checks and references.
Randomness: every random draw that decides *what* is computed (initial noise, dropout masks,
parameter initialisation) comes from a NumPy ``Generator`` on the CPU and is then moved to the
device, so the same seed gives the same numbers on either backend.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import scipy.special
import threadpoolctl

BACKENDS = ("numpy", "cupy")
DEFAULT_DTYPE = np.float32  # training and sampling
CHECK_DTYPE = np.float64  # gradient checks and closed-form references

GPU_INSTALL_HINT = (
    'install the GPU extra: pip install "tinydiff[gpu]" (CuPy for CUDA 12; for CUDA 13 '
    "install cupy-cuda13x instead)"
)


class BackendError(RuntimeError):
    """A backend was asked for that cannot be used, or arrays of two backends were mixed."""


def _import_cupy(context: str = "backend 'cupy' requested but ") -> ModuleType:
    """Import CuPy and check that a GPU is visible; raise BackendError naming the fix if not.

    ``context`` starts each message (e.g. "backend 'cupy' requested but CuPy is not installed").
    """
    try:
        import cupy
    except ImportError as err:
        raise BackendError(f"{context}CuPy is not installed; {GPU_INSTALL_HINT}") from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver missing or broken: CuPy raises its own runtime errors
        raise BackendError(f"{context}no usable CUDA GPU was found ({err})") from err
    if count == 0:
        raise BackendError(f"{context}no CUDA GPU is visible")
    return cupy


def cupy_status() -> str:
    """One line saying whether CuPy and a GPU are usable here (for ``tinydiff info``): "not
    usable: CuPy is not installed; …" or "CuPy 13.3.0, GPU 0: NVIDIA H100 …"."""
    try:
        cupy = _import_cupy(context="")
    except BackendError as err:
        return f"not usable: {err}"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"CuPy {cupy.__version__}, GPU 0: {name}"


def _module_for(name: str) -> ModuleType:
    if name == "numpy":
        return np
    if name == "cupy":
        return _import_cupy()
    raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")


def _backend_from_env() -> str:
    name = os.environ.get("TINYDIFF_BACKEND", "numpy").strip().lower() or "numpy"
    if name not in BACKENDS:
        raise BackendError(f"TINYDIFF_BACKEND={name!r} is not a backend; valid backends: {', '.join(BACKENDS)}")
    return name


# None: not chosen yet, read TINYDIFF_BACKEND on first use (not at import, so that a bad value is
# one line from the CLI instead of a traceback while importing)
_default_name: str | None = None


def set_backend(name: str) -> None:
    """Choose the default backend for new arrays ('numpy' or 'cupy'); checks it is usable."""
    global _default_name
    name = name.strip().lower()
    _module_for(name)  # raises a clear error if unknown or unusable
    _default_name = name


def get_backend() -> str:
    """Name of the default backend."""
    global _default_name
    if _default_name is None:
        _default_name = _backend_from_env()
    return _default_name


def default_xp() -> ModuleType:
    """The array module of the default backend."""
    return _module_for(get_backend())


def backend_of(x) -> str:
    """'cupy' for a CuPy array, else 'numpy' (NumPy arrays, Python scalars)."""
    return "cupy" if type(x).__module__.startswith("cupy") else "numpy"


def get_xp(*arrays) -> ModuleType:
    """The array module owning ``arrays`` (None entries are ignored); default backend if none.

    Mixing NumPy and CuPy arrays is an error: it would silently copy across the bus, or fail deep
    inside an operation with an unhelpful message.
    """
    on_cpu = on_gpu = False  # Python and NumPy scalars count as neither: they mix with both
    for a in arrays:
        if isinstance(a, np.ndarray):
            on_cpu = True
        elif type(a).__module__.startswith("cupy"):
            on_gpu = True
    if on_cpu and on_gpu:
        raise BackendError(
            "arrays from two backends (numpy and cupy) were mixed; move them to one device first "
            "with tinydiff.backend.to_device(x, backend) or module.to(backend)"
        )
    if on_cpu:
        return np
    return _module_for("cupy") if on_gpu else default_xp()


def to_numpy(x) -> np.ndarray:
    """A NumPy copy (or view) of ``x`` on the CPU."""
    if backend_of(x) == "cupy":
        return x.get()
    return np.asarray(x)


def to_device(x, backend: str | None = None, dtype=None):
    """``x`` as an array of ``backend`` (default: the default backend), optionally cast."""
    xp = _module_for(backend or get_backend())
    if xp is np:
        out = to_numpy(x)
    else:
        out = xp.asarray(x)
    return out if dtype is None else out.astype(dtype, copy=False)


def erf(x):
    """The error function on either backend (scipy.special / cupyx.scipy.special)."""
    if backend_of(x) == "cupy":
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    return scipy.special.erf(x)


def add_at(target, indices, values) -> None:
    """Unbuffered ``target[indices] += values`` (repeated indices accumulate), in place."""
    if backend_of(target) == "cupy":
        import cupyx

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def rng(seed: int | None = None) -> np.random.Generator:
    """A NumPy Generator on the CPU: the one source of randomness for both backends."""
    return np.random.default_rng(seed)


def randn(generator: np.random.Generator, shape, *, dtype=DEFAULT_DTYPE, backend: str | None = None):
    """Standard normal draws made on the CPU by ``generator`` and moved to ``backend``."""
    return to_device(generator.standard_normal(shape).astype(dtype), backend)


def uniform(generator: np.random.Generator, shape, low=0.0, high=1.0, *, dtype=DEFAULT_DTYPE, backend=None):
    """Uniform draws made on the CPU by ``generator`` and moved to ``backend``."""
    return to_device(generator.uniform(low, high, shape).astype(dtype), backend)


def blas_info(*, threads: bool = True) -> str:
    """Which BLAS NumPy uses, and (with ``threads``) the thread count it is set to at this moment:
    its default outside ``blas_threads``, not what tinydiff's own work uses (see below)."""
    config = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
    try:
        blas = config["Build Dependencies"]["blas"]
        text = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (KeyError, TypeError):
        text = "unknown"
    pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    if pools:
        count = f", {pools[0].get('num_threads')} threads" if threads else ""
        text += f" ({pools[0].get('internal_api')}{count})"
    return text


def blas_default_threads() -> int | None:
    """The thread count NumPy's BLAS is set to at this moment (None if threadpoolctl finds none)."""
    pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    return pools[0].get("num_threads") if pools else None


# --------------------------------------------------------------------------- CPU threads
#
# tinydiff's matrices are small (a 3×3 conv at 8×8 is a GEMM of 32 × 288 × a few thousand), too
# small for a multi-threaded BLAS to split well: on two cores OpenBLAS's second thread costs more
# in hand-offs than it computes, and a training step runs faster with one BLAS thread than with
# two (benchmarks/README.md). A batch splits perfectly instead: each CPU thread runs the whole
# network on its own block of rows with single-threaded BLAS. NumPy releases Python's GIL inside
# BLAS calls and array loops, so the threads overlap: enough for sampling (map_rows). A training
# step makes many more small calls, each dispatched under the GIL, and splits its rows over
# processes instead (train/parallel.py).

_blas_pools = None  # threadpoolctl's handle on the BLAS libraries loaded in this process
_row_pools: dict[int, ThreadPoolExecutor] = {}  # one pool per thread count, made on first use


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def blas_threads(n: int):
    """Within the block NumPy's BLAS (and any other loaded BLAS) uses ``n`` threads."""
    global _blas_pools
    if _blas_pools is None:
        _blas_pools = threadpoolctl.ThreadpoolController()  # finds the libraries once (about 1 ms)
    with _blas_pools.limit(limits=n, user_api="blas"):
        yield


def row_blocks(rows: int, threads: int) -> list[slice]:
    """``threads`` near-equal, consecutive blocks of ``rows`` rows (fewer if rows < threads)."""
    bounds = np.linspace(0, rows, min(threads, rows) + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def run_in_threads(tasks: list):
    """Call each of ``tasks`` (functions of no argument) on its own CPU thread, with BLAS single-
    threaded meanwhile; returns their results in order."""
    if len(tasks) == 1:
        return [tasks[0]()]
    pool = _row_pools.get(len(tasks)) or _row_pools.setdefault(
        len(tasks), ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="tinydiff-rows"))
    with blas_threads(1):
        return list(pool.map(lambda task: task(), tasks))


def map_rows(fn, *arrays, threads: int | None = None):
    """``fn(*arrays)`` for arrays that share their first (batch) axis, computed on ``threads``
    blocks of rows at once (default: one per core) and concatenated along axis 0.

    Only for a ``fn`` whose rows are independent and that keeps no state between calls (a network
    in ``no_grad`` mode). On CuPy, with one thread or with fewer rows than threads, it is simply
    ``fn(*arrays)``.
    """
    threads = cpu_count() if threads is None else threads
    rows = arrays[0].shape[0]
    if threads <= 1 or rows < threads or backend_of(arrays[0]) != "numpy":
        return fn(*arrays)
    blocks = row_blocks(rows, threads)
    outputs = run_in_threads([lambda rows=rows: fn(*(a[rows] for a in arrays)) for rows in blocks])
    return np.concatenate(outputs)



def map_row_pairs(fn, *arrays, threads: int | None = None):
    """``map_rows`` for arrays of 2B rows in two halves that belong to the same B images,
    ``[first half; second half]`` (classifier-free guidance runs every image twice in one call):
    each thread gets the same images from both halves, ``[a[block]; a[B + block]]``, instead of one
    half each, so that a network can share the work the two halves have in common
    (``UNet._guidance_halves``). The result equals ``fn(*arrays)`` row for row, in the same order.
    """
    threads = cpu_count() if threads is None else threads
    rows = arrays[0].shape[0]
    half = rows // 2
    if threads <= 1 or rows % 2 or half < threads or backend_of(arrays[0]) != "numpy":
        return map_rows(fn, *arrays, threads=threads)
    picks = [np.r_[block, block.start + half : block.stop + half] for block in row_blocks(half, threads)]
    outputs = run_in_threads([lambda pick=pick: fn(*(a[pick] for a in arrays)) for pick in picks])
    out = np.empty((rows,) + outputs[0].shape[1:], dtype=outputs[0].dtype)
    for pick, output in zip(picks, outputs):
        out[pick] = output  # back to [first half; second half]
    return out

# --------------------------------------------------------------------------- freed memory
#
# A training step allocates its activations, caches and gradients afresh (tens of MB for the
# latent U-Net at batch 64) and frees them after the backward pass. glibc's malloc hands large
# freed blocks back to the operating system: blocks above its mmap threshold are unmapped, and
# free memory at the top of its heap above the trim threshold is released. The next step then
# writes fresh pages, and each 4 kB page costs a page fault and the kernel's zeroing of it:
# 15,000-18,000 faults and about 35 ms of kernel time in a 150-170 ms training step on the
# project's 2-core machines (benchmarks/README.md). ``keep_freed_memory`` raises both thresholds,
# so freed blocks stay in the process and the next step reuses them: the numbers computed are the
# same, the process keeps its peak memory until it exits. Done once at import on Linux (glibc);
# elsewhere, or with TINYDIFF_KEEP_FREED_MEMORY=0 in the environment, malloc is left as it is.

MMAP_THRESHOLD = 32 << 20  # bytes; glibc's largest allowed value: a block above it is still mapped afresh
TRIM_THRESHOLD = 512 << 20  # bytes of free memory at the heap's top that malloc keeps instead of releasing
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (``mallopt``: mmap threshold 32 MB, trim
    threshold 512 MB) instead of returning it to the OS after every step. True if both settings
    were taken; False where there is no glibc (macOS, Windows, musl), changing nothing."""
    import ctypes

    try:  # glibc names itself here ("glibc 2.36"); elsewhere this fails or says something else
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # libc's symbols, through the running program
    except (ValueError, OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1  # mallopt returns 1 on success
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return mmap_set and trim_set


def _keep_freed_memory_from_env() -> bool:
    """``keep_freed_memory()`` unless TINYDIFF_KEEP_FREED_MEMORY is 0 (or false, no)."""
    if os.environ.get("TINYDIFF_KEEP_FREED_MEMORY", "").strip().lower() in ("0", "false", "no"):
        return False
    return keep_freed_memory()


FREED_MEMORY_KEPT = _keep_freed_memory_from_env()  # whether malloc keeps freed memory in this process


# --------------------------------------------------------------------------- reference or fast code
#
# Some operations exist twice: a reference written to be read (e.g. nn/conv.py: im2col over the
# whole batch, one matrix product, col2im) and a fast version with the same results (nn/fast_conv.py:
# chunks that stay in cache, shifted copies, Winograd). Layers run the fast one unless the
# reference is asked for, with ``TINYDIFF_REFERENCE=1`` in the environment or ``use_reference()``.
# An operation joins the switch by choosing its implementation per call with
# ``fast_or_reference(fast, reference)`` and keeping the choice with its cache, so that backward
# runs the same implementation as the forward pass it follows.

def _reference_from_env() -> bool:
    value = os.environ.get("TINYDIFF_REFERENCE", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise BackendError(f"TINYDIFF_REFERENCE={value!r} is not understood; use 1 (reference code) or 0 (fast code)")


_reference: bool | None = None  # None: not chosen yet, read TINYDIFF_REFERENCE on first use


class use_reference:
    """Run the reference implementations (``True``) or the fast ones (``False``).

    A plain call switches for the rest of the process; ``with use_reference():`` switches for the
    block only and then restores the previous choice::

        use_reference(True)            # from now on
        with use_reference():          # inside the block only
            out = conv(x)
    """

    def __init__(self, enabled: bool = True):
        global _reference
        self._previous, _reference = reference_enabled(), bool(enabled)

    def __enter__(self) -> "use_reference":
        return self

    def __exit__(self, *exc) -> None:
        global _reference
        _reference = self._previous


def reference_enabled() -> bool:
    """Whether layers run the reference implementations (see ``use_reference``). The environment
    is read on first use, so that a bad value is reported where the CLI reports errors."""
    global _reference
    if _reference is None:
        _reference = _reference_from_env()
    return _reference


def fast_or_reference(fast, reference):
    """``reference`` while ``use_reference`` is on, else ``fast`` (any objects: functions, modules)."""
    return reference if reference_enabled() else fast
