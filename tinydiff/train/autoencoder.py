"""Stage 2: the KL-regularised autoencoder on MNIST digits (Rombach et al. 2022, §3).

One step, written in ``compute_grads``:

1. take the next B training digits x (each epoch is a fresh shuffle of the training split);
2. draw ε ~ N(0, I) of the latent's shape with the loop's generator (on the CPU, then moved to
   the device: a seed fixes the run on either backend);
3. (x̂, μ, log σ²) = model(x, ε); loss = mean (x̂ − x)² + β·KL (``vae_loss``); model.backward.

The shared ``train_loop`` does the rest: AdamW, gradient clipping, EMA, atomic checkpoints,
exact resume, NaN guard. The held-out test split (``train_test_split``) is never seen here; the
reconstruction PSNR is measured on it (``tinydiff.metrics.evaluate_autoencoder``).

When the run reaches ``total_steps``, the latent scale s = 1/std(μ) (``fit_scaling_factor``) is
computed on the training digits, once for the last weights and once for the EMA weights (the
two encoders differ slightly, and so do their latent scales), and both are written into the
checkpoint's header: ``load_autoencoder`` gives back a model whose ``config.scaling_factor``
belongs to the weights it loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..backend import backend_of, randn, to_device
from ..data.mnist import load_mnist, step_batches, to_model_range, train_test_split
from ..io import load_checkpoint, save_checkpoint
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL, vae_loss
from .loop import LoopConfig, checkpoint_weights, train_loop

CHECKPOINT_KIND = "vae-train"


def load_digit_splits(path=None, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) digits in the model's range: float32 (N, 1, 32, 32) in [−1, 1], on the CPU."""
    images, _ = load_mnist(path)
    train_idx, test_idx = train_test_split(len(images), seed=seed)
    return to_model_range(images[train_idx]), to_model_range(images[test_idx])


def default_loop(total_steps: int = 600) -> LoopConfig:
    """The loop settings used for the bundled digits (600 steps of 32 digits: about two epochs).

    No weight decay (the KL term already keeps the code in check). EMA decay 0.99 averages over
    the last ~100 steps: in so short a run a slower average would still hold weights from the
    first, high-loss steps.
    """
    return LoopConfig(total_steps=total_steps, lr=2e-3, warmup_steps=50, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.99, checkpoint_every=200)


def train_autoencoder(
    config: AutoencoderConfig | None = None,
    loop: LoopConfig | None = None,
    *,
    batch_size: int = 32,
    images: np.ndarray | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
) -> tuple[AutoencoderKL, dict]:
    """Train an AutoencoderKL on ``images`` (default: the bundled training split); returns
    (model, train_loop's result).

    The model holds the last weights (the EMA weights are in ``result["ema"]`` and in the
    checkpoint; ``load_autoencoder`` uses them by default). If the run finished (not cut short
    by ``stop_at``), ``model.config.scaling_factor`` is set and ``result["scaling_factors"]``
    holds {"last": s, "ema": s}. ``callback`` receives train_loop's per-step dict plus the two
    loss terms ``rec`` and ``kl``. A resumed run must use the same ``batch_size`` and images to
    continue exactly.
    """
    config = AutoencoderConfig.from_dict((config or AutoencoderConfig()).to_dict())  # a copy we may update
    config.scaling_factor = None  # fitted again at the end, for these weights
    loop = loop or default_loop()
    images = images if images is not None else load_digit_splits()[0]
    model = AutoencoderKL(config, seed=loop.seed)
    backend, dtype = backend_of(model.encoder.conv_in.weight.data), model.encoder.conv_in.weight.data.dtype
    batch_at = step_batches(len(images), batch_size, loop.seed + 1)

    def compute_grads(step: int, generator: np.random.Generator) -> tuple[float, dict]:
        idx = batch_at(step)  # (B,)
        x = to_device(images[idx], backend, dtype)  # (B, 1, 32, 32)
        eps = randn(generator, (len(idx),) + config.latent_shape, dtype=dtype, backend=backend)  # (B, 4, 8, 8)
        x_hat, mean, logvar = model(x, eps)
        loss, grads, logs = vae_loss(x, x_hat, mean, logvar, config.kl_weight)
        model.backward(*grads)
        return loss, logs

    model_config = {"autoencoder": config.to_dict()}
    result = train_loop(model, compute_grads, loop, checkpoint_path=checkpoint_path, resume=resume,
                        kind=CHECKPOINT_KIND, model_config=model_config, callback=callback, stop_at=stop_at)
    if stop_at is None or stop_at >= loop.total_steps:
        result["scaling_factors"] = _fit_scaling_factors(model, result["ema"], images)
        if checkpoint_path is not None:
            arrays, header = load_checkpoint(checkpoint_path, kind=CHECKPOINT_KIND)
            save_checkpoint(checkpoint_path, arrays, kind=CHECKPOINT_KIND, extra=header["extra"],
                            config=model_config | {"scaling_factors": result["scaling_factors"]})
    return model, result


def _fit_scaling_factors(model: AutoencoderKL, ema, images) -> dict[str, float]:
    """{"last": s, "ema": s}: 1/std(μ) over ``images`` for the last and the EMA weights (the
    model keeps the last weights and their s; "ema" is absent without an EMA)."""
    factors = {"last": model.fit_scaling_factor(images)}
    if ema is not None:
        averaged = AutoencoderKL(AutoencoderConfig.from_dict(model.config.to_dict()))
        averaged.to(backend_of(model.encoder.conv_in.weight.data)).astype(model.encoder.conv_in.weight.data.dtype)
        ema.copy_to(averaged)
        factors["ema"] = averaged.fit_scaling_factor(images)
    return factors


def load_autoencoder(path: str | Path, *, weights: str = "ema") -> AutoencoderKL:
    """Rebuild the autoencoder from a ``train_autoencoder`` checkpoint, in eval mode, with the
    scaling factor fitted for those weights (None if the run was not finished).

    weights: "ema" (the exponential moving average, the better model) or "last".
    """
    arrays, header = load_checkpoint(path, kind=CHECKPOINT_KIND)
    state = checkpoint_weights(arrays, weights, path=path)
    config = AutoencoderConfig.from_dict(header["config"]["autoencoder"])
    config.scaling_factor = header["config"].get("scaling_factors", {}).get(weights)
    model = AutoencoderKL(config)
    model.load_state_dict(state)
    return model.eval()
