"""Two versions of tinydiff on the latent U-Net, timed alternately in one process: CPU time per pass.

    git worktree add --detach /tmp/tinydiff-old <commit>        # the version to compare against
    OPENBLAS_NUM_THREADS=1 python benchmarks/ab_unet.py /tmp/tinydiff-old . --rounds 15

Each tree's ``tinydiff`` package is imported under its own name (``tinydiff_v0``, ``tinydiff_v1``,
… through a symbolic link in a temporary folder), so that the layers and models of every version
live in this one process; modules that name ``tinydiff`` absolutely (text/, data/) are shared, the
layers, models and backend (relative imports) are each version's own. Each version builds the
latent U-Net from the same seed; each round then times one pass of every workload on every
version, the order alternating between rounds, with this thread's CPU time (``time.thread_time``) and the wall clock.
On a machine shared with other work the load changes from second to second: alternating pass by
pass in one process lets both versions see the same load, which separate processes do not.

Workloads: ``forward128`` (sampling: a ``no_grad`` forward on 128 rows), ``forward8``, ``forward1``
(Python's dispatch alone), ``sample64`` (a ``no_grad`` forward on 64 rows that share one timestep
and one context, as each of the two threads of the sample64 benchmark does: its 64 images at one
step, with the prompt or the null context), ``train64`` (zero_grad, forward and backward of ½‖out‖²
at batch 64).
Printed: per workload every round's CPU times, and for CPU and wall time the median of each
version and the median of the per-round ratios. Before timing, every version's outputs (and for train64 its gradients) are
compared with the first version's: equal to ``--tolerance`` (relative to the largest value;
default 0, bit for bit).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the shared modules (text/, data/) come from this checkout


def load_versions(trees: list[str]):
    """One ``tinydiff_v{i}`` package per tree, imported from a symbolic link to ``tree/tinydiff``."""
    folder = tempfile.mkdtemp(prefix="tinydiff-ab-")
    atexit.register(shutil.rmtree, folder, True)  # the links only; the modules stay loaded
    sys.path.insert(0, folder)
    versions = []
    for i, tree in enumerate(trees):
        name = f"tinydiff_v{i}"
        os.symlink(Path(tree).resolve() / "tinydiff", Path(folder) / name)
        versions.append({"name": name, "tree": tree,
                         "models": importlib.import_module(f"{name}.models"),
                         "nn": importlib.import_module(f"{name}.nn"),
                         "config": importlib.import_module(f"{name}.train.latent_unet").latent_unet_config()})
    return versions


def make_workloads(version, workloads: list[str]):
    """name → a function of no argument that runs one pass and returns what is compared."""
    config, no_grad = version["config"], version["nn"].no_grad
    unet = version["models"].UNet(config, seed=0)

    def inputs(rows, sampling):
        gen = np.random.default_rng(0)
        x = gen.standard_normal((rows, config.in_channels, config.sample_size, config.sample_size)).astype(np.float32)
        t = gen.uniform(0, 999, 1 if sampling else rows).astype(np.float32)
        context = gen.standard_normal((1 if sampling else rows, config.context_length, config.context_dim)).astype(np.float32)
        return x, np.repeat(t, rows // len(t)), np.repeat(context, rows // len(context), axis=0)

    runs = {}
    for name in workloads:
        kind = re.match(r"[a-z]+", name).group()
        args = inputs(int(name.removeprefix(kind)), sampling=kind == "sample")
        if kind in ("forward", "sample"):
            def run(args=args):
                with no_grad():
                    return [unet(*args)]
        else:
            def run(args=args):
                unet.zero_grad()
                dx = unet.backward(unet(*args))  # the gradient of ½‖out‖² is out itself
                return [dx[0] if isinstance(dx, tuple) else dx] + [p.grad for p in unet.parameters()]
        runs[name] = run
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="source trees, each holding a tinydiff/ package; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=15, help="timed passes of each workload per version")
    parser.add_argument("--workloads", default="forward128,train64",
                        help="comma-separated: forwardN (N rows, no_grad), sampleN (the same, one t and one context), trainN")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest relative difference allowed from the baseline's outputs")
    args = parser.parse_args()

    workloads = args.workloads.split(",")
    for name in workloads:
        if not re.fullmatch(r"(forward|sample|train)[1-9][0-9]*", name):
            parser.error(f"unknown workload {name!r}: use forwardN, sampleN or trainN, N the rows (e.g. forward128)")
    versions = load_versions(args.trees)
    runs = [make_workloads(v, workloads) for v in versions]
    for name in workloads:
        baseline = [np.asarray(a, np.float64) for a in runs[0][name]()]
        for version, run in zip(versions[1:], runs[1:]):
            for a, b in zip(baseline, run[name]()):
                worst = np.abs(np.asarray(b, np.float64) - a).max() / max(1e-30, np.abs(a).max())
                if worst > args.tolerance:
                    sys.exit(f"{version['tree']}: {name} differs from the baseline by {worst:.3g} (relative)")
        for run in runs:  # warm-up: workspaces, caches
            run[name]()
    for name in workloads:
        cpu, wall = [[] for _ in versions], [[] for _ in versions]
        for r in range(args.rounds):
            order = range(len(versions)) if r % 2 == 0 else reversed(range(len(versions)))
            for i in order:
                start, start_wall = time.thread_time(), time.perf_counter()
                runs[i][name]()
                cpu[i].append(1e3 * (time.thread_time() - start))
                wall[i].append(1e3 * (time.perf_counter() - start_wall))
        print(f"{name}, CPU ms per pass, every round:")
        for version, ts in zip(versions, cpu):
            print(f"  {version['tree']}: " + " ".join(f"{t:.1f}" for t in ts))
        for what, times in (("CPU", cpu), ("wall", wall)):
            medians = [statistics.median(ts) for ts in times]
            ratios = [statistics.median(b / a for a, b in zip(times[0], ts)) for ts in times[1:]]
            print(f"  {what}: median {' → '.join(f'{m:.2f}' for m in medians)} ms; median of the per-round ratios "
                  + " ".join(f"{r:.3f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
