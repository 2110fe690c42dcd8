"""One trained model, one seed, every sampler at 10, 20 and 50 steps.

    python figures/make_sampler_grid.py [PIPELINE_FOLDER]     (default: the shipped weights)

Writes figures/sampler_grid.png: rows are samplers, column groups are step counts, and within a
group the four prompts "a handwritten 0/3/7/8" drawn with seeds 0–3. Deterministic samplers
(DDIM η=0, Euler, Heun, DPM++ 2M) walk the same probability-flow ODE, so at 50 steps they agree;
the ancestral ones (DDPM, Euler ancestral) inject fresh noise and draw different digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tinydiff.pipeline import TextToImagePipeline  # noqa: E402
from tinydiff.viz import save_figure, to_display  # noqa: E402

SAMPLERS = ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"]
STEPS = [10, 20, 50]
PROMPTS = ["a handwritten zero", "a handwritten three", "a handwritten seven", "a handwritten eight"]
OUT = Path(__file__).resolve().parent / "sampler_grid.png"


def main() -> None:
    pipe = TextToImagePipeline.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else None)
    n = len(PROMPTS)
    fig, axes = plt.subplots(len(SAMPLERS), len(STEPS) * n, figsize=(0.75 * len(STEPS) * n, 0.85 * len(SAMPLERS)))
    for row, sampler in enumerate(SAMPLERS):
        spacing = "leading" if sampler in ("ddpm", "ddim") else "karras"  # as diffusers' DDPM/DDIM schedulers
        for group, steps in enumerate(STEPS):
            images = to_display(pipe(PROMPTS, steps=steps, sampler=sampler, sigma_schedule=spacing, seed=0))
            for k in range(n):
                ax = axes[row, group * n + k]
                ax.imshow(images[k], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0 and group == 0:
                    ax.set_ylabel(sampler, rotation=0, ha="right", va="center", fontsize=8)
                if row == 0 and k == 0:
                    ax.set_title(f"{steps} steps", loc="left", fontsize=9)
    fig.suptitle(f"one model, seeds 0–3, guidance {pipe.defaults.guidance_scale}", fontsize=10)
    fig.tight_layout(pad=0.2)
    save_figure(fig, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
