"""Samples of the class-conditional pixel-space DDPM (tinydiff/train/pixel_digits.py).

    python figures/make_pixel_ddpm.py [CHECKPOINT]     (default: runs/pixel/state.npz)

Writes figures/pixel_ddpm_samples.png: one row per digit 0–9, eight seeds each, drawn with DDPM
ancestral sampling (Ho et al. 2020, Algorithm 2) over 100 'leading'-spaced timesteps, guidance 3,
starting at σ = 14.6, with the EMA weights of the checkpoint. If the checkpoint is missing it is
trained first (1,500 steps of batch 32: about half an hour on two CPU cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from tinydiff.io import load_checkpoint  # noqa: E402
from tinydiff.models.unet import UNetConfig  # noqa: E402
from tinydiff.train import LoopConfig  # noqa: E402
from tinydiff.train.diffusion import DiffusionConfig  # noqa: E402
from tinydiff.train.pixel_digits import PixelDigitModel, generate_digits, train_pixel_digits  # noqa: E402
from tinydiff.viz import image_grid, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parent / "runs" / "pixel" / "state.npz"
LOOP = LoopConfig(total_steps=1500, lr=2e-3, warmup_steps=50, ema_decay=0.995, checkpoint_every=100)
DIFFUSION = DiffusionConfig(batch_size=32)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not path.exists():
        train_pixel_digits(PixelDigitModel(seed=0), LOOP, DIFFUSION, checkpoint_path=path)
    arrays, header = load_checkpoint(path, kind="pixel-digits")
    model = PixelDigitModel(UNetConfig.from_dict(header["config"]["unet"]))
    model.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("ema.")})
    labels = np.repeat(np.arange(10), 8)
    images = generate_digits(model, labels, steps=100, sampler="ddpm", spacing="leading", guidance_scale=3.0, seed=0)
    step = header["extra"]["step"]
    save_figure(image_grid(images, ncols=8, suptitle=f"pixel-space DDPM, {step} training steps, rows: digits 0–9"),
                HERE / "pixel_ddpm_samples.png")
    print(f"wrote {HERE / 'pixel_ddpm_samples.png'} from {path} at step {step}")


if __name__ == "__main__":
    main()
