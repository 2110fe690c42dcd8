"""Optimisation: AdamW, gradient-norm clipping, warm-up + cosine learning rate, EMA of weights.

Every piece of state (moments, step counts, EMA weights) can be saved and restored, so a resumed
run continues exactly where it stopped.
"""

from __future__ import annotations

import math

from ..backend import backend_of, get_xp, to_device, to_numpy
from .module import Module, Parameter


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2).

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
        m̂ = m / (1 − β₁ᵗ),       v̂ = v / (1 − β₂ᵗ)
        θ ← θ − lr · (m̂ / (√v̂ + ε) + λ θ)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("AdamW got no parameters to optimise")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.m = [get_xp(p.data).zeros_like(p.data) for p in self.params]
        self.v = [get_xp(p.data).zeros_like(p.data) for p in self.params]

    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.step_count += 1
        bias1 = 1.0 - b1**self.step_count
        bias2 = 1.0 - b2**self.step_count
        for p, m, v in zip(self.params, self.m, self.v):
            xp = get_xp(p.data)
            g = p.grad
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay:
                p.data -= (lr * self.weight_decay) * p.data
            p.data -= (lr / bias1) * m / (xp.sqrt(v / bias2) + self.eps)

    def state_dict(self) -> dict:
        state = {"step_count": self.step_count}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m.{i}"] = to_numpy(m).copy()
            state[f"v.{i}"] = to_numpy(v).copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        if len([k for k in state if k.startswith("m.")]) != len(self.params):
            raise ValueError("optimizer state does not match the model's parameters (different model?)")
        self.step_count = int(state["step_count"])
        for i, p in enumerate(self.params):
            # copies: step() updates the moments in place and must not write into ``state``
            self.m[i] = to_device(state[f"m.{i}"], backend_of(p.data), dtype=p.data.dtype).copy()
            self.v[i] = to_device(state[f"v.{i}"], backend_of(p.data), dtype=p.data.dtype).copy()


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients by min(1, max_norm/‖g‖) where ‖g‖ is the global L2 norm; returns ‖g‖."""
    params = list(params)
    total = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in params))
    if math.isfinite(total) and total > max_norm:
        factor = max_norm / (total + 1e-12)
        for p in params:
            p.grad *= factor
    return total


def warmup_cosine_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's weights: θ̄ ← β·θ̄ + (1 − β)·θ after every step.

    With a constant β (``decay``) the average forgets slowly from the start: after t steps the
    random initial weights still hold β^t of it (0.999^3000 ≈ 5%) and its mean lags the live
    weights by about 1/(1 − β) steps (1,000 at 0.999), so early in a run the average is worse than
    the weights it averages. With ``power`` γ, the decay grows with the step count t = 1, 2, …:

        β_t = min(decay, (1 − 1/t)^(γ+1))          (Karras et al. 2024, Sec. 3: the power-function EMA profile)

    β_1 = 0 (the first update copies the weights), and the average weighs step τ ≤ t in proportion
    to τ^γ: it always covers the same fraction of the run so far, and its mean lags the live weights
    by t/(γ + 2) steps. ``decay`` caps β_t, so the averaging window stops growing there.

    Samples are usually drawn with the averaged weights (``copy_to(model)`` on a copy of the
    model, or ``swapped(model)`` for a temporary swap).
    """

    def __init__(self, model: Module, decay: float = 0.999, power: float | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if power is not None and not power > 0:
            raise ValueError(f"EMA power γ must be positive (the average weighs step τ by τ^γ), got {power}")
        self.decay, self.power = decay, power
        self.shadow = {name: p.data.copy() for name, p in model.named_parameters()}

    def decay_at(self, step: int | None) -> float:
        """β for the ``step``-th update (1-based); a constant ``decay`` ignores the step."""
        if self.power is None:
            return self.decay
        if step is None or step < 1:
            raise ValueError(f"a power-function EMA needs the update's step t ≥ 1, got {step}")
        return min(self.decay, (1.0 - 1.0 / step) ** (self.power + 1.0))

    def update(self, model: Module, step: int | None = None) -> None:
        """θ̄ ← β θ̄ + (1 − β) θ, with β = ``decay_at(step)`` (step: this update's 1-based number)."""
        d = self.decay_at(step)
        for name, p in model.named_parameters():
            s = self.shadow[name]
            s *= d
            s += (1.0 - d) * p.data

    def copy_to(self, model: Module) -> None:
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {f"ema.{k}": to_numpy(v).copy() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.shadow.items():
            s[...] = to_device(state[f"ema.{k}"], backend_of(s), dtype=s.dtype)
