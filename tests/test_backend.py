"""The array backend: seeded randomness identical on every backend, device round trips, the special
functions it provides, and clear errors for unknown or unusable backends and for mixed arrays."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tinydiff import backend
from tinydiff.backend import BackendError, add_at, backend_of, erf, get_xp, randn, rng, to_device, to_numpy, uniform

CUPY_USABLE = not backend.cupy_status().startswith("not usable")
CUPY_IMPORTABLE = importlib.util.find_spec("cupy") is not None


def test_randn_same_seed_same_numbers_on_every_backend(backends):
    a = to_numpy(randn(rng(42), (3, 4), backend=backends))
    b = to_numpy(randn(rng(42), (3, 4), backend="numpy"))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == backend.DEFAULT_DTYPE
    assert not np.array_equal(a, to_numpy(randn(rng(43), (3, 4))))


def test_uniform_is_seeded_and_in_range(backends):
    u = to_numpy(uniform(rng(1), (1000,), -2.0, 3.0, backend=backends))
    np.testing.assert_array_equal(u, to_numpy(uniform(rng(1), (1000,), -2.0, 3.0)))
    assert u.min() >= -2.0 and u.max() < 3.0


def test_to_device_to_numpy_round_trip(backends):
    x = np.random.default_rng(0).standard_normal((2, 3))
    on = to_device(x, backends)
    assert backend_of(on) == backends
    back = to_numpy(on)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, x)
    assert to_device(x, backends, dtype=np.float32).dtype == np.float32


def test_get_xp_picks_the_owning_module_and_ignores_none_and_scalars(backends):
    x = to_device(np.ones(2), backends)
    assert get_xp(x, None, 3.0).__name__ == backends
    assert get_xp() is backend.default_xp()


def test_erf_matches_math_erf(backends):
    xs = np.linspace(-3.5, 3.5, 29)
    np.testing.assert_allclose(to_numpy(erf(to_device(xs, backends))), [math.erf(v) for v in xs], rtol=1e-14, atol=1e-15)


def test_add_at_accumulates_repeated_indices(backends):
    target = to_device(np.zeros((4, 2)), backends)
    idx = to_device(np.array([1, 3, 1, 1]), backends)
    values = to_device(np.arange(8.0).reshape(4, 2), backends)
    add_at(target, idx, values)
    expected = np.zeros((4, 2))
    for i, row in zip([1, 3, 1, 1], np.arange(8.0).reshape(4, 2)):
        expected[i] += row  # what buffered `target[idx] += values` would get wrong
    np.testing.assert_array_equal(to_numpy(target), expected)


def test_set_backend_rejects_unknown_name_listing_the_valid_ones():
    with pytest.raises(BackendError, match="unknown backend 'tpu'; valid backends: numpy, cupy"):
        backend.set_backend("tpu")
    assert backend.get_backend() == "numpy"


def test_bogus_backend_environment_variable_fails_on_first_use_with_a_clear_message():
    env = {**os.environ, "TINYDIFF_BACKEND": "bogus"}
    result = subprocess.run([sys.executable, "-c", "import tinydiff.backend as b; b.get_backend()"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "TINYDIFF_BACKEND='bogus' is not a backend; valid backends: numpy, cupy" in result.stderr


def test_bogus_backend_environment_variable_is_one_line_from_the_cli_with_exit_status_2():
    """Regression: the variable was checked while importing, so the CLI printed a traceback."""
    env = {**os.environ, "TINYDIFF_BACKEND": "bogus"}
    result = subprocess.run([sys.executable, "-m", "tinydiff.cli", "sample", "a 7", "--output", "never.png"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("tinydiff: error: TINYDIFF_BACKEND='bogus' is not a backend; "
                                     "valid backends: numpy, cupy")


@pytest.mark.skipif(CUPY_IMPORTABLE, reason="CuPy is installed here")
def test_set_backend_cupy_without_cupy_gives_the_install_hint():
    with pytest.raises(BackendError, match=r"CuPy is not installed; install the GPU extra: pip install \"tinydiff\[gpu\]\""):
        backend.set_backend("cupy")
    assert backend.get_backend() == "numpy"  # a failed switch changes nothing


def test_set_backend_cupy_when_import_fails_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendError, match=r"pip install \"tinydiff\[gpu\]\""):
        backend.set_backend("cupy")


def test_cupy_status_is_one_line():
    status = backend.cupy_status()
    assert "\n" not in status
    assert status.startswith("not usable") != CUPY_USABLE


def test_cupy_status_does_not_claim_a_request_that_set_backend_does(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy missing, whether or not it is installed
    assert backend.cupy_status().startswith("not usable: CuPy is not installed; install the GPU extra")
    with pytest.raises(BackendError, match="^backend 'cupy' requested but CuPy is not installed"):
        backend.set_backend("cupy")


class FakeCupyArray:
    """Something whose class lives in a 'cupy' module, as backend_of recognises CuPy arrays."""

    __module__ = "cupy._core.core"


def test_mixing_numpy_and_cupy_arrays_is_an_error_without_needing_cupy():
    assert backend_of(FakeCupyArray()) == "cupy"
    with pytest.raises(BackendError, match=r"arrays from two backends \(numpy and cupy\) were mixed"):
        get_xp(np.ones(2), FakeCupyArray())


@pytest.mark.skipif(not CUPY_USABLE, reason="CuPy or a GPU is not usable here")
def test_mixing_real_numpy_and_cupy_arrays_is_an_error():
    with pytest.raises(BackendError, match="mixed"):
        get_xp(np.ones(2), to_device(np.ones(2), "cupy"))


def test_blas_info_names_a_library():
    assert backend.blas_info() and "\n" not in backend.blas_info()


def test_blas_info_and_default_threads_report_the_current_setting():
    import threadpoolctl

    now = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert backend.blas_default_threads() == (now[0] if now else None)
    if now:
        assert f"{now[0]} threads" in backend.blas_info() and "threads" not in backend.blas_info(threads=False)
        with backend.blas_threads(1):
            assert backend.blas_default_threads() == 1


def test_blas_threads_sets_and_restores_the_blas_thread_count():
    import threadpoolctl

    def blas_counts():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_counts()
    with backend.blas_threads(1):
        assert blas_counts() and set(blas_counts()) == {1}
    assert blas_counts() == before


@pytest.mark.parametrize("threads, rows", [(2, 7), (3, 9), (4, 3), (1, 5)])
def test_map_rows_equals_one_call_and_keeps_row_order(threads, rows):
    generator = np.random.default_rng(0)
    x, w = generator.standard_normal((rows, 6)), generator.standard_normal((6, 4))
    scale = np.arange(1, rows + 1, dtype=float)[:, None]
    seen_blocks = []

    def fn(a, s):  # rows are independent: a row-wise matrix product, scaled per row
        seen_blocks.append(len(a))
        return (a @ w) * s

    out = backend.map_rows(fn, x, scale, threads=threads)
    np.testing.assert_allclose(out, (x @ w) * scale, rtol=1e-12)
    expected_blocks = 1 if threads == 1 or rows < threads else threads
    assert len(seen_blocks) == expected_blocks and sum(seen_blocks) == rows


@pytest.mark.parametrize("threads, images", [(2, 7), (3, 9), (2, 2), (4, 3), (1, 5)])
def test_map_row_pairs_gives_each_thread_both_halves_of_its_images_and_keeps_row_order(threads, images):
    """Rows [first half; second half] of the same images: every call sees [a[block]; a[B + block]]
    (the second half of each row = its first half + 1000 here), and the result is fn's, row for row."""
    first = np.arange(images, dtype=float)[:, None] * np.ones((1, 3))
    x = np.concatenate([first, first + 1000])  # (2B, 3)
    t = np.concatenate([np.arange(images), np.arange(images)]).astype(float)  # (2B,)
    calls = []

    def fn(a, b):
        calls.append(a.copy())
        return a * 2 + b[:, None]

    out = backend.map_row_pairs(fn, x, t, threads=threads)
    np.testing.assert_array_equal(out, x * 2 + t[:, None])
    assert sum(len(c) for c in calls) == 2 * images
    if threads > 1 and images >= threads:
        assert len(calls) == threads
        for call in calls:
            half = len(call) // 2
            np.testing.assert_array_equal(call[half:], call[:half] + 1000)


def test_cpu_count_is_at_least_one():
    assert backend.cpu_count() >= 1


FAULTS_SCRIPT = """
import resource, sys
import numpy as np
import tinydiff.backend as b
counts = []
for _ in range(4):  # a training step's pattern: tens of MB of arrays allocated, written, all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones((1 + i % 4) << 18, dtype=np.float32) for i in range(24)]  # 1-4 MB each, 60 MB in all
    del arrays
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(b.FREED_MEMORY_KEPT, max(counts[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="keep_freed_memory acts on glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults_unless_turned_off():
    """After the first round, arrays of a repeated allocation pattern come from memory the process
    kept (no page faults); with TINYDIFF_KEEP_FREED_MEMORY=0 malloc returns it to the OS and every
    round faults again (about 15,000 times for 60 MB)."""
    def run(value):
        env = {**os.environ, "TINYDIFF_KEEP_FREED_MEMORY": value}
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    kept, faults = run("1")
    assert kept and faults < 500  # 60 MB of fresh pages would be ~15,000 faults
    kept, faults = run("0")
    assert not kept and faults > 5000  # the pattern does fault when malloc is left alone
