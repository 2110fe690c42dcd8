"""Training a denoiser: DDPM's Algorithm 1 with conditioning dropout, for pixels or latents.

One step (Ho et al. 2020, Algorithm 1; the prediction target and weighting generalised):

    x0 ~ data,  t ~ U{0, …, T−1},  ε ~ N(0, I)
    x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε                              (eq. 4, noise.q_sample)
    context = condition(x0's labels or captions); with probability p it is replaced by the
              learned null context, so one network learns p(x | c) and p(x) (Ho & Salimans 2022)
    L = mean_b w(t_b) ‖F(x_t, t, context) − target‖²          (eq. 14 for target = ε, w = 1)

then backward through the U-Net, and on into whatever produced the context (a label embedding,
trained jointly; a frozen text encoder gets nothing) and into the null context.

A *conditioning* is any object with

    encode(indices, generator) -> (context (B, L, D), mask (B, L) or None)
    backward(dcontext)            add gradients to its own trainable parameters, if any

so the same step trains the class-conditional pixel model and the text-conditional latent model.

**The step, read first:** ``draw_batch`` (the draws of lines 2–4 of Algorithm 1, and the
conditioning) and ``reference_step`` (line 5: forward, loss, backward, in one process).

**Several cores.** With ``threads`` > 1 (NumPy only) the same batch is cut into that many blocks
of rows, and this process runs one block while worker processes run the others
(``parallel.ParallelDiffusionStep``). The loss is a mean over the whole batch, so each block's
loss and gradient are scaled by its share of the rows, and the result equals the reference step
up to float rounding (tested). Under ``backend.use_reference()`` the reference step runs whatever
``threads`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..backend import backend_of, reference_enabled, to_device
from ..diffusion.config import DiffusionConfig
from ..diffusion.noise import alphas_cumprod_at, check_prediction_type, loss_weights, prediction_target, q_sample
from ..models.unet import UNet
from ..nn import Embedding, mse_loss
from .parallel import ParallelDiffusionStep


@dataclass
class DiffusionTrainingConfig(DiffusionConfig):
    """The noise process (``DiffusionConfig``: schedule, T, prediction type) and how to train on it.

    Only the inherited fields are saved with a finished pipeline (``sampling_config()``); the
    training ones below are recorded in training checkpoints.
    """

    loss_weighting: str = "plain"  # plain (DDPM eq. 14) or min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # γ of min-SNR weighting
    cond_drop_prob: float = 0.1  # probability of training a sample on the null context (for CFG)
    batch_size: int = 64  # images per step


class LabelConditioning:
    """Class labels as a one-token context: context_b = E[label_b], E an Embedding trained jointly."""

    def __init__(self, embedding: Embedding, labels: np.ndarray):
        self.embedding, self.labels = embedding, labels

    def encode(self, indices, generator):
        ids = to_device(self.labels[indices].astype(np.int64), backend_of(self.embedding.weight.data))
        return self.embedding(ids)[:, None, :], None  # (B, D) → (B, 1, D): a sequence of one token

    def backward(self, dcontext):
        self.embedding.backward(dcontext[:, 0, :])


class DiffusionBatch(NamedTuple):
    """What one step trains on: the network's inputs, the regression target and its weights."""

    indices: np.ndarray  # (B,) rows of the training set (x0's labels or captions)
    x_t: object  # (B, C, H, W) the noised images √ᾱ_t x0 + √(1 − ᾱ_t) ε
    t: object  # (B,) their timesteps, as floats for the network
    target: object  # (B, C, H, W) what the network should predict (ε, v or x0)
    weights: object  # (B,) the loss weight w(t_b) of each row
    context: object  # (B, L, D) the conditioning's context (null where dropped), or None
    mask: object  # (B, L) its key mask, or None
    dropped: np.ndarray | None  # (B,) bool: rows trained on the null context (None: unconditional)


