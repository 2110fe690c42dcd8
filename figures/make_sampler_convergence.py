"""Figure: error of each deterministic sampler against the exact ODE solution, vs number of steps.

Data N(μ, s²) has the ideal denoiser D(x, σ) = μ + s²/(s² + σ²)·(x − μ), and the probability-flow
ODE dx/dσ = (x − D)/σ has the closed-form solution x(σ) = μ + (x(σ0) − μ)·√(s² + σ²)/√(s² + σ0²).
Each sampler walks n Karras steps from σ_max to 0; the RMS distance of its output from x(0),
on a log-log plot, is a line of slope −order (Euler and DDIM: 1; Heun and DPM-Solver++ 2M: 2).
The x axis counts steps, not denoiser calls: Heun makes two calls per step (one on the last).

Run from the repository root:  python figures/make_sampler_convergence.py
Writes figures/sampler_convergence.png and prints the fitted orders.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tinydiff.diffusion import get_sampler, karras_sigmas  # noqa: E402

MU, S = 0.3, 0.5  # the data distribution N(μ, s²)
SIGMA_MIN, SIGMA_MAX = 0.002, 20.0
STEPS = np.array([8, 16, 32, 64, 128, 256])
# name → (marker, line style); DDIM with η = 0 is the Euler step in σ-space, so its line lies on Euler's.
SAMPLERS = {"euler": ("o", "-"), "ddim": ("s", "--"), "heun": ("D", "-"), "dpmpp_2m": ("^", "-")}
OUT = Path(__file__).with_name("sampler_convergence.png")


def denoiser(x, sigma):
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_solution(x, sigma_from, sigma_to):
    return MU + (x - MU) * np.sqrt(S**2 + sigma_to**2) / np.sqrt(S**2 + sigma_from**2)


def errors(name, x_start):
    """RMS error of the sampler's output for each number of steps in STEPS."""
    exact = exact_solution(x_start, SIGMA_MAX, 0.0)
    sampler = get_sampler(name)
    outputs = [sampler(denoiser, x_start, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)) for n in STEPS]
    return np.array([np.sqrt(np.mean((out - exact) ** 2)) for out in outputs])


def main():
    x_start = MU + np.linspace(-3, 3, 32).reshape(32, 1) * np.sqrt(S**2 + SIGMA_MAX**2)  # (B, 1) points at σ_max
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (marker, style) in SAMPLERS.items():
        err = errors(name, x_start)
        order = -np.polyfit(np.log(STEPS[1:]), np.log(err[1:]), 1)[0]  # fit from 16 steps on
        print(f"{name:10s} measured order {order:.2f}")
        ax.loglog(STEPS, err, style, marker=marker, mfc="none", label=f"{name} (order {order:.2f})")
    for slope, style in ((1, ":"), (2, "--")):  # reference lines of slope −1 and −2
        ax.loglog(STEPS, 0.1 * (STEPS / STEPS[0]) ** -slope, "k" + style, lw=0.8, label=f"slope −{slope}")
    ax.set_xlabel("number of steps n (Karras σ, ρ = 7)")
    ax.set_ylabel("RMS error vs exact ODE solution at σ = 0")
    ax.set_title(f"Sampler convergence, data N({MU}, {S}²), σ ∈ [{SIGMA_MIN}, {SIGMA_MAX}]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
