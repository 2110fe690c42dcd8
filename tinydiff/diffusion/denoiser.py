"""Turn a VP-trained network into the denoiser D(x, σ) ≈ E[x0 | x] that every sampler uses.

Samplers work in the VE parametrisation x = x0 + σ·ε (EDM, k-diffusion). The network was trained
on VP inputs x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at integer timesteps. The two are the same point up to
a scale (chapters/references.md, "VP and VE"):

    σ² = (1 − ᾱ)/ᾱ   ⇔   ᾱ = 1/(1 + σ²),      x_t = √ᾱ · x = x/√(1 + σ²)

so the wrapper does, for each sample in the batch:

    1. c_in = 1/√(1 + σ²)                 input scaling (EDM Table 1, VP column)
    2. t = sigma_to_t(σ)                  continuous timestep, log σ interpolated between integers
    3. F = model(c_in · x, t, context)    network output of the trained prediction type
    4. x̂0 from F at x_t = c_in · x, ᾱ = c_in²  (noise.predicted_x0)

Step 4 written out in VE terms is D = c_skip · x + c_out · F with (EDM Table 1 style):

    prediction   c_skip          c_out               derivation
    'epsilon'    1               −σ                  x0 = (x_t − √(1−ᾱ) ε)/√ᾱ = x − σ ε
    'v'          1/(1 + σ²)      −σ/√(1 + σ²)        x0 = √ᾱ x_t − √(1−ᾱ) v, √(1−ᾱ) = σ c_in
    'sample'     0               1                   x0 = F

Classifier-free guidance (Ho & Salimans 2022). The conditional and unconditional passes run as
ONE model call on a batch of 2B (unconditional half first, as in diffusers), and are combined on
the x0 estimate:

    x̂0 = x̂0_uncond + w · (x̂0_cond − x̂0_uncond)

Because D is affine in F with the same c_skip, c_out for both halves, this equals guidance on
the network output (ε or v) followed by the conversion: c_skip x + c_out (F_u + w(F_c − F_u)) =
D_u + w(D_c − D_u). A negative prompt is simply a different unconditional context. w = 1 is the
conditional prediction (the unconditional pass is skipped); w = 0 is the unconditional one.

Guidance rescale (Lin et al. 2023, §3.4) pulls the guided estimate's standard deviation back
to that of the conditional one, per sample, over all non-batch dimensions:

    x̂0_rescaled = x̂0 · std(x̂0_cond)/std(x̂0),     x̂0_final = φ · x̂0_rescaled + (1 − φ) · x̂0

It is applied to the x0 estimate, the image whose over-exposure it corrects (as k-diffusion based
UIs do); diffusers applies the same formula to the ε/v output, which differs because a std ratio
is not preserved by the affine map from F to x0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backend import backend_of, get_xp, to_device, to_numpy
from .noise import append_dims, check_prediction_type, predicted_x0
from .schedules import NoiseSchedule, sigma_to_t


def rescale_guidance(guided, cond, phi: float):
    """Lin et al. §3.4: mix ``guided`` (B, …) with itself rescaled to the per-sample std of ``cond``."""
    xp = get_xp(guided, cond)
    axes = tuple(range(1, guided.ndim))  # every non-batch dimension
    ratio = xp.std(cond, axis=axes, keepdims=True) / xp.std(guided, axis=axes, keepdims=True)  # (B, 1, …, 1)
    return phi * (guided * ratio) + (1 - phi) * guided


@dataclass(frozen=True, eq=False)
class Denoiser:
    """D(x, σ) → x̂0 for a network ``model(x_in, t, context) -> prediction`` trained on ``schedule``.

    model            callable: x_in (B, C, H, W), t float (B,) continuous timesteps, context
                     (B, L, D) or None → output (B, C, H, W) of type ``prediction_type``
    context          conditional context (B or 1, L, D), or None for an unconditional model
    uncond_context   context of the unconditional pass (the empty or the negative prompt);
                     required when guidance_scale != 1
    guidance_scale   w: 1 = conditional only, 0 = unconditional only, > 1 = guided
    guidance_rescale φ in [0, 1]: 0 = off, 0.7 as suggested by Lin et al.
    on_model_call    optional hook called after every model call with a dict
                     {"x_in", "t", "context", "output"}, to watch or count calls

    Calling it: ``denoiser(x, sigma)`` with x (B, C, H, W) and sigma a float or a (B,) array.
    Configuration only, no state: change a setting with ``dataclasses.replace``.
    """

    model: Callable
    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    context: Any = None
    uncond_context: Any = None
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    on_model_call: Callable[[dict], None] | None = None

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must lie in [0, 1]; got {self.guidance_rescale}")
        if self.guided and (self.context is None or self.uncond_context is None):
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs both context and uncond_context "
                "(use guidance_scale=1 for unguided sampling)"
            )

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (any scale other than 1)."""
        return self.guidance_scale != 1

    def _model(self, x_in, t, context):
        output = self.model(x_in, t, context)
        if self.on_model_call is not None:
            self.on_model_call({"x_in": x_in, "t": t, "context": context, "output": output})
        return output

    def __call__(self, x, sigma):
        xp = get_xp(x)
        batch, backend = x.shape[0], backend_of(x)

        def per_sample(value):  # float or (B,) → (B,) on x's device and dtype
            return xp.zeros(batch, dtype=x.dtype) + to_device(value, backend, dtype=x.dtype)

        sigma = to_numpy(sigma)
        t = per_sample(sigma_to_t(self.schedule, sigma))  # (B,)
        alpha_bar = append_dims(per_sample(1 / (1 + sigma**2)), x.ndim)  # ᾱ = 1/(1 + σ²), (B, 1, 1, 1)
        x_in = xp.sqrt(alpha_bar) * x  # c_in · x = x_t

        if not self.guided:
            output = self._model(x_in, t, _batched(self.context, batch, xp))
            return predicted_x0(output, x_in, alpha_bar, self.prediction_type)

        # One model call on 2B samples, [unconditional; conditional]: (2B, C, H, W) throughout.
        def twice(a):
            return xp.concatenate([a, a])

        context = xp.concatenate([_batched(self.uncond_context, batch, xp), _batched(self.context, batch, xp)])
        output = self._model(twice(x_in), twice(t), context)
        x0 = predicted_x0(output, twice(x_in), twice(alpha_bar), self.prediction_type)
        x0_uncond, x0_cond = x0[:batch], x0[batch:]  # (B, C, H, W) each
        x0_guided = x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)
        if self.guidance_rescale > 0:
            x0_guided = rescale_guidance(x0_guided, x0_cond, self.guidance_rescale)
        return x0_guided


def _batched(context, batch: int, xp):
    """A context with leading dimension ``batch``: (B, L, D) as is, (1, L, D) repeated, None as None."""
    if context is None or context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return xp.repeat(context, batch, axis=0)  # (1, L, D) → (B, L, D)
    raise ValueError(f"context has batch {context.shape[0]}, expected {batch} or 1")
