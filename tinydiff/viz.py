"""Plotting helpers for the chapters and the figure scripts (matplotlib only).

Every function builds one figure and returns it; nothing here calls ``plt.show``. In a notebook
with the inline backend a figure created in a cell is drawn when the cell ends, so write
``fig = viz.image_grid(x)`` (assigning, so it is not drawn twice); in a script call
``save_figure(fig, path)`` and then ``plt.close(fig)``.

Images are accepted in the forms tinydiff produces them:

    (N, H, W) or (N, 1, H, W), or one image (H, W) / (1, H, W)
    float in the model range [−1, 1] (−1 = background, +1 = ink), clipped for display
    uint8 pixels 0 … 255 (what ``tinydiff.data.from_model_range`` and ``load_mnist`` return)

Noisy images (x_t of the forward process) leave [−1, 1]; they are clipped, which is how every
diffusion library shows them. Pass ``value_range`` to show another range instead.

    image_grid            a grid of images, optionally titled (a long suptitle cut with "…")
    plot_schedules        β, ᾱ, SNR, log SNR or σ against t for several training schedules
    noising_strip         one digit noised to chosen timesteps, one row per schedule
    histogram_vs_normal   a histogram of values against the density of a normal distribution
    save_figure           write a figure as a PNG that only changes when its pixels do

This module draws on the CPU, so it uses NumPy directly; arrays from another backend are
copied over with ``tinydiff.backend.to_numpy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .backend import to_numpy
from .diffusion.noise import q_sample
from .diffusion.schedules import NoiseSchedule, make_schedule

# name → (axis label, function of the schedule, y-axis scale), for plot_schedules.
SCHEDULE_QUANTITIES = {
    "betas": (r"$\beta_t$ (variance added at step t)", lambda s: s.betas, "log"),
    "alphas_cumprod": (r"$\bar\alpha_t$ (signal variance kept)", lambda s: s.alphas_cumprod, "linear"),
    "sqrt_alphas_cumprod": (
        r"$\sqrt{\bar\alpha_t}$ (signal amplitude kept)", lambda s: np.sqrt(s.alphas_cumprod), "linear"
    ),
    "snr": (r"SNR$_t = \bar\alpha_t / (1 - \bar\alpha_t)$", lambda s: np.exp(s.log_snr), "log"),
    "log_snr": (r"$\lambda_t = \log(\bar\alpha_t / (1 - \bar\alpha_t))$", lambda s: s.log_snr, "linear"),
    "sigmas": (r"$\sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}$", lambda s: s.sigmas, "log"),
}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def to_display(images, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Images in any accepted form → float64 (N, H, W) in [0, 1], for ``imshow``.

    uint8 maps 0 … 255 to 0 … 1. Floats map ``value_range`` (default (−1, 1), the model range)
    to 0 … 1 and are clipped.
    """
    x = to_numpy(images)
    if x.ndim == 2:  # one image (H, W)
        x = x[None]
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got images of shape {x.shape}")
        x = x[:, 0]  # (N, 1, H, W) → (N, H, W)
    if x.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), (N, 1, H, W) or (H, W), got {x.shape}")
    if x.dtype == np.uint8:
        if value_range is not None:
            raise ValueError("value_range applies to float images, not uint8 pixels")
        return x.astype(np.float64) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected uint8 or float images, got dtype {x.dtype}")
    low, high = (-1.0, 1.0) if value_range is None else value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return np.clip((x.astype(np.float64) - low) / (high - low), 0.0, 1.0)


# A suptitle longer than its figure is wide is cut, with an ellipsis ("…"): with bbox_inches="tight"
# a long title would otherwise widen the saved PNG to its own length. Matplotlib's default font at
# the suptitle's 14.4 pt sets about 12 characters of a prompt per inch; 11 leaves a margin.
SUPTITLE_CHARS_PER_INCH = 11
SUPTITLE_MIN_CHARS = 60  # a narrow grid (one image) still gets a readable title


def shorten(text: str, max_chars: int) -> str:
    """``text`` if it has at most ``max_chars`` characters, else its start and "…" (max_chars in all)."""
    if len(text) <= max_chars:
        return text
    return text[: max(max_chars - 1, 0)].rstrip() + "…"


