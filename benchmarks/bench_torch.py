"""PyTorch reference: tinydiff's networks against the same networks in PyTorch eager mode.

    python benchmarks/bench_torch.py                        # 1 and 2 threads, every case
    python benchmarks/bench_torch.py --threads 2 --repeats 7 --cases unet-train sample64
    python benchmarks/bench_torch.py --threads 2 --cases dit-train dit-sample64   # the DiT
    python benchmarks/bench_torch.py --json torch.json      # also write the results

Needs PyTorch (``pip install 'tinydiff[torch]'``); without it the script says so and exits.

Cases (float32, tinydiff's default configs and batch sizes):

    unet-train  one training step of the latent U-Net, batch 64, contexts (64, 16, 64): the batch
                drawn as ``train.diffusion.diffusion_grads`` draws it (timesteps, ε, 10% null
                contexts), forward, MSE on ε, backward, AdamW
    dit-train   the same step for the latent DiT (``train.latent_unet.latent_dit_config``), the
                same batches
    vae-train   one training step of the autoencoder, batch 32: forward (encode, sample,
                decode), reconstruction + KL loss, backward, AdamW
    text-train  one step of the text encoder, 128 captions: forward, MSE on the pooled
                embedding, backward, AdamW
    sample64    the shipped pipeline: 64 images of one prompt, 20 DPM++ 2M Karras steps with
                guidance (one 128-row U-Net call per step), prompt encoding and VAE decoding
                included; the PyTorch side runs the same loop (tinydiff's sampler and σ
                bookkeeping) with the mirrored networks under ``torch.inference_mode``. With T
                threads, tinydiff's rows run in this process and T − 1 worker processes
                (``pipe.worker_processes()``, as batch work such as ``tinydiff eval`` runs them)
    sample64-threads  the same on T threads (``pipe.threads``): what one call of the pipeline
                does outside ``worker_processes()``, e.g. a single ``tinydiff sample``
    dit-sample64  sample64 with the shipped DiT pipeline (``mnist-captions-dit``)

The PyTorch networks are ``torch_models.py``: built from tinydiff's configs with the same
parameter names and shapes, tinydiff's weights copied in. Before timing, each case checks that
both compute the same thing in float32 (outputs, loss, gradients; relative difference
max|a − b|/max|b|) and stops with an error if any differs by more than 1e-3.

Timing: one warm-up call each, then ``--repeats`` rounds alternating tinydiff and PyTorch (so a
machine that gets busier slows both alike); the median is reported. The ratio is tinydiff /
PyTorch (above 1: tinydiff is slower). FLOPs are those of the matrix products, counted on the
tinydiff pass by ``tinydiff.cost.count_flops`` (a training step: 3 × the forward's), and the same
count is used for both; sample64's count is also checked against ``tinydiff.cost.pipeline_cost``
(calls × rows × FLOPs per row + decoder, per image, and the text encoder once: the pipeline
encodes each distinct prompt once). Each thread count runs in its
own subprocess with OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = MKL_NUM_THREADS = T and ``torch.set_num_threads(T)``,
so NumPy's BLAS and PyTorch get the same number of threads; the float32 GEMM rate (1024³) of
NumPy and of PyTorch is measured in the same process. In the training and sampling cases
tinydiff uses its T cores its own way, with single-threaded BLAS: the batch is split into T
blocks of rows, which unet-train, dit-train, sample64 and dit-sample64 run in this process and
T − 1 worker processes (``diffusion_grads(threads=T)``, ``pipe.worker_processes()``; the workers
start during the case's set-up, so their start-up, about half a second, is not timed) and
sample64-threads on T threads. PyTorch uses its intra-op threads.

On a machine shared with other jobs, timings with 2 threads on 2 cores are erratic (a BLAS thread
waiting for a busy core stalls every GEMM); the script prints the load average before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

# benchmarks/ is on sys.path when this runs as a script; importing bench_unet puts the checkout's root there too.
import bench_unet  # noqa: F401

from tinydiff import cost
from tinydiff.backend import FREED_MEMORY_KEPT

CASES = ("unet-train", "dit-train", "vae-train", "text-train", "sample64", "sample64-threads", "dit-sample64")
# the targets on 2 cores, at 1 and at 2 threads (tinydiff's time / PyTorch eager's)
TARGETS = {"unet-train": ("U-Net training step", 1.25), "dit-train": ("DiT training step", 1.5),
           "sample64": ("sampling 64 images (batch work)", 1.5)}
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # NumPy's OpenBLAS; PyTorch's
PARITY_TOLERANCE = 1e-3  # float32 networks of this size agree to ~1e-6; 1e-3 means something differs


class Case(NamedTuple):
    """One step to time with each library, and what the parity check found."""

    tiny: Callable[[], object]  # one step with tinydiff
    torch: Callable[[], object]  # the same step with the PyTorch mirror
    flops: int  # matrix-product FLOPs of one step
    parity: dict  # name → relative difference (float32, copied weights)
    what: str  # one line: what a step is


# --------------------------------------------------------------------------- helpers


def relative_difference(a, b) -> float:
    """max |a − b| / max |b| over all entries: 0 for equal arrays, ~1e-7 for float32 rounding."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def gradient_difference(tiny_model, torch_model) -> float:
    """The largest relative difference between a parameter's two gradients (after one backward each)."""
    torch_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    return max(relative_difference(p.grad, torch_grads[name]) for name, p in tiny_model.named_parameters())


