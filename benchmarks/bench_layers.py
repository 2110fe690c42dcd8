"""Micro-benchmark: conv2d and attention forward+backward against the BLAS GEMM rate.

    python benchmarks/bench_layers.py                 # as the machine is set up
    python benchmarks/bench_layers.py --reference     # the reference layers (tinydiff/nn/conv.py)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_layers.py

Sizes are those of the miniature U-Net (float32, the training dtype):

* conv2d 3×3, padding 1: batch 128 × 64 channels at 8×8, and batch 64 × 32 channels at 32×32;
* two stacked self-attention layers: batch 128, 64 tokens of 64 dims, 4 heads of 16.

FLOPs count only the matrix products, 2·M·N·K for each GEMM, forward and backward:
conv2d is one GEMM forward (W·cols) and two backward (dW = dout·colsᵀ, dcols = Wᵀ·dout), so
3 × 2·O·(C·kh·kw)·(N·Ho·Wo); an attention layer is four projections (q, k, v, out; each 1 GEMM
forward, 2 backward) plus QKᵀ and PV (1 forward, 2 backward each).

Each rate is compared with a float32 GEMM measured in the same run: a square one with the same
FLOP count (what the BLAS can do at that amount of work), and — for conv2d — the three GEMMs with
exactly the conv's shapes and layouts (what im2col could reach if its copies were free).
The issue's target: conv2d forward+backward at ≥ 50 % of the square-GEMM rate.

The FLOPs are those of the direct (im2col) convolution even where the fast path does fewer: the
3×3 convolutions of even-sized images (the 8×8 case) run Winograd F(2×2, 3×3), whose products
are 4/9 of these, so their GFLOP/s is an effective rate and can exceed the GEMM's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinydiff.backend import blas_info, use_reference  # noqa: E402
from tinydiff.nn import Attention, Conv2d, Sequential, manual_seed  # noqa: E402

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
CONV_CASES = [  # (name, batch, channels, size)
    ("conv 64ch 8x8 b128", 128, 64, 8),
    ("conv 32ch 32x32 b64", 64, 32, 32),
]
ATTENTION_CASE = dict(batch=128, tokens=64, dim=64, heads=4, layers=2)


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best (minimum) wall seconds of each function, timed in turn within every round so that a
    busy machine slows the layer and its GEMM reference alike. One warm-up round first."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def gemm_job(shapes):
    """(function running float32 products a @ b for each (a_shape, b_shape), their total FLOPs)."""
    gen = np.random.default_rng(0)
    pairs = [(gen.standard_normal(sa, dtype=np.float32), gen.standard_normal(sb, dtype=np.float32)) for sa, sb in shapes]
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)

    def run():
        for a, b in pairs:
            a @ b

    return run, flops


def square_gemm_job(flops: float):
    """One n×n·n×n float32 GEMM with 2n³ ≈ ``flops``: (function, its exact FLOPs, n)."""
    n = max(16, round((flops / 2) ** (1 / 3)))
    run, exact = gemm_job([((n, n), (n, n))])
    return run, exact, n


def summarise(flops, best, square_flops, n) -> dict:
    rate = flops / best["fwd+bwd"] / 1e9
    square = square_flops / best["square"] / 1e9
    return dict(flops=flops, seconds=best["fwd+bwd"], forward_seconds=best["fwd"],
                backward_seconds=best["fwd+bwd"] - best["fwd"], gflops=rate, square_gemm_gflops=square,
                square_n=n, ratio=rate / square)


def bench_conv(batch: int, channels: int, size: int, repeats: int) -> dict:
    gen = np.random.default_rng(0)
    layer = Conv2d(channels, channels, 3, padding=1)
    x = gen.standard_normal((batch, channels, size, size), dtype=np.float32)
    dout = gen.standard_normal((batch, channels, size, size), dtype=np.float32)
    k = channels * 9  # C·kh·kw
    cols = batch * size * size  # N·Ho·Wo
    flops = 3 * 2 * channels * k * cols

    def fwd_bwd():
        layer(x)
        layer.backward(dout)

    square, square_flops, n = square_gemm_job(flops)
    # the conv's own three GEMMs, same shapes: W (O, K)·cols (K, NHW); dout (O, NHW)·colsᵀ; Wᵀ (K, O)·dout
    same, _ = gemm_job([((channels, k), (k, cols)), ((channels, cols), (cols, k)), ((k, channels), (channels, cols))])
    best = interleaved_best({"fwd": lambda: layer(x), "fwd+bwd": fwd_bwd, "square": square, "same": same}, repeats)
    result = summarise(flops, best, square_flops, n)
    result["same_shape_gemm_gflops"] = flops / best["same"] / 1e9
    return result


def attention_flops(batch, tokens, dim, heads, layers) -> int:
    inner = dim  # heads · dim_head = query_dim here
    rows = batch * tokens
    projections = 4 * 2 * rows * dim * inner  # to_q, to_k, to_v, to_out forward
    scores = 2 * 2 * batch * heads * tokens * tokens * (inner // heads)  # QKᵀ and PV forward
    return layers * 3 * (projections + scores)  # backward = two GEMMs per forward GEMM


def bench_attention(batch, tokens, dim, heads, layers, repeats: int) -> dict:
    gen = np.random.default_rng(0)
    model = Sequential([Attention(dim, heads=heads, dim_head=dim // heads) for _ in range(layers)])
    x = gen.standard_normal((batch, tokens, dim), dtype=np.float32)
    dout = gen.standard_normal((batch, tokens, dim), dtype=np.float32)
    flops = attention_flops(batch, tokens, dim, heads, layers)

    def fwd_bwd():
        model(x)
        model.backward(dout)

    square, square_flops, n = square_gemm_job(flops)
    best = interleaved_best({"fwd": lambda: model(x), "fwd+bwd": fwd_bwd, "square": square}, repeats)
    return summarise(flops, best, square_flops, n)


def environment_report() -> tuple[list[str], dict]:
    lines = [
        "NOTE: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set on the project's machines and slow NumPy's GEMM;",
        "      compare with:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_layers.py",
    ]
    values = {name: os.environ.get(name) for name in OPENBLAS_VARS}
    if any(v is not None for v in values.values()):
        shown = ", ".join(f"{k}={v!r}" if v is not None else f"{k} unset" for k, v in values.items())
        lines.append(f"This run: SET ({shown}) -- GEMM and layer rates below are slowed by it.")
    else:
        lines.append("This run: both UNSET -- OpenBLAS chooses its own kernel and cache sizes.")
    threads = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if os.environ.get(k)}
    lines.append(f"NumPy {np.__version__}, BLAS {blas_info()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
                 + (f", {threads}" if threads else ""))
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        busy = " (busy: other processes share the CPUs, expect noisy numbers)" if load > 0.5 * (os.cpu_count() or 1) else ""
        lines.append(f"Load average {load:.2f}{busy}")
    return lines, values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is reported)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--reference", action="store_true", help="time the reference layers instead of the fast ones")
    args = parser.parse_args(argv)
    use_reference(args.reference)

    manual_seed(0)
    lines, env_values = environment_report()
    lines.append(f"Layers: {'reference' if args.reference else 'fast'} implementations")
    print("\n".join(lines))
    print()
    header = (f"{'case':<22}{'GFLOP':>7}{'fwd ms':>8}{'bwd ms':>8}{'GFLOP/s':>9}{'GEMM sq':>9}{'ratio':>7}"
              f"{'GEMM same':>11}{'ratio':>7}")
    print(header)
    print("-" * len(header))
    results = {"env": env_values, "cases": {}}

    def row(name, r):
        same = r.get("same_shape_gemm_gflops")
        tail = f"{same:>11.1f}{r['gflops'] / same:>7.0%}" if same else ""
        print(f"{name:<22}{r['flops'] / 1e9:>7.2f}{r['forward_seconds'] * 1e3:>8.1f}{r['backward_seconds'] * 1e3:>8.1f}"
              f"{r['gflops']:>9.1f}{r['square_gemm_gflops']:>9.1f}{r['ratio']:>7.0%}{tail}", flush=True)

    for name, batch, channels, size in CONV_CASES:
        results["cases"][name] = r = bench_conv(batch, channels, size, args.repeats)
        row(name, r)
    a = ATTENTION_CASE
    name = f"attn x{a['layers']} {a['tokens']}tok b{a['batch']}"
    results["cases"][name] = r = bench_attention(a["batch"], a["tokens"], a["dim"], a["heads"], a["layers"], args.repeats)
    row(name, r)
    print()
    print("GFLOP/s: layer forward+backward, GEMM FLOPs only (best of runs). GEMM sq: one square float32 GEMM of the")
    print("same FLOP count, timed in the same rounds; ratio = layer / GEMM sq. GEMM same: the conv's own three GEMM")
    print("shapes alone (im2col's ceiling); its ratio = layer / GEMM same (the share lost to copies and allocation).")
    conv_ok = all(results["cases"][n]["ratio"] >= 0.5 for n, *_ in CONV_CASES)
    print(f"Target conv2d forward+backward >= 50% of the GEMM rate: {'MET' if conv_ok else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
