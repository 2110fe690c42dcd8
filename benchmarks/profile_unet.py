"""Where a latent U-Net pass spends its CPU time, by source file (cProfile, this thread's CPU time).

    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_unet.py            # sampling: forward, 128 rows, no_grad
    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_unet.py --rows 64  # what each of sample64's 2 threads runs
    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_unet.py --train    # training: forward + backward, batch 64

Sampling rows share one timestep and one context (one prompt's states), as in the pipeline, where
each thread gets the 64 rows of one side of classifier-free guidance; training rows get their own.

Each function's own time (not its callees') is added to its file: fast_conv.py is the
convolutions, norm.py GroupNorm and LayerNorm, dense.py the Linear layers, activations.py SiLU,
GELU and softmax, attention.py the attention core, module.py the layers' dispatch and input
checks; "numpy" is time inside NumPy functions called directly from model code (reductions,
reshapes, the residual additions). CPU time of this thread (``time.thread_time``), so other
processes on a shared machine slow it less than a wall clock; ``--reference`` profiles the
reference layers.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="forward + backward at batch 64 (default: sampling's 128-row forward)")
    parser.add_argument("--rows", type=int, help="rows per pass (default: 128 for sampling, 64 with --train)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference", action="store_true", help="profile the reference layers (backend.use_reference)")
    args = parser.parse_args()

    from tinydiff.backend import use_reference
    from tinydiff.models import UNet
    from tinydiff.nn import no_grad
    from tinydiff.train.latent_unet import latent_unet_config

    use_reference(args.reference)
    config = latent_unet_config()
    unet = UNet(config, seed=0)
    rows = args.rows if args.rows is not None else (64 if args.train else 128)
    if rows < 1:
        parser.error(f"--rows must be at least 1, got {rows}")
    gen = np.random.default_rng(0)
    x = gen.standard_normal((rows, config.in_channels, config.sample_size, config.sample_size)).astype(np.float32)
    distinct = rows if args.train else 1  # sampling: one timestep and one context for every row
    t = np.repeat(gen.uniform(0, 999, distinct), rows // distinct).astype(np.float32)
    context = np.repeat(gen.standard_normal((distinct, config.context_length, config.context_dim)), rows // distinct,
                        axis=0).astype(np.float32)

    def step():
        if args.train:
            unet.zero_grad()
            unet.backward(unet(x, t, context))
        else:
            with no_grad():
                unet(x, t, context)

    for _ in range(3):  # warm-up: workspaces, caches
        step()
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    for _ in range(args.repeats):
        step()
    profile.disable()
    by_file, total = defaultdict(float), 0.0
    for (filename, _, name), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        key = Path(filename).name if "tinydiff" in filename else ("numpy" if "numpy" in filename or name.startswith("<method") or "{" in filename else "python")
        by_file[key] += own
        total += own
    print(f"{f'training step, batch {rows}' if args.train else f'sampling forward, {rows} rows'}: "
          f"{total / args.repeats * 1e3:.1f} ms CPU per pass ({args.repeats} passes)")
    for key, own in sorted(by_file.items(), key=lambda kv: -kv[1]):
        if own / total >= 0.005:
            print(f"  {key:22s} {own / args.repeats * 1e3:7.1f} ms  {100 * own / total:5.1f} %")


if __name__ == "__main__":
    main()
