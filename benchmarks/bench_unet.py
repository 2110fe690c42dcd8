"""U-Net cost: training steps, pixel vs latent denoiser evaluations, and text-to-image sampling.

    python benchmarks/bench_unet.py                      # every case
    python benchmarks/bench_unet.py --cases latent-eval pixel-eval
    python benchmarks/bench_unet.py --model runs/mnist-captions/model   # sampling with that pipeline

Cases (float32, batch 64 unless said):

    pixel-train   one training step (forward + backward + AdamW) of the class-conditional pixel U-Net
    latent-train  the same for the text-conditional latent U-Net (4×8×8)
    pixel-eval    one denoiser evaluation (U-Net forward, no caches) on 1×32×32 pixels
    latent-eval   one denoiser evaluation on 4×8×8 latents, plus the VAE decoder it needs once
    sample64      TextToImagePipeline: 64 images, 20 DPM++ 2M Karras steps, guidance (one 128-row
                  U-Net call per step), text encoding and decoding included; the U-Net's rows
                  split over this process and one worker process per further core (or per further
                  --threads): ``pipe.worker_processes()``, started before timing, as batch work
                  such as ``tinydiff eval`` keeps them
    sample64-threads   the same with the rows split over --threads CPU threads (default one per
                  core): what a single call of the pipeline does, e.g. one ``tinydiff sample``
    lcm4          the same 64 images in 4 LCM steps (``sampler="lcm"``): the consistency-distilled
                  student takes the guidance scale as an input, so one 64-row call per step, 10×
                  fewer U-Net rows than sample64 (target: ≤ 0.25 s on 2 idle cores)
    lcm1, lcm2, lcm8   the same in 1, 2 and 8 LCM steps (not in the default list of cases)

``--rounds N`` runs the whole list of cases N times, alternating, and keeps each case's best: on a
shared, loaded machine the ratio of two cases measured side by side (printed for lcm4 against
sample64) is steadier than either absolute time.

Each case runs in its own subprocess so its peak memory (ru_maxrss) is its own. FLOPs are
counted, not estimated, by ``tinydiff.cost.count_flops``: every convolution, linear layer and
attention product of the pass, 2 FLOPs per multiply-add (a backward pass costs two GEMMs per
forward one).
A float32 GEMM of 1024³ measured in the same run gives the machine's rate for comparison.

``--reference`` times the layers' reference implementations instead of the fast ones (it sets
``TINYDIFF_REFERENCE=1`` for every case; see ``tinydiff.backend.use_reference``).

The OpenBLAS variables OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on the project's machines) slow
NumPy's GEMM; the script says whether they are set. To measure without them, unset both in the
command: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_unet.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinydiff import cost  # noqa: E402  (after the checkout is on the path)

CASES = ("pixel-train", "latent-train", "pixel-eval", "latent-eval", "sample64", "sample64-threads", "lcm4")
SAMPLE_CASES = {"sample64": (None, 20, True), "sample64-threads": (None, 20, False), "lcm1": ("lcm", 1, False),
                "lcm2": ("lcm", 2, False), "lcm4": ("lcm", 4, False), "lcm8": ("lcm", 8, False)}
# case → (sampler, None: the model's default; steps; worker processes?). LCM's student runs on threads.


def _synchronize() -> None:
    """Wait for queued GPU work (CuPy runs asynchronously); nothing to do on NumPy."""
    from tinydiff.backend import FREED_MEMORY_KEPT, get_backend

    if get_backend() == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, caches, GPU kernel compilation
    _synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(repeats: int) -> float:
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    return 2 * 1024**3 / best_time(lambda: a @ a, repeats) / 1e9


def _unet_case(kind: str, train: bool, batch: int, repeats: int) -> dict:
    from tinydiff.models import UNet
    from tinydiff.nn import AdamW, no_grad
    from tinydiff.train.latent_unet import latent_unet_config
    from tinydiff.train.pixel_digits import pixel_unet_config

    from tinydiff.backend import to_device

    config = pixel_unet_config() if kind == "pixel" else latent_unet_config()
    unet = UNet(config)
    gen = np.random.default_rng(0)
    size, chans = config.sample_size, config.in_channels
    x = to_device(gen.standard_normal((batch, chans, size, size)).astype(np.float32))
    t = to_device(gen.uniform(0, 999, batch).astype(np.float32))
    context = to_device(gen.standard_normal((batch, config.context_length, config.context_dim)).astype(np.float32))
    optimizer = AdamW(unet.parameters(), lr=1e-4)

    def step():
        if train:
            unet.zero_grad()
            out = unet(x, t, context)
            unet.backward(out)
            optimizer.step()
        else:
            with no_grad():
                unet(x, t, context)

    with cost.count_flops(unet) as flops:
        step()
    total = flops.total * (3 if train else 1)  # backward: two GEMMs per forward GEMM
    seconds = best_time(step, repeats)
    result = {"params": unet.num_parameters(), "batch": batch, "seconds": seconds, "samples_per_s": batch / seconds,
              "flops_per_sample": total / batch, "gflops_per_s": total / seconds / 1e9}
    if kind == "latent" and not train:
        from tinydiff.models import AutoencoderKL

        vae = AutoencoderKL()
        vae.config.scaling_factor = 1.0
        z = to_device(gen.standard_normal((batch, 4, 8, 8)).astype(np.float32))
        with cost.count_flops(vae) as dflops:
            vae.decode_from_diffusion(z)
        result["decoder_seconds"] = best_time(lambda: vae.decode_from_diffusion(z), repeats)
        result["decoder_flops_per_sample"] = dflops.total / batch
    return result


def _sample_case(model: str | None, repeats: int, threads: int | None, sampler: str | None = None,
                 steps: int = 20, processes: bool = False) -> dict:
    from tinydiff.backend import cpu_count
    from tinydiff.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(model)
    pipe.threads = threads  # None: one block of U-Net rows per core
    threads = cpu_count() if threads is None else threads
    with pipe.worker_processes(threads - 1 if processes else 0):  # started before the clock, as batch work keeps them
        seconds = best_time(lambda: pipe("a handwritten 7", num_images=64, steps=steps, sampler=sampler, seed=0),
                            repeats)
    return {"images": 64, "steps": steps, "sampler": sampler or pipe.defaults.sampler,
            "guidance_scale": pipe.defaults.guidance_scale, "seconds": seconds, "threads": threads,
            "rows_on": "process(es)" if processes and threads > 1 else "thread(s)"}


def run_case(case: str, args) -> dict:
    if case in SAMPLE_CASES:
        sampler, steps, processes = SAMPLE_CASES[case]
        result = _sample_case(args.model, args.repeats, args.threads, sampler, steps, processes)
    else:
        kind, mode = case.split("-")
        result = _unet_case(kind, mode == "train", args.batch, args.repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=sorted(set(CASES) | set(SAMPLE_CASES)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run the list of cases this many times, alternating; keep each one's best")
    parser.add_argument("--model", help="pipeline folder for sample64 and lcm4 (default: the shipped weights)")
    parser.add_argument("--threads", type=int, help="sample64, lcm4: CPU threads sharing the U-Net's rows (default: one per core)")
    parser.add_argument("--reference", action="store_true", help="run the reference layers (TINYDIFF_REFERENCE=1), not the fast ones")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args)))
        return

    blas_env = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    from tinydiff.backend import FREED_MEMORY_KEPT, get_backend

    print(f"backend {get_backend()} (TINYDIFF_BACKEND), {'reference' if args.reference else 'fast'} layers; OpenBLAS guard variables set: {', '.join(blas_env) or 'none'}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"malloc keeps freed memory: {'yes' if FREED_MEMORY_KEPT else 'no'}; load average {os.getloadavg()[0]:.2f}")
    print(f"float32 GEMM 1024³: {gemm_rate(args.repeats):.1f} GFLOP/s")
    results = {}
    for case in [c for _ in range(args.rounds) for c in args.cases]:  # alternating rounds
        command = [sys.executable, __file__, "--one", case, "--batch", str(args.batch), "--repeats", str(args.repeats)]
        if args.model:
            command += ["--model", args.model]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = dict(os.environ, TINYDIFF_REFERENCE="1" if args.reference else "0")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"{case}: failed\n{done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if case not in results or r["seconds"] < results[case]["seconds"]:
            results[case] = r
        if case in SAMPLE_CASES:
            print(f"{case:>13}: {r['seconds']:.2f} s for 64 images × {r['steps']} {r['sampler']} steps "
                  f"(guidance {r['guidance_scale']}), U-Net rows on {r['threads']} {r['rows_on']}, peak {r['peak_rss_mb']:.0f} MB, "
                  f"load average {os.getloadavg()[0]:.2f}")
        else:
            print(f"{case:>13}: {r['seconds'] * 1e3:7.1f} ms/batch of {r['batch']}, {r['samples_per_s']:7.1f} samples/s, "
                  f"{r['flops_per_sample'] / 1e6:7.1f} MFLOP/sample, {r['gflops_per_s']:5.1f} GFLOP/s, "
                  f"{r['params']:,} params, peak {r['peak_rss_mb']:.0f} MB")
    if "pixel-eval" in results and "latent-eval" in results:
        p, lat = results["pixel-eval"], results["latent-eval"]
        print(f"pixel vs latent, one denoiser evaluation: {p['flops_per_sample'] / lat['flops_per_sample']:.1f}× the FLOPs, "
              f"{p['seconds'] / lat['seconds']:.1f}× the time; the VAE decoder adds "
              f"{lat['decoder_flops_per_sample'] / 1e6:.1f} MFLOP/sample once per image "
              f"({lat['decoder_seconds'] * 1e3:.0f} ms per batch)")
    for case in [c for c in SAMPLE_CASES if c.startswith("lcm") and c in results and "sample64" in results]:
        s, lcm = results["sample64"]["seconds"], results[case]["seconds"]
        print(f"{case} vs sample64 (best of {args.rounds} alternating round(s)): {lcm:.3f} s vs {s:.3f} s, "
              f"{s / lcm:.1f}× faster; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