def check_parity(name: str, parity: dict) -> None:
    """Stop loudly when the two implementations disagree: the timings would compare different work."""
    bad = {k: v for k, v in parity.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise SystemExit(f"{name}: tinydiff and PyTorch disagree (relative difference > {PARITY_TOLERANCE}): {bad}")


def gemm_rates(repeats: int) -> dict:
    """GFLOP/s of a float32 1024³ matrix product with NumPy and with PyTorch (median of repeats)."""
    import torch

    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    ta = torch.from_numpy(a)
    times = time_interleaved({"numpy": lambda: a @ a, "torch": lambda: ta @ ta}, repeats)
    return {name: 2 * 1024**3 / statistics.median(t) / 1e9 for name, t in times.items()}


def time_interleaved(steps: dict, repeats: int) -> dict:
    """{name: [seconds per call]}: one warm-up call each, then ``repeats`` rounds calling each in turn."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def training_flops(step, model) -> int:
    """FLOPs of one training step of ``model``: the forward's matrix products, counted, times 3 (a
    backward pass runs two GEMMs per forward GEMM: one for the input's gradient, one for the weight's)."""
    with cost.count_flops(model) as count:
        step()
    return 3 * count.total


def training_case(model, reference, tiny_loss, torch_loss, what: str, lr: float = 2e-3) -> Case:
    """A training-step case from one loss function per library, each returning (loss, output)
    after its backward pass: parity from one call of each, then steps with AdamW (weight decay 0)."""
    import torch

    from tinydiff.nn import AdamW

    (loss_a, out_a), (loss_b, out_b) = tiny_loss(), torch_loss()
    parity = {"output": relative_difference(out_a, out_b), "loss": relative_difference(loss_a, loss_b),
              "grads": gradient_difference(model, reference)}
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0)

    def tiny_step():
        model.zero_grad()
        tiny_loss()
        optimizer.step()

    def torch_step():
        torch_optimizer.zero_grad()
        torch_loss()
        torch_optimizer.step()

    return Case(tiny_step, torch_step, training_flops(tiny_step, model), parity, what)


# --------------------------------------------------------------------------- the cases


class FixedContexts:
    """A conditioning for ``diffusion_grads`` that hands out stored token states (no text encoder)."""

    def __init__(self, contexts):
        self.contexts = contexts  # (N, L, D), one per training latent

    def encode(self, indices, generator):
        return self.contexts[indices], None  # (B, L, D), no padding mask (as CaptionConditioning)

    def backward(self, dcontext):
        """Frozen: nothing to train."""


def torch_diffusion_grads(model, data, config, contexts):
    """``diffusion_grads`` for the PyTorch mirror: the same draws from the generator in the same
    order (so both libraries see the same batch), then forward, loss and ``loss.backward()``."""
    import torch
    import torch.nn.functional as F

    from tinydiff.diffusion.noise import alphas_cumprod_at, prediction_target, q_sample

    if config.loss_weighting != "plain":
        raise ValueError("torch_diffusion_grads implements the plain (unweighted) loss only")
    schedule = config.make_schedule()
    n, b = data.shape[0], config.batch_size

    def compute_grads(generator):
        idx = generator.integers(0, n, size=b)
        t = generator.integers(0, schedule.num_timesteps, size=b)
        noise = generator.standard_normal((b,) + data.shape[1:]).astype(data.dtype)
        dropped = torch.from_numpy(generator.random(b) < config.cond_drop_prob)  # (B,) bool
        x0 = data[idx]
        x_t = q_sample(x0, t, noise, schedule)  # NumPy, as on the tinydiff side
        target = prediction_target(x0, noise, alphas_cumprod_at(schedule, t, x0), config.prediction_type)
        context = torch.where(dropped[:, None, None], model.null_context(b), torch.from_numpy(contexts[idx]))
        pred = model(torch.from_numpy(x_t), torch.from_numpy(t.astype(data.dtype)), context)
        loss = F.mse_loss(pred, torch.from_numpy(target))
        loss.backward()
        return loss.item()

    return compute_grads


def unet_train_case(batch: int = 64, threads: int = 1) -> Case:
    from tinydiff.models import UNet
    from tinydiff.train.latent_unet import latent_unet_config

    return denoiser_train_case(UNet(latent_unet_config()), "latent U-Net", batch, threads)


def dit_train_case(batch: int = 64, threads: int = 1) -> Case:
    from tinydiff.models.dit import DiT
    from tinydiff.train.latent_unet import latent_dit_config

    from tinydiff.backend import rng

    dit = DiT(latent_dit_config())
    gen = rng(4)
    for p in dit.parameters():  # a fresh DiT outputs exactly 0 (adaLN-Zero): leave the start, so parity means something
        p.data += (0.02 * gen.standard_normal(p.shape)).astype(p.data.dtype)
    return denoiser_train_case(dit, "latent DiT", batch, threads)


def denoiser_train_case(unet, label: str, batch: int, threads: int) -> Case:
    """A diffusion training step of ``unet`` (a U-Net or a DiT: the same interface) and its mirror."""
    import torch

    from torch_models import mirror
    from tinydiff.backend import rng
    from tinydiff.nn import AdamW, no_grad
    from tinydiff.train.diffusion import DiffusionTrainingConfig, diffusion_grads

    config = unet.config
    reference = mirror(unet)
    data_gen = rng(0)
    latents = data_gen.standard_normal((1000, 4, 8, 8)).astype(np.float32)  # like s·μ: unit variance
    contexts = data_gen.standard_normal((1000, config.context_length, config.context_dim)).astype(np.float32)
    diffusion = DiffusionTrainingConfig(batch_size=batch)
    tiny_grads = diffusion_grads(unet, latents, diffusion, FixedContexts(contexts), threads=threads)
    torch_grads = torch_diffusion_grads(reference, latents, diffusion, contexts)

    # Parity: the forward on one batch, then one loss and backward each on the same drawn batch.
    x, t, c = latents[:batch], data_gen.uniform(0, 999, batch).astype(np.float32), contexts[:batch]
    with no_grad(), torch.inference_mode():
        parity = {"output": relative_difference(
            unet(x, t, c), reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy())}
    unet.zero_grad()
    reference.zero_grad()
    tiny_loss, _ = tiny_grads(0, rng(1))
    torch_loss = torch_grads(rng(1))
    parity |= {"loss": relative_difference(tiny_loss, torch_loss), "grads": gradient_difference(unet, reference)}

    optimizer = AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)  # the recipe's U-Net settings
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    tiny_gen, torch_gen = rng(2), rng(2)

    def tiny_step():
        unet.zero_grad()
        tiny_grads(0, tiny_gen)
        optimizer.step()

    def torch_step():
        torch_optimizer.zero_grad()
        torch_grads(torch_gen)
        torch_optimizer.step()

    # FLOPs counted on one core: with several, the workers' products happen in other processes
    one_core = diffusion_grads(unet, latents, diffusion, FixedContexts(contexts))
    flops = training_flops(lambda: one_core(0, rng(3)), unet)
    unet.zero_grad()
    return Case(tiny_step, torch_step, flops, parity,
                f"{label} training step, batch {batch}, {unet.num_parameters():,} params")


def vae_train_case(batch: int = 32) -> Case:
    import torch

    import torch_models
    from tinydiff.backend import rng
    from tinydiff.models import AutoencoderKL
    from tinydiff.models.autoencoder import vae_loss

    vae = AutoencoderKL()
    reference = torch_models.mirror(vae)
    gen = rng(0)
    x = np.where(gen.random((batch, 1, 32, 32)) < 0.2, 1.0, -1.0).astype(np.float32)  # digit-like: ink on −1
    eps = gen.standard_normal((batch,) + vae.config.latent_shape).astype(np.float32)
    tx, teps = torch.from_numpy(x), torch.from_numpy(eps)
    kl_weight = vae.config.kl_weight

    def tiny_loss():
        x_hat, mean, logvar = vae(x, eps)
        loss, grads, _ = vae_loss(x, x_hat, mean, logvar, kl_weight)
        vae.backward(*grads)
        return loss, x_hat

    def torch_loss():
        x_hat, mean, logvar = reference(tx, teps)
        loss = torch_models.vae_loss(tx, x_hat, mean, logvar, kl_weight)
        loss.backward()
        return loss.item(), x_hat.detach().numpy()

    return training_case(vae, reference, tiny_loss, torch_loss,  # lr as train.autoencoder.default_loop
                         f"autoencoder training step, batch {batch}, {vae.num_parameters():,} params")


def random_captions(n: int, generator) -> list[str]:
    """n captions from the training grammar, for random digits with random attributes."""
    from tinydiff.text.captions import ATTRIBUTE_DTYPE, sample_captions

    attributes = np.zeros(n, dtype=ATTRIBUTE_DTYPE)
    for name in ("thickness", "slant"):
        attributes[name] = generator.integers(0, 3, n)  # thin / regular / bold; left / upright / right
    attributes["size"] = generator.integers(0, 2, n)
    return sample_captions(generator.integers(0, 10, n), attributes, generator)


def text_train_case(batch: int = 128) -> Case:
    import torch
    import torch.nn.functional as F

    from torch_models import mirror
    from tinydiff.backend import rng
    from tinydiff.models import TextEncoder, TextEncoderConfig
    from tinydiff.nn import mse_loss
    from tinydiff.text.tokenizer import Tokenizer

    encoder = TextEncoder(TextEncoderConfig())
    reference = mirror(encoder)
    gen = rng(0)
    tokens = Tokenizer.from_captions().encode(random_captions(batch, gen))  # ids, mask (B, 16), padded
    ids, mask = torch.from_numpy(tokens.ids.astype(np.int64)), torch.from_numpy(tokens.mask)
    target = gen.standard_normal((batch, encoder.config.projection_dim)).astype(np.float32)

    def tiny_loss():
        hidden, pooled = encoder(tokens.ids, tokens.mask)
        loss, dpooled = mse_loss(pooled, target)
        encoder.backward(None, dpooled)
        return loss, hidden

    def torch_loss():
        hidden, pooled = reference(ids, mask)
        loss = F.mse_loss(pooled, torch.from_numpy(target))
        loss.backward()
        return loss.item(), hidden.detach().numpy()

    return training_case(encoder, reference, tiny_loss, torch_loss,  # lr as train.clip.default_loop
                         f"text encoder step (pooled MSE), batch {batch}, {encoder.num_parameters():,} params")


def torch_pipeline(pipe, text_encoder, unet, vae, prompt: str, num_images: int, seed: int):
    """``TextToImagePipeline.__call__`` with the PyTorch networks: the same tokens, σ schedule,
    seeded noise, Denoiser (CFG) and sampler, only the three networks swapped.
    Returns (uint8 images (N, 28, 28), final latents (N, 4, 8, 8))."""
    import torch

    from tinydiff.data.mnist import from_model_range
    from tinydiff.diffusion import Denoiser, get_sampler, get_sigmas, per_sample_generators, randn_per_sample

    d = pipe.defaults
    tokens = pipe.tokenizer.encode([prompt] * num_images)
    with torch.inference_mode():
        context, _ = text_encoder(torch.from_numpy(tokens.ids.astype(np.int64)), torch.from_numpy(tokens.mask))
        uncond = unet.null_context(num_images)

        def unet_call(x, t, c):  # NumPy in, NumPy out, as the Denoiser (and tinydiff's UNet) work
            return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy()

        denoiser = Denoiser(unet_call, pipe.schedule, pipe.diffusion.prediction_type, context=context.numpy(),
                            uncond_context=uncond.numpy(), guidance_scale=d.guidance_scale)
        sigmas = get_sigmas(pipe.schedule, d.steps, d.sigma_schedule, sigma_max=d.sigma_max)
        generators = per_sample_generators(seed, num_images)
        size = unet.config.sample_size
        z = randn_per_sample(generators, (num_images, unet.config.in_channels, size, size)) * float(sigmas[0])
        z0 = get_sampler(d.sampler)(denoiser, z, sigmas, rng=generators)
        x = vae.decode_from_diffusion(torch.from_numpy(z0)).numpy()  # (N, 1, 32, 32) in [−1, 1]
    return from_model_range(x), z0


def sample_case(num_images: int = 64, threads: int = 1, model: str = "mnist-captions", processes: bool = True) -> Case:
    import contextlib

    from torch_models import mirror
    from tinydiff.pipeline import TextToImagePipeline, pretrained_path

    pipe = TextToImagePipeline.from_pretrained(pretrained_path(model))
    pipe.threads = threads  # U-Net rows split over this many CPU threads (backend.map_rows) ...
    workers = contextlib.ExitStack()  # ... or over this process and threads − 1 workers (started below)
    text_encoder, unet, vae = mirror(pipe.text_encoder), mirror(pipe.unet), mirror(pipe.vae)
    prompt, seed = "a bold handwritten 7", 0

    def tiny_step(workers=workers):  # the closure keeps the workers
        return pipe(prompt, num_images=num_images, seed=seed, return_latents=True)

    def torch_step():
        return torch_pipeline(pipe, text_encoder, unet, vae, prompt, num_images, seed)

    with cost.count_flops(pipe.text_encoder, pipe.unet, pipe.vae) as count:
        (images_a, z_a) = tiny_step()
    d = pipe.defaults
    c = cost.pipeline_cost(pipe)  # per image, the defaults' sampler and steps; the one prompt is encoded once
    predicted = (num_images * (c["gflop_per_image"] - c["text_encoder_gflop"]) + c["text_encoder_gflop"]) * 1e9
    if abs(count.total - predicted) > 1e-9 * predicted:
        raise SystemExit(f"{model} sample64: counted {count.total} FLOPs but pipeline_cost predicts {predicted:.0f}")
    if processes:  # after counting, which sees this process's layers only; kept until the process ends
        workers.enter_context(pipe.worker_processes())
    images_b, z_b = torch_step()
    # uint8 pixels may round to neighbouring levels; a difference of two levels or more is an error.
    levels = np.abs(images_a.astype(np.int64) - images_b.astype(np.int64))
    parity = {"latents": relative_difference(z_a, z_b), "pixels off by >1 level": float((levels > 1).mean())}
    if processes and not np.array_equal(tiny_step()[1], z_a):
        raise SystemExit(f"{model} sample64: the worker processes' latents differ from the threads'")
    return Case(tiny_step, torch_step, count.total, parity,
                f"{model}: {num_images} images, {d.steps} {d.sampler} {d.sigma_schedule} steps, "
                f"guidance {d.guidance_scale}, U-Net rows on {threads} "
                f"{'process(es)' if processes and threads > 1 else 'thread(s)'}")


def sample_threads_case(num_images: int = 64, threads: int = 1) -> Case:
    return sample_case(num_images, threads, processes=False)


def dit_sample_case(num_images: int = 64, threads: int = 1) -> Case:
    return sample_case(num_images, threads, model="mnist-captions-dit")


THREADED_CASES = ("unet-train", "dit-train", "sample64", "sample64-threads", "dit-sample64")  # the batch split over T cores
BUILDERS = {"unet-train": unet_train_case, "dit-train": dit_train_case, "vae-train": vae_train_case,
            "text-train": text_train_case, "sample64": sample_case, "sample64-threads": sample_threads_case,
            "dit-sample64": dit_sample_case}


# --------------------------------------------------------------------------- one thread count


def run_threads(threads: int, cases, repeats: int) -> dict:
    """Every case at one thread count, in this process; prints a table and returns the results."""
    import torch

    torch.set_num_threads(threads)
    print(f"\n== {threads} thread(s): torch.set_num_threads({threads}), "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    gemm = gemm_rates(max(repeats, 5))
    print(f"float32 GEMM 1024³: NumPy {gemm['numpy']:.1f} GFLOP/s, PyTorch {gemm['torch']:.1f} GFLOP/s", flush=True)
    print(f"{'case':>16}  {'tinydiff ms':>11}  {'torch ms':>9}  {'ratio':>5}  {'GFLOP/step':>10}  "
          f"{'tiny GFLOP/s':>12}  {'torch GFLOP/s':>13}  parity (relative difference)", flush=True)
    results = {"threads": threads, "gemm_gflops": gemm, "load_average": os.getloadavg()[0], "cases": {}}
    for name in cases:
        case = BUILDERS[name](threads=threads) if name in THREADED_CASES else BUILDERS[name]()
        check_parity(name, case.parity)
        times = time_interleaved({"tinydiff": case.tiny, "torch": case.torch}, repeats)
        tiny_s, torch_s = statistics.median(times["tinydiff"]), statistics.median(times["torch"])
        results["cases"][name] = r = {
            "what": case.what, "tinydiff_s": tiny_s, "torch_s": torch_s, "ratio": tiny_s / torch_s,
            "flops": case.flops, "tinydiff_gflops": case.flops / tiny_s / 1e9,
            "torch_gflops": case.flops / torch_s / 1e9,
            "parity": case.parity, "times": times,
        }
        parity = ", ".join(f"{k} {v:.1e}" for k, v in case.parity.items())
        print(f"{name:>16}  {tiny_s * 1e3:11.1f}  {torch_s * 1e3:9.1f}  {r['ratio']:5.2f}  {case.flops / 1e9:10.3f}  "
              f"{r['tinydiff_gflops']:12.1f}  {r['torch_gflops']:13.1f}  {parity}", flush=True)
    for name in cases:
        print(f"{name:>16}: {results['cases'][name]['what']}")
    results["load_average_after"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts to run (default: 1 2)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (median reported)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one thread count here
    parser.add_argument("--out", help=argparse.SUPPRESS)  # internal: where --one writes its results
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("bench_torch: PyTorch is not installed, nothing to compare against; skipped "
              "(install the optional extra: pip install 'tinydiff[torch]')")
        return
    if args.one is not None:
        Path(args.out).write_text(json.dumps(run_threads(args.one, args.cases, args.repeats)))
        return

    blas_env = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    print(f"PyTorch {torch.__version__}, NumPy {np.__version__}, {os.cpu_count()} CPUs; "
          f"OpenBLAS guard variables set: {', '.join(blas_env) or 'none'}; "
          f"malloc keeps freed memory (tinydiff.backend.FREED_MEMORY_KEPT, both libraries): "
          f"{'yes' if FREED_MEMORY_KEPT else 'no'}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            out = Path(tmp) / f"threads-{threads}.json"
            env = os.environ | {var: str(threads) for var in THREAD_VARIABLES}
            command = [sys.executable, __file__, "--one", str(threads), "--out", str(out),
                       "--repeats", str(args.repeats), "--cases", *args.cases]
            if subprocess.run(command, env=env).returncode:
                raise SystemExit(f"the run with {threads} thread(s) failed (see above)")
            results.append(json.loads(out.read_text()))

    print("\nratio tinydiff / PyTorch (median times; above 1: tinydiff is slower)")
    print(f"{'case':>16}  " + "  ".join(f"{r['threads']} thread(s)" for r in results))
    for name in args.cases:
        print(f"{name:>16}  " + "  ".join(f"{r['cases'][name]['ratio']:11.2f}" for r in results))
    for case, (label, target) in TARGETS.items():
        if case in args.cases:
            for r in results:
                ratio = r["cases"][case]["ratio"]
                print(f"{label}, {r['threads']} thread(s): tinydiff takes {ratio:.2f}× PyTorch's time "
                      f"(target on 2 cores: at most {target}×{', met' if ratio <= target else ', NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