def image_grid(
    images,
    ncols: int | None = None,
    *,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
    value_range: tuple[float, float] | None = None,
    size: float = 1.2,
    cmap: str = "gray",
) -> Figure:
    """A grid of images, row by row, ``ncols`` per row (default: all in one row, at most 8).

    titles: one short title per image (or None). size: inches per image. A suptitle wider than
    the figure is cut with an ellipsis (``shorten``; never below ``SUPTITLE_MIN_CHARS``).
    """
    x = to_display(images, value_range)  # (N, H, W) in [0, 1]
    n = len(x)
    if n == 0:
        raise ValueError("no images to show")
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    ncols = min(n, 8) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = -(-n // ncols)  # ceil(n / ncols)
    title_space = 0.25 if titles is not None else 0.0
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, (size + title_space) * nrows + (0.3 if suptitle else 0)), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(x[i], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    top = 1.0
    if suptitle:
        fig.suptitle(shorten(suptitle, max(SUPTITLE_MIN_CHARS, int(size * ncols * SUPTITLE_CHARS_PER_INCH))))
        top = 1.0 - 0.3 / fig.get_figheight()  # keep the 0.3 inch added above for the title free
    fig.tight_layout(pad=0.3, rect=(0.0, 0.0, 1.0, top))
    return fig


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def _as_schedules(schedules) -> list[NoiseSchedule]:
    """A schedule, a name, or a sequence of either → a list of NoiseSchedule."""
    if isinstance(schedules, (NoiseSchedule, str)):
        schedules = [schedules]
    out = [make_schedule(s) if isinstance(s, str) else s for s in schedules]
    if not out or not all(isinstance(s, NoiseSchedule) for s in out):
        raise TypeError("expected NoiseSchedule objects or schedule names")
    return out


def plot_schedules(
    schedules, quantities: Sequence[str] = ("betas", "alphas_cumprod", "log_snr"), *, size: float = 3.6
) -> Figure:
    """One panel per quantity against the timestep t, one line per schedule.

    schedules: NoiseSchedule objects or names for ``make_schedule`` (T = 1000).
    quantities: keys of ``SCHEDULE_QUANTITIES`` — betas, alphas_cumprod, sqrt_alphas_cumprod,
        snr, log_snr, sigmas. β, SNR and σ span decades and are drawn on a log axis.
    """
    schedules = _as_schedules(schedules)
    unknown = [q for q in quantities if q not in SCHEDULE_QUANTITIES]
    if unknown or not quantities:
        raise ValueError(f"unknown quantities {unknown}; valid: {', '.join(SCHEDULE_QUANTITIES)}")
    fig, axes = plt.subplots(1, len(quantities), figsize=(size * len(quantities), size * 0.8), squeeze=False)
    for ax, quantity in zip(axes[0], quantities):
        label, compute, scale = SCHEDULE_QUANTITIES[quantity]
        for schedule in schedules:
            values = compute(schedule)
            ax.plot(np.arange(schedule.num_timesteps), values, label=schedule.name)
        ax.set_yscale(scale)
        ax.set_xlabel("timestep t")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def noising_strip(x0, schedules, timesteps: Sequence[int], *, seed: int = 0, size: float = 1.2) -> Figure:
    """One image noised to each of ``timesteps`` by q(x_t | x0) (DDPM eq. 4), one row per schedule.

    x0: one image in the model range, (H, W), (1, H, W) or (1, 1, H, W).
    Every panel uses the same noise ε (drawn from ``seed``), x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, so
    along a row only the amount of noise changes and between rows only the schedule does.
    Each panel is titled with t and √ᾱ_t, the fraction of the digit's amplitude left.
    """
    schedules = _as_schedules(schedules)
    x0 = np.asarray(to_numpy(x0), dtype=np.float64)
    if x0.ndim < 2 or x0.ndim > 4 or int(np.prod(x0.shape[:-2])) != 1:
        raise ValueError(f"expected one image (H, W), (1, H, W) or (1, 1, H, W), got shape {x0.shape}")
    image = x0.reshape(x0.shape[-2:])  # (H, W)
    t = np.asarray(timesteps, dtype=np.int64)  # (K,)
    batch = np.broadcast_to(image, (len(t), 1) + image.shape)  # (K, 1, H, W): the same digit K times
    noise = np.broadcast_to(np.random.default_rng(seed).standard_normal(image.shape), batch.shape)  # (K, 1, H, W)
    rows, titles = [], []
    for schedule in schedules:
        if t.min() < 0 or t.max() >= schedule.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {list(t)}")
        rows.append(q_sample(batch, t, noise, schedule))
        titles += [rf"t={k}  $\sqrt{{\bar\alpha}}$={np.sqrt(schedule.alphas_cumprod[k]):.2f}" for k in t]
    fig = image_grid(np.concatenate(rows), ncols=len(t), titles=titles, size=size)
    if len(schedules) > 1:  # name each row at its left edge
        for r, schedule in enumerate(schedules):
            ax = fig.axes[r * len(t)]
            ax.text(-0.08, 0.5, schedule.name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------------


def histogram_vs_normal(
    values, mean: float = 0.0, std: float = 1.0, *, bins: int = 100, label: str = "values", xlabel: str = "value"
) -> Figure:
    """A density histogram of ``values`` (any shape, flattened) over the pdf of N(mean, std²)."""
    v = np.asarray(to_numpy(values), dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values to histogram")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(v, bins=bins, density=True, alpha=0.6, label=label)
    grid = np.linspace(min(v.min(), mean - 4 * std), max(v.max(), mean + 4 * std), 400)
    pdf = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    ax.plot(grid, pdf, "k", lw=1.5, label=f"N({mean:g}, {std:g}²) density")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def save_figure(fig: Figure, path, *, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG at ``path``, creating parent folders (returns None, like savefig).

    The PNG carries no "Software" tag, so regenerating a figure with another matplotlib
    version only changes the file if the pixels change.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
