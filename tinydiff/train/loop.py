"""The training loop every stage shares: step, guard, clip, update, average, checkpoint, resume.

A stage (CLIP, VAE, U-Net) supplies only ``compute_grads(step, generator) -> (loss, logs)``,
which runs one forward and backward pass on a batch it draws with ``generator`` and leaves the
gradients in the parameters' ``.grad``. This loop owns everything else:

    for step in range(start, total_steps):
        zero grads → loss = compute_grads(step, generator)
        NaN/Inf guard (loss and gradient norm) → clip ‖g‖ → lr(step) → AdamW → EMA
        every ``checkpoint_every`` steps (and at the end): atomic checkpoint

A checkpoint holds the model, the optimiser moments, the EMA weights, the step, the loss history
and the generator's exact state, so ``resume=True`` continues bit for bit where the last
checkpoint left off: N steps + resume + N steps equals 2N steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..backend import rng as make_rng
from ..io import CheckpointError, load_checkpoint, save_checkpoint
from ..nn.module import Module, to_state_arrays
from ..nn.optim import EMA, AdamW, clip_grad_norm, warmup_cosine_lr


WEIGHT_PREFIXES = {"last": "model.", "ema": "ema."}  # where a checkpoint keeps each set of weights


def checkpoint_weights(arrays: dict, weights: str = "ema", *, path=None) -> dict:
    """The state dict of one weight set ("ema": the moving average, "last": the final weights)
    from a ``train_loop`` checkpoint's arrays, prefixes stripped."""
    if weights not in WEIGHT_PREFIXES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_PREFIXES)}, got {weights!r}")
    prefix = WEIGHT_PREFIXES[weights]
    state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path or 'the checkpoint'} holds no {weights!r} weights "
                         "(was it trained with ema_decay=None?); use weights='last'")
    return state


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint is kept untouched."""


@dataclass
class LoopConfig:
    total_steps: int  # optimisation steps in the whole run (resumed runs count from the checkpoint)
    lr: float = 1e-3  # peak learning rate after warm-up
    warmup_steps: int = 100  # linear warm-up from 0
    min_lr: float = 0.0  # cosine decay floor at total_steps
    weight_decay: float = 0.0  # AdamW's decoupled weight decay λ
    betas: tuple = (0.9, 0.999)  # AdamW's moment decay rates
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    ema_decay: float | None = 0.999  # None disables the EMA copy
    ema_power: float | None = None  # γ: β_t = min(ema_decay, (1 − 1/t)^(γ+1)) (nn.optim.EMA); None: β = ema_decay
    checkpoint_every: int = 500  # steps between atomic checkpoints (also written at the end)
    seed: int = 0  # seeds the generator that draws batches, timesteps and noise


def _rng_state_to_json(generator: np.random.Generator) -> dict:
    return generator.bit_generator.state  # plain dict of ints and strings: JSON-safe


def _generator_from_state(state: dict) -> np.random.Generator:
    generator = make_rng()
    if generator.bit_generator.state["bit_generator"] != state["bit_generator"]:
        raise CheckpointError(f"checkpoint generator is {state['bit_generator']}, expected PCG64")
    generator.bit_generator.state = state
    return generator


def train_loop(
    model: Module,
    compute_grads: Callable[[int, np.random.Generator], tuple[float, dict]],
    loop: LoopConfig,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    kind: str = "train-state",
    model_config: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
) -> dict:
    """Train ``model`` up to ``loop.total_steps`` steps; returns {"history", "ema", "optimizer"}.

    ``callback`` receives {"step", "total_steps", "loss", "lr", "grad_norm", **logs} after every
    step (the CLI draws progress bars from it; the library prints nothing). An interrupt
    (Ctrl-C, a kill) loses only the steps since the last checkpoint. ``stop_at`` ends the run
    early after that many steps (with a checkpoint), as if interrupted, keeping the schedule of
    ``total_steps``: the run can be resumed later.
    """
    params = model.parameters()
    optimizer = AdamW(params, lr=loop.lr, betas=loop.betas, weight_decay=loop.weight_decay)
    ema = EMA(model, loop.ema_decay, power=loop.ema_power) if loop.ema_decay is not None else None
    generator = make_rng(loop.seed)
    history: list[float] = []
    start = 0

    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        arrays, header = load_checkpoint(checkpoint_path, kind=kind)
        model.load_state_dict(checkpoint_weights(arrays, "last", path=checkpoint_path))
        optimizer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("optim.")}
                                  | {"step_count": header["extra"]["optimizer_steps"]})
        if ema is not None:
            ema.load_state_dict({k: v for k, v in arrays.items() if k.startswith("ema.")})
        generator = _generator_from_state(header["extra"]["rng_state"])
        history = list(header["extra"]["history"])
        start = int(header["extra"]["step"])

    def save(step: int) -> None:
        if checkpoint_path is None:
            return
        arrays = {f"model.{k}": v for k, v in to_state_arrays(model).items()}
        optim_state = optimizer.state_dict()
        arrays.update({f"optim.{k}": v for k, v in optim_state.items() if k != "step_count"})
        if ema is not None:
            arrays.update(ema.state_dict())
        extra = {
            "step": step,
            "optimizer_steps": optim_state["step_count"],
            "rng_state": _rng_state_to_json(generator),
            "history": history,
            "loop": {k: getattr(loop, k) for k in loop.__dataclass_fields__},
        }
        save_checkpoint(checkpoint_path, arrays, kind=kind, config=model_config, extra=extra)

    model.train()
    end = loop.total_steps if stop_at is None else min(stop_at, loop.total_steps)
    for step in range(start, end):
        model.zero_grad()
        loss, logs = compute_grads(step, generator)
        grad_norm = clip_grad_norm(params, loop.grad_clip if loop.grad_clip else math.inf)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"training diverged at step {step}: loss={loss}, gradient norm={grad_norm}. "
                f"The last good checkpoint ({checkpoint_path}) was kept; lower the learning rate "
                f"(now {loop.lr}) or check the data, then resume."
            )
        lr = warmup_cosine_lr(step, base_lr=loop.lr, total_steps=loop.total_steps,
                              warmup_steps=loop.warmup_steps, min_lr=loop.min_lr)
        optimizer.step(lr)
        if ema is not None:
            ema.update(model, step=optimizer.step_count)  # t = 1, 2, … over the whole (resumed) run
        history.append(float(loss))
        done = step + 1
        if callback is not None:
            callback({"step": done, "total_steps": loop.total_steps, "loss": float(loss), "lr": lr,
                      "grad_norm": grad_norm, **logs})
        if done % loop.checkpoint_every == 0 or done == end:
            save(done)
    return {"history": history, "ema": ema, "optimizer": optimizer}