def draw_batch(unet: UNet, data, schedule, config: DiffusionTrainingConfig, conditioning, generator) -> DiffusionBatch:
    """Lines 2–4 of Algorithm 1, and the conditioning: x0, t, ε and the dropped rows, drawn from
    ``generator`` in this fixed order (so that a run is reproducible and resumes exactly)."""
    backend, dtype = backend_of(data), data.dtype
    b = config.batch_size
    idx = generator.integers(0, data.shape[0], size=b)  # x0 ~ data
    t = generator.integers(0, schedule.num_timesteps, size=b)  # t ~ U{0, …, T−1}
    noise = to_device(generator.standard_normal((b,) + data.shape[1:]).astype(dtype), backend)  # ε ~ N(0, I)
    dropped = generator.random(b) < config.cond_drop_prob
    x0 = data[to_device(idx, backend)]
    x_t = q_sample(x0, t, noise, schedule)  # eq. 4
    alpha_bar = alphas_cumprod_at(schedule, t, x0)  # (B, 1, 1, 1)
    target = prediction_target(x0, noise, alpha_bar, config.prediction_type)
    weights = to_device(loss_weights(schedule, t, config.prediction_type, config.loss_weighting,
                                     config.min_snr_gamma), backend, dtype=dtype)
    context = mask = None
    if conditioning is not None:
        context, mask = conditioning.encode(idx, generator)
        if config.cond_drop_prob > 0:
            context, mask = unet.replace_with_null_context(context, mask, to_device(dropped, backend))
    return DiffusionBatch(idx, x_t, to_device(t.astype(dtype), backend), target, weights, context, mask,
                          dropped if conditioning is not None else None)


def context_backward(unet: UNet, conditioning, batch: DiffusionBatch, dcontext, config: DiffusionTrainingConfig):
    """Send the context's gradient on: the dropped rows' part to the null context, the others'
    to the conditioning (a label embedding trained jointly; a frozen text encoder ignores it)."""
    if conditioning is None:
        return
    if config.cond_drop_prob > 0:
        dcontext = unet.null_context_backward(dcontext, to_device(batch.dropped, backend_of(dcontext)))
    conditioning.backward(dcontext)


def reference_step(unet: UNet, batch: DiffusionBatch, conditioning, config: DiffusionTrainingConfig) -> float:
    """Line 5 of Algorithm 1 in one process: L = mean_b w(t_b) ‖F(x_t, t, context) − target‖²
    (eq. 14 for target = ε, w = 1), and its gradient added into every parameter's ``.grad``.
    Returns the loss."""
    pred = unet(batch.x_t, batch.t, batch.context, batch.mask)
    loss, dpred = mse_loss(pred, batch.target, batch.weights)
    _, dcontext = unet.backward(dpred)
    context_backward(unet, conditioning, batch, dcontext, config)
    return loss


def diffusion_grads(unet: UNet, data, config: DiffusionTrainingConfig, conditioning=None, *, threads: int = 1):
    """The ``compute_grads(step, generator)`` for ``train_loop``: one step of Algorithm 1,
    ``draw_batch`` then ``reference_step`` (or its split over cores).

    ``data`` is the whole training set x0 (N, C, H, W) on the model's device (float32, pixels in
    [−1, 1] or scaled latents); batches, timesteps, noise and dropout are drawn from ``generator``
    on the CPU, so a run is reproducible on either backend and resumes exactly. ``threads``: CPU
    cores sharing each batch, this process and ``threads`` − 1 workers (see the module
    docstring); 1 on CuPy whatever is asked. The workers start at the first step and stop when
    the returned function is garbage-collected, or at once with its ``close()``.
    """
    check_prediction_type(config.prediction_type)
    if conditioning is not None and not unet.config.learned_null_context and config.cond_drop_prob > 0:
        raise ValueError("conditioning dropout needs a UNet built with learned_null_context=True")
    schedule = config.make_schedule()
    blocks = min(threads, config.batch_size) if backend_of(data) == "numpy" else 1
    parallel = ParallelDiffusionStep(unet, blocks) if blocks > 1 else None

    def compute_grads(step, generator):
        batch = draw_batch(unet, data, schedule, config, conditioning, generator)
        if parallel is None or reference_enabled():
            loss = reference_step(unet, batch, conditioning, config)
        else:  # the same, with the rows split over this process and the workers
            loss, dcontext = parallel(batch.x_t, batch.t, batch.target, batch.weights, batch.context, batch.mask)
            context_backward(unet, conditioning, batch, dcontext, config)
        return loss, {"dropped": int(batch.dropped.sum()) if batch.dropped is not None else 0}

    compute_grads.close = lambda: parallel is not None and parallel.close()
    return compute_grads
