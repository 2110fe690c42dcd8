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

**Several cores.** With ``threads`` > 1 (NumPy only) the batch is cut into that many blocks of
rows. This process runs forward and backward on the first block while worker processes run the
others, each on its own replica of the U-Net that shares the weights (``parallel.GradientWorkers``,
which says why processes and not Python threads); the replicas' gradients are then added into the
U-Net's. The loss is a mean over the whole batch, so each block's loss and gradient are scaled by
its share of the rows, and the result equals the one-core step up to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import backend_of, get_xp, row_blocks, to_device
from ..diffusion.config import DiffusionConfig
from ..diffusion.noise import alphas_cumprod_at, check_prediction_type, loss_weights, prediction_target, q_sample
from ..models.unet import UNet
from ..nn import Embedding, mse_loss
from .parallel import GradientWorkers


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


def block_grads(unet: UNet, x_t, t, target, weights, context, mask, share: float):
    """Forward and backward of one block of a batch's rows, whose ``share`` of the rows scales
    its loss (a mean over the block) to its part of the batch's mean. Returns (loss part, dcontext)."""
    pred = unet(x_t, t, context, mask)
    loss, dpred = mse_loss(pred, target, weights)
    _, dcontext = unet.backward(dpred * share)
    return loss * share, dcontext


def diffusion_grads(unet: UNet, data, config: DiffusionTrainingConfig, conditioning=None, *, threads: int = 1):
    """The ``compute_grads(step, generator)`` for ``train_loop``: one step of Algorithm 1.

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
    backend, dtype = backend_of(data), data.dtype
    n, b = data.shape[0], config.batch_size
    blocks = row_blocks(b, threads if backend == "numpy" else 1)
    workers = []  # the GradientWorkers, once started

    def run_blocks(*arrays):
        """block_grads on each block of rows: here alone, or here and in the workers at once."""
        per_block = [tuple(None if a is None else a[rows] for a in arrays) + ((rows.stop - rows.start) / b,)
                     for rows in blocks]
        if len(blocks) == 1:
            return [block_grads(unet, *per_block[0])]
        if not workers or workers[0].closed:  # the first step, or the one after an interrupted step
            workers[:] = [GradientWorkers(unet, len(blocks) - 1)]
        return workers[0].run(block_grads, per_block)

    def compute_grads(step, generator):
        idx = generator.integers(0, n, size=b)
        t = generator.integers(0, schedule.num_timesteps, size=b)
        noise = to_device(generator.standard_normal((b,) + data.shape[1:]).astype(dtype), backend)
        dropped_np = generator.random(b) < config.cond_drop_prob
        x0 = data[to_device(idx, backend)]
        x_t = q_sample(x0, t, noise, schedule)
        alpha_bar = alphas_cumprod_at(schedule, t, x0)  # (B, 1, 1, 1)
        target = prediction_target(x0, noise, alpha_bar, config.prediction_type)
        weights = to_device(loss_weights(schedule, t, config.prediction_type, config.loss_weighting,
                                         config.min_snr_gamma), backend, dtype=dtype)

        context = mask = None
        if conditioning is not None:
            context, mask = conditioning.encode(idx, generator)
            dropped = to_device(dropped_np, backend)
            if config.cond_drop_prob > 0:
                context, mask = unet.replace_with_null_context(context, mask, dropped)
        t_in = to_device(t.astype(dtype), backend)
        results = run_blocks(x_t, t_in, target, weights, context, mask)
        loss = sum(part for part, _ in results)
        if conditioning is not None:
            dcontext = get_xp(x_t).concatenate([d for _, d in results])  # (B, L, D)
            if config.cond_drop_prob > 0:
                dcontext = unet.null_context_backward(dcontext, dropped)
            conditioning.backward(dcontext)
        return loss, {"dropped": int(dropped_np.sum()) if conditioning is not None else 0}

    compute_grads.close = lambda: workers and workers.pop().close()
    return compute_grads
