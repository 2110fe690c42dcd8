"""Regenerate the autoencoder figure from a trained checkpoint, and print its held-out metrics.

    python figures/make_vae_figures.py [CHECKPOINT]      (default: runs/vae/vae.npz)

If the checkpoint does not exist it is trained first with the default recipe
(``train_autoencoder(loop=default_loop(), ...)``, a few minutes on two CPU cores).

vae.png  top: one held-out digit of each class and its reconstruction decode(μ), with its PSNR;
         middle: the 4 channels of the 8×8 latent μ of four of them (one colour scale, centred
         on 0), beside the digit; bottom: decoded straight-line interpolations
         (1 − t)·μ_a + t·μ_b between the latents of two held-out digits of different classes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tinydiff.backend import to_device, to_numpy  # noqa: E402
from tinydiff.data import load_mnist, train_test_split  # noqa: E402
from tinydiff.metrics import evaluate_autoencoder, psnr  # noqa: E402
from tinydiff.nn import no_grad  # noqa: E402
from tinydiff.train.autoencoder import (  # noqa: E402
    default_loop, load_autoencoder, load_digit_splits, train_autoencoder,
)
from tinydiff.viz import save_figure, to_display  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = HERE.parent / "runs" / "vae" / "vae.npz"
LATENT_DIGITS = (1, 3, 7, 8)  # classes whose latent channels are shown
PAIRS = [(3, 8), (1, 7), (4, 9)]  # classes to interpolate between (the first held-out digit of each)
N_INTERP = 9  # points per interpolation, ends included


def show(ax, image, title=None, **kwargs):
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def draw(model, test, labels, path):
    first = [int(np.flatnonzero(labels == d)[0]) for d in range(10)]  # one held-out digit per class
    x = test[first]  # (10, 1, 32, 32), digits 0 … 9
    x_hat = to_numpy(model.reconstruct(x))
    means = to_numpy(model.encode_means(x))  # (10, 4, 8, 8), row d is digit d
    t = np.linspace(0.0, 1.0, N_INTERP)[:, None, None, None]  # (N_INTERP, 1, 1, 1) broadcast over the latent
    paths = np.concatenate([(1 - t) * means[a] + t * means[b] for a, b in PAIRS])  # (pairs·N_INTERP, 4, 8, 8)
    with no_grad():
        decoded = to_display(to_numpy(model.decode(to_device(paths.astype(np.float32)))))  # (pairs·N_INTERP, 32, 32)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}

    fig = plt.figure(figsize=(12, 10.5))
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=(2.3, 4.4, 3.6))
    axes = top.subplots(2, len(x))
    for i, (original, rec) in enumerate(zip(to_display(x), to_display(x_hat))):
        show(axes[0, i], original, "held out" if i == 0 else None, **grey)
        show(axes[1, i], rec, f"{psnr(x[i], x_hat[i]):.1f} dB", **grey)
    top.suptitle("held-out digits (top) and their reconstructions decode(μ) (bottom), with each one's PSNR",
                 fontsize=10)

    axes = middle.subplots(len(LATENT_DIGITS), 1 + model.config.latent_channels)
    limit = np.abs(means[list(LATENT_DIGITS)]).max()
    for row, d in enumerate(LATENT_DIGITS):
        show(axes[row, 0], to_display(x[d : d + 1])[0], "digit" if row == 0 else None, **grey)
        for c in range(model.config.latent_channels):
            im = axes[row, c + 1].imshow(means[d, c], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            axes[row, c + 1].set_axis_off()
            if row == 0:
                axes[row, c + 1].set_title(f"μ channel {c}", fontsize=8)
    middle.colorbar(im, ax=axes, shrink=0.8, label="μ (unscaled latent)")
    middle.suptitle(f"the 4×8×8 latent μ of a few digits (scaling factor s = {model.config.scaling_factor:.3f})",
                    fontsize=10)

    axes = bottom.subplots(len(PAIRS), N_INTERP)
    for i, image in enumerate(decoded):
        row, col = divmod(i, N_INTERP)
        show(axes[row, col], image, f"t = {t[col, 0, 0, 0]:.2f}" if row == 0 else None, **grey)
    bottom.suptitle("decode((1 − t)·μ_a + t·μ_b): straight lines in latent space between held-out "
                    + ", ".join(f"{a}→{b}" for a, b in PAIRS),
                    fontsize=10)
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def progress_printer(start: float):
    """A train_loop callback printing the loss every 100 steps, with the seconds since ``start``."""
    def show(logs: dict) -> None:
        if logs["step"] % 100 == 0 or logs["step"] == logs["total_steps"]:
            print(f"step {logs['step']}/{logs['total_steps']}  loss {logs['loss']:.4f}  rec {logs['rec']:.4f}  "
                  f"kl {logs['kl']:.0f}  {time.perf_counter() - start:.0f} s", flush=True)
    return show


def main(checkpoint: str | Path = DEFAULT_CHECKPOINT) -> None:
    if not Path(checkpoint).exists():
        print(f"{checkpoint} not found: training it first", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        train_autoencoder(loop=default_loop(), checkpoint_path=checkpoint, callback=progress_printer(start))
        print(f"trained in {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU", flush=True)
    model = load_autoencoder(checkpoint)
    _, test = load_digit_splits()
    _, labels = load_mnist()
    _, test_idx = train_test_split(len(labels))  # the split load_digit_splits uses
    for name, value in evaluate_autoencoder(model, test).items():
        print(f"{name}: {value:.4f}")
    print(f"scaling_factor: {model.config.scaling_factor:.4f}")
    draw(model, test, labels[test_idx], HERE / "vae.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
