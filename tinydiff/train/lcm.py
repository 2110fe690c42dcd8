"""Stage 4 (optional): latent consistency distillation (LCM, Luo et al. 2023, Algorithm 1).

The trained latent U-Net (the *teacher*) needs 20 network calls on 2B rows (classifier-free
guidance) to draw B digits. Distillation trains a *student* U-Net whose consistency function
f(x, σ, w) (``diffusion.consistency``) jumps from any noise level straight to the end of the
teacher's guided ODE trajectory, so 1–4 calls on B rows suffice (``samplers.sample_lcm``).

One step (Luo et al. 2023, Algorithm 1, "latent consistency distillation"; symbols as there):

    z0, c ~ training latents and fresh captions            (the U-Net stage's data, latent_unet.py)
    t_{n+k} ~ U{1, …, t_max},  t_n = max(t_{n+k} − k, 0)    skip-step k: a k-timestep jump
    w ~ U[w_min, w_max]                                      the guidance scale, one per sample
    x_{n+k} = z0 + σ_{n+k} · ε                               (VE form of q(z_{t_{n+k}} | z0))
    x̂_n = DDIM(x_{n+k} → σ_n) with x̂0 = x̂0_∅ + w (x̂0_c − x̂0_∅)     the teacher's guided solve
    L = d(f_θ(x_{n+k}, σ_{n+k}, c, w), f_θ⁻(x̂_n, σ_n, c, w))         d: pseudo-Huber or L2
    θ ← AdamW(∇_θ L),   θ⁻ ← μ θ⁻ + (1 − μ) θ                        the target network, an EMA

Choices, and where they come from:

* **The timestep grid.** The paper draws n uniformly over all T timesteps with k = 20 for
  T = 1000 (its released code restricts starts to a 50-step DDIM grid instead); here too, every
  integer t_{n+k} up to ``t_max`` can start a step, so the student learns every σ a sampler may
  ask for. A start below k jumps straight to t = 0 (σ_min), where f(x, σ_min) = x exactly: the
  boundary anchors every chain of k-jumps (the released code clamps the same way). ``t_max`` is
  the last timestep with σ ≤ ``sigma_max``, the noise level the pipeline starts sampling from
  (14.6 = Stable Diffusion's σ_max, timestep 726 of the linear schedule): higher levels are never
  sampled from and are where the ε-predicting teacher is worst.
* **The teacher's solve** is one deterministic DDIM step (η = 0) from σ_{n+k} to σ_n, the
  paper's solver, computed by the samplers' own ``ddim_step`` with a per-sample σ. The teacher's
  conditional and unconditional (learned null context) passes run as one call on 2B rows, as the
  ``Denoiser`` does, and are mixed with each sample's own w (Ho & Salimans eq. 6 on x̂0).
* **w ~ U[1, 4]** in tinydiff's guidance convention x̂0 = x̂0_∅ + w(x̂0_c − x̂0_∅): w = 1 is
  the conditional model, and the pipeline's default 2.0 lies inside. (The paper's ω ∈ [2, 14] is
  w − 1 for Stable Diffusion's much larger guidance.)
* **The student** is a copy of the teacher with a guidance embedding (``UNetConfig.
  guidance_embedding``): sinusoids of w through a zero-initialised linear layer, added to the
  timestep sinusoids. A fresh student therefore equals the teacher's conditional prediction.
  It is always conditional: guidance is baked in, one call on B rows per step.
* **The loss** is the paper's code's pseudo-Huber d(a, b) = √((a − b)² + c²) − c per element with
  c = 0.001 (or L2), averaged; ``pseudo_huber_loss``.
* **The target network θ⁻** is the training loop's EMA with decay μ = 0.95 (the paper's). The
  loop saves it in every checkpoint (``ema.*``) and resumes it exactly; the step function keeps an
  identical copy (``train_loop`` does not hand its EMA out), updated with the same rule at the start
  of each step but the first of a run: the update the loop made after the previous step.

The shipped student is the online network θ (the checkpoint's "last" weights), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..backend import backend_of, get_xp, map_rows, to_device
from ..config import ConfigMixin
from ..diffusion.config import DiffusionConfig
from ..diffusion.consistency import ConsistencyFunction, x0_output_coefficient
from ..diffusion.denoiser import Denoiser
from ..diffusion.noise import append_dims
from ..diffusion.samplers import ddim_step
from ..io import load_checkpoint
from ..models.unet import UNet
from ..nn import no_grad
from ..nn.losses import mse_loss
from ..nn.optim import EMA
from .loop import LoopConfig, train_loop

CHECKPOINT_KIND = "lcm-train"
LOSSES = ("huber", "l2")
GUIDANCE_PARAMETER_PREFIX = "time_embedding.cond_proj."  # the student's only new parameters


@dataclass
class LCMConfig(ConfigMixin):
    """How the student is distilled (module docstring); recorded in the training checkpoints."""

    skip: int = 20  # k: one teacher DDIM step spans k training timesteps (the paper: 20 of 1000)
    w_min: float = 1.0  # guidance scales w ~ U[w_min, w_max] (tinydiff's convention: 1 = conditional)
    w_max: float = 4.0
    sigma_max: float = 14.6  # the highest noise level learned: where the pipeline starts sampling
    target_decay: float = 0.95  # μ of the target network θ⁻ ← μ θ⁻ + (1 − μ) θ (the paper's)
    loss: str = "huber"  # "huber" (the paper's code: pseudo-Huber) or "l2"
    huber_c: float = 0.001  # c of the pseudo-Huber loss (the paper's code)
    batch_size: int = 32  # latents per step

    def __post_init__(self):
        problems = []
        if isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 1:
            problems.append(f"skip must be an integer >= 1, got {self.skip!r}")
        if not 0 <= self.w_min <= self.w_max:
            problems.append(f"need 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if not self.sigma_max > 0:
            problems.append(f"sigma_max must be positive, got {self.sigma_max}")
        if not 0 <= self.target_decay < 1:
            problems.append(f"target_decay must lie in [0, 1), got {self.target_decay}")
        if self.loss not in LOSSES:
            problems.append(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if not self.huber_c > 0:
            problems.append(f"huber_c must be positive, got {self.huber_c}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise ValueError("invalid LCMConfig: " + "; ".join(problems))


def pseudo_huber_loss(pred, target, c: float):
    """L = (1/n) Σ (√((pred − target)² + c²) − c), n = number of elements (the LCM code's loss).

    dL/dpred = (1/n) (pred − target)/√((pred − target)² + c²): L2-like for |error| ≪ c, L1-like above.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pseudo_huber_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    xp = get_xp(pred, target)
    diff = pred - target
    root = xp.sqrt(diff * diff + c * c)
    n = diff.size
    return float((root - c).sum()) / n, diff / root / n


def consistency_loss(pred, target, config: LCMConfig):
    """The configured distance d(pred, target): (loss, dL/dpred)."""
    if config.loss == "huber":
        return pseudo_huber_loss(pred, target, config.huber_c)
    return mse_loss(pred, target)


def make_student(teacher: UNet, *, seed: int = 0) -> UNet:
    """A student U-Net: the teacher's config with ``guidance_embedding``, the teacher's weights,
    and the new guidance projection at zero (so it starts as the teacher's conditional model)."""
    weight = teacher.conv_in.weight.data
    student = UNet(replace(teacher.config, guidance_embedding=True), seed=seed).astype(weight.dtype)
    student.to(backend_of(weight))
    new = set(student.state_dict()) - set(teacher.state_dict())
    if not new or any(not k.startswith(GUIDANCE_PARAMETER_PREFIX) for k in new):
        raise ValueError(f"a student differs from its teacher only in {GUIDANCE_PARAMETER_PREFIX}*, got {sorted(new)}")
    student.load_state_dict(teacher.state_dict(), strict=False)  # every key but the guidance projection
    return student


def consistency_function(unet: UNet, schedule, prediction_type: str, context, w, *, threads: int | None = 1):
    """f(x, σ) of a student network for captions ``context`` (B, L, D) and guidance scales w (B,):
    c_skip·x + c_out·x̂0, x̂0 from one call ``unet(c_in·x, t, context, w=w)``."""
    def model(x_in, t, c):
        return map_rows(lambda x_, t_, c_, w_: unet(x_, t_, c_, w=w_), x_in, t, c, w, threads=threads)

    return ConsistencyFunction(Denoiser(model, schedule, prediction_type, context=context), schedule)


def guided_ddim_solve(teacher: UNet, schedule, prediction_type: str, x, sigma, sigma_next, w, context,
                      uncond_context, *, threads: int | None = 1):
    """The teacher's guided DDIM step from σ to σ' for every sample (σ, σ', w: (B,) float64 arrays).

    One teacher call on 2B rows [∅; c] through the ``Denoiser`` (unguided: it sees a batch of
    2B contexts), then x̂0 = x̂0_∅ + w (x̂0_c − x̂0_∅) with each sample's w and ``ddim_step``.
    """
    xp, batch = get_xp(x), x.shape[0]
    model = lambda x_in, t, c: map_rows(teacher, x_in, t, c, threads=threads)  # noqa: E731
    denoiser = Denoiser(model, schedule, prediction_type, context=xp.concatenate([uncond_context, context]))
    x0 = denoiser(xp.concatenate([x, x]), np.concatenate([sigma, sigma]))  # (2B, C, H, W)
    x0_uncond, x0_cond = x0[:batch], x0[batch:]

    def column(a):  # (B,) float64 → (B, 1, 1, 1) on x's device and dtype
        return append_dims(to_device(a, backend_of(x), dtype=x.dtype), x.ndim)

    x0_guided = x0_uncond + column(w) * (x0_cond - x0_uncond)
    return ddim_step(x, x0_guided, column(sigma), column(sigma_next))


def last_timestep(schedule, sigma_max: float) -> int:
    """t_max: the last training timestep whose σ does not exceed ``sigma_max`` (at least 1)."""
    return max(1, int(np.searchsorted(schedule.sigmas, sigma_max * (1 + 1e-9), side="right")) - 1)


def lcm_grads(student: UNet, teacher: UNet, target: EMA, latents, conditioning, config: LCMConfig,
              diffusion: DiffusionConfig, *, threads: int | None = 1):
    """The ``compute_grads(step, generator)`` of one distillation step (module docstring).

    ``target`` holds θ⁻ (an EMA of the student with decay μ, loaded from a checkpoint when
    resuming); the returned function updates it before every step but its first. ``latents``
    (N, C, H, W) on the student's device; ``conditioning.encode(indices, generator)`` gives the
    captions' context. ``threads`` splits the teacher's and the target's rows (no gradients) over
    CPU threads; the student's forward and backward run here.
    """
    schedule = diffusion.make_schedule()
    prediction_type = diffusion.prediction_type
    t_max = last_timestep(schedule, config.sigma_max)
    backend, dtype = backend_of(latents), latents.dtype
    n, b = latents.shape[0], config.batch_size
    target_net = UNet(student.config).astype(student.conv_in.weight.data.dtype).to(backend).eval()
    started = []  # empty until the first step has run

    def compute_grads(step, generator):
        if started:  # the loop updated its EMA after the previous step: do the same here
            target.update(student)
        started.append(step)
        idx = generator.integers(0, n, size=b)
        t_next = generator.integers(1, t_max + 1, size=b)  # t_{n+k}
        t_prev = np.maximum(t_next - config.skip, 0)  # t_n, clamped onto the boundary t = 0
        w_np = generator.uniform(config.w_min, config.w_max, size=b)
        noise = to_device(generator.standard_normal((b,) + latents.shape[1:]).astype(dtype), backend)
        context, _ = conditioning.encode(idx, generator)  # (B, L, D)
        sigma, sigma_prev = schedule.sigmas[t_next], schedule.sigmas[t_prev]  # (B,) float64
        w = to_device(w_np, backend, dtype=dtype)
        x = latents[to_device(idx, backend)] + append_dims(to_device(sigma, backend, dtype=dtype), 4) * noise

        with no_grad():
            x_prev = guided_ddim_solve(teacher, schedule, prediction_type, x, sigma, sigma_prev, w_np, context,
                                       teacher.null_context(b), threads=threads)
            target.copy_to(target_net)
            f_target = consistency_function(target_net, schedule, prediction_type, context, w, threads=threads)
            aim = f_target(x_prev, sigma_prev)

        f_student = consistency_function(student, schedule, prediction_type, context, w, threads=1)
        pred = f_student(x, sigma)  # the student keeps its caches for backward
        loss, dpred = consistency_loss(pred, aim, config)
        _, c_out = f_student.scalings(sigma, x)  # ∂f/∂x̂0 = c_out, ∂x̂0/∂F below: the chain to the output
        d_x0_d_output = append_dims(to_device(x0_output_coefficient(sigma, prediction_type), backend, dtype=dtype), 4)
        student.backward(dpred * c_out * d_x0_d_output)  # the text encoder is frozen: dcontext unused
        return loss, {"t_mean": float(t_next.mean()), "w_mean": float(w_np.mean())}

    return compute_grads


def distill(teacher: UNet, latents, conditioning, loop: LoopConfig, config: LCMConfig | None = None,
            diffusion: DiffusionConfig | None = None, *, checkpoint_path=None, resume: bool = False, callback=None,
            stop_at: int | None = None, threads: int | None = 1, seed: int = 0) -> dict:
    """Distil ``teacher`` into a consistency student on ``latents`` (N, C, H, W) with captions from
    ``conditioning`` (``encode(indices, generator) -> (context, mask)``).

    Returns ``train_loop``'s dict plus "student" (the online weights θ, to ship) and "target"
    (θ⁻'s EMA). ``loop.ema_decay`` is replaced by ``config.target_decay``: the loop's EMA is θ⁻.
    """
    config = config or LCMConfig()
    diffusion = diffusion or DiffusionConfig()
    loop = replace(loop, ema_decay=config.target_decay)
    teacher.eval()
    student = make_student(teacher, seed=seed)
    target = EMA(student, config.target_decay)
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        target.load_state_dict(load_checkpoint(checkpoint_path, kind=CHECKPOINT_KIND)[0])  # θ⁻ = the loop's EMA
    grads = lcm_grads(student, teacher, target, latents, conditioning, config, diffusion, threads=threads)
    result = train_loop(student, grads, loop, checkpoint_path=checkpoint_path, resume=resume, kind=CHECKPOINT_KIND,
                        model_config={"unet": student.config.to_dict(), "diffusion": diffusion.sampling_config().to_dict(),
                                      "lcm": config.to_dict()},
                        callback=callback, stop_at=stop_at)
    return {**result, "student": student, "target": target}


def train_lcm(teacher: UNet, vae, text_encoder, tokenizer, train_data, loop: LoopConfig,
              config: LCMConfig | None = None, diffusion: DiffusionConfig | None = None, **options) -> dict:
    """``distill`` on the VAE latents of ``train_data`` (CaptionedDigits) with fresh captions
    through the frozen text encoder, as the U-Net stage trains (latent_unet.py)."""
    from .latent_unet import CaptionConditioning

    latents = vae.encode_for_diffusion(train_data.images)  # (N, 4, 8, 8): the frozen VAE, once
    conditioning = CaptionConditioning(text_encoder, tokenizer, train_data)
    return distill(teacher, latents, conditioning, loop, config, diffusion, **options)
