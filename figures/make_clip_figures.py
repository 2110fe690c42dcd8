"""Regenerate the CLIP figures from a trained checkpoint, and print its held-out metrics.

    python figures/make_clip_figures.py [CHECKPOINT]      (default: runs/clip/clip.npz)

If the checkpoint does not exist it is trained first with the default recipe
(``train_clip(loop=default_loop(), ...)``: 1,200 steps, a few minutes on two CPU cores).

clip_similarity.png  cosine similarity between prompts (the ten zero-shot prompts and four
                     attribute prompts about the digit 7) and held-out digits grouped by class;
                     beside it, how the attribute prompts rank held-out 7s against the ink mass
                     and slant measured from their pixels.
clip_pca.png         the unit-norm image and prompt embeddings projected on their first two
                     principal components. Each prompt sits with its class, on the inner side: the
                     two modalities occupy offset regions of the sphere (the "modality gap" of
                     contrastive models, Liang et al. 2022), mostly along directions PCA does not
                     show here; the title gives the distance between their means.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tinydiff.data import load_mnist, train_test_split  # noqa: E402
from tinydiff.metrics import cosine_similarity, evaluate_clip  # noqa: E402
from tinydiff.text.captions import BOLD, LEFT, RIGHT, THIN, caption, measure_images, zero_shot_prompts  # noqa: E402
from tinydiff.train.clip import default_loop, load_captioned_mnist, load_clip, train_clip  # noqa: E402
from tinydiff.viz import save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = HERE.parent / "runs" / "clip" / "clip.npz"
PER_CLASS = 12  # held-out images per class in the similarity matrix
PROBE_DIGIT = 7
ATTRIBUTE_PROMPTS = [caption(PROBE_DIGIT, thickness=THIN), caption(PROBE_DIGIT, thickness=BOLD),
                     caption(PROBE_DIGIT, slant=LEFT), caption(PROBE_DIGIT, slant=RIGHT)]


def embed(model, tokenizer, prompts):
    tokens = tokenizer.encode(prompts)
    return model.embed_texts(tokens.ids, tokens.mask)


def similarity_figure(model, tokenizer, test, measurements, path):
    labels = test.labels
    # PER_CLASS digits of each class, thin to bold within the class (by measured ink mass).
    columns = np.concatenate([
        sorted(np.flatnonzero(labels == d)[:PER_CLASS], key=lambda i: measurements.ink[i]) for d in range(10)
    ])
    prompts = zero_shot_prompts() + ATTRIBUTE_PROMPTS
    text_emb = embed(model, tokenizer, prompts)  # (14, E)
    image_emb = model.embed_images(test.images)  # (N, E)
    sims = cosine_similarity(text_emb, image_emb[columns])  # (14, 10·PER_CLASS)

    fig = plt.figure(figsize=(13, 5.2))
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 1), hspace=0.45, wspace=0.25)
    ax = fig.add_subplot(grid[:, 0])
    im = ax.imshow(sims, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(prompts)), prompts, fontsize=8)
    ax.set_xticks(PER_CLASS * np.arange(10) + (PER_CLASS - 1) / 2, [str(d) for d in range(10)])
    ax.set_xlabel(f"held-out digits, {PER_CLASS} per class (thin → bold within each class)")
    for d in range(1, 10):
        ax.axvline(d * PER_CLASS - 0.5, color="white", lw=0.6)
    ax.axhline(9.5, color="white", lw=1.5)
    ax.set_title("cosine similarity, prompt × image")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)

    sevens = np.flatnonzero(labels == PROBE_DIGIT)
    attr_sims = cosine_similarity(image_emb[sevens], embed(model, tokenizer, ATTRIBUTE_PROMPTS))  # (n7, 4)
    panels = [(attr_sims[:, 1] - attr_sims[:, 0], measurements.ink[sevens], "ink mass (pixels)",
               "cos(bold) − cos(thin)"),
              (attr_sims[:, 3] - attr_sims[:, 2], measurements.slant[sevens], "slant −μ11/μ02 (→ right)",
               "cos(right) − cos(left)")]
    for row, (score, measured, xlabel, ylabel) in enumerate(panels):
        ax = fig.add_subplot(grid[row, 1])
        ax.scatter(measured, score, s=6, alpha=0.6)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"held-out {PROBE_DIGIT}s: r = {np.corrcoef(measured, score)[0, 1]:.2f}", fontsize=9)
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def pca_2d(points: np.ndarray) -> np.ndarray:
    """Coordinates on the first two principal components (via the SVD of the centred data)."""
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T  # (N, 2)


def pca_figure(model, tokenizer, test, path):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    image_emb = unit(model.embed_images(test.images))  # (N, E), on the unit sphere like cosines
    text_emb = unit(embed(model, tokenizer, zero_shot_prompts()))  # (10, E)
    gap = np.linalg.norm(image_emb.mean(axis=0) - text_emb.mean(axis=0))
    xy = pca_2d(np.concatenate([image_emb, text_emb]))  # (N + 10, 2)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.scatter(*xy[: len(image_emb)].T, c=colours(test.labels), s=5, alpha=0.5)
    ax.scatter(*xy[len(image_emb):].T, c=colours(np.arange(10)), s=260, marker="*", edgecolors="black")
    for d, (x, y) in enumerate(xy[len(image_emb):]):
        ax.annotate(f'"{d}"', (x, y), xytext=(6, 6), textcoords="offset points", fontsize=10, weight="bold")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("PCA of held-out image embeddings (dots, by class)\nand the prompts "
                 f'"a handwritten zero" … "nine" (stars)\ndistance between the two means: {gap:.2f} '
                 "(the modality gap)", fontsize=10)
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def show_progress(logs: dict) -> None:
    if logs["step"] % 100 == 0 or logs["step"] == logs["total_steps"]:
        print(f"step {logs['step']}/{logs['total_steps']}  loss {logs['loss']:.3f}  scale {logs['scale']:.1f}",
              flush=True)


def main(checkpoint: str | Path = DEFAULT_CHECKPOINT) -> None:
    if not Path(checkpoint).exists():
        print(f"{checkpoint} not found: training it first", flush=True)
        train_clip(loop=default_loop(), checkpoint_path=checkpoint, callback=show_progress)
    model, tokenizer = load_clip(checkpoint)
    _, test = load_captioned_mnist()
    raw_images, raw_labels = load_mnist()
    _, test_idx = train_test_split(len(raw_labels))
    measurements = measure_images(raw_images[test_idx])
    for name, value in evaluate_clip(model, tokenizer, test).items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    similarity_figure(model, tokenizer, test, measurements, HERE / "clip_similarity.png")
    pca_figure(model, tokenizer, test, HERE / "clip_pca.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
