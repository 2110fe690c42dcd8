"""Smoke tests of the plotting helpers (Agg backend): what each figure draws is what it claims."""

import matplotlib

matplotlib.use("Agg")  # no display; must come before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tinydiff import viz  # noqa: E402
from tinydiff.diffusion import make_schedule  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _images(fig):
    """The arrays shown by each imshow in the figure, in axes order."""
    return [ax.images[0].get_array() for ax in fig.axes if ax.images]


# --- to_display --------------------------------------------------------------------------------


def test_to_display_maps_uint8_and_model_range_to_unit_interval():
    pixels = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    np.testing.assert_allclose(viz.to_display(pixels), pixels / 255.0)
    x = np.array([[[[-1.0, 1.0], [0.0, 3.0]]]])  # (1, 1, 2, 2) model range, one value out of range
    np.testing.assert_allclose(viz.to_display(x), [[[0.0, 1.0], [0.5, 1.0]]])  # clipped, channel dropped
    np.testing.assert_allclose(viz.to_display(x[0, 0], value_range=(0, 4)), [[[0.0, 0.25], [0.0, 0.75]]])


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((2, 3, 4, 4)), ValueError),  # three channels
        (np.zeros(5), ValueError),  # not an image
        (np.zeros((1, 4, 4), dtype=np.int32), TypeError),  # neither uint8 nor float
    ],
)
def test_to_display_rejects_what_it_cannot_show(bad, error):
    with pytest.raises(error):
        viz.to_display(bad)


def test_to_display_rejects_an_empty_value_range():
    with pytest.raises(ValueError, match="value_range"):
        viz.to_display(np.zeros((1, 4, 4)), value_range=(1, 1))


# --- image_grid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 1, 8, 8)])
def test_image_grid_shows_each_image_once_in_order(shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape)
    fig = viz.image_grid(x, ncols=3, titles=[f"#{i}" for i in range(5)])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6  # 2 rows × 3 columns, the last one empty
    shown = _images(fig)
    assert len(shown) == 5
    for i, image in enumerate(shown):
        np.testing.assert_allclose(image, (x.reshape(5, 8, 8)[i] + 1) / 2)
    assert [ax.get_title() for ax in fig.axes[:5]] == [f"#{i}" for i in range(5)]


def test_image_grid_checks_titles():
    with pytest.raises(ValueError, match="titles"):
        viz.image_grid(np.zeros((3, 4, 4)), titles=["one"])


def test_shorten_cuts_with_an_ellipsis_to_exactly_the_limit():
    assert viz.shorten("a bold 7", 8) == "a bold 7"
    assert viz.shorten("a bold 7", 7) == "a bold…"  # the space before the cut is dropped
    assert viz.shorten("a bold 7", 5) == "a bo…" and len(viz.shorten("x" * 99, 20)) == 20


def test_image_grid_keeps_a_long_suptitle_within_the_figure_width():
    long = "a picture of a small bold handwritten seven leaning right " * 4  # 232 characters
    fig = viz.image_grid(np.zeros((8, 4, 4)), suptitle=long, size=1.2)
    title = fig._suptitle.get_text()
    assert title.endswith("…") and len(title) == int(1.2 * 8 * viz.SUPTITLE_CHARS_PER_INCH)
    fig.canvas.draw()
    assert fig._suptitle.get_window_extent().width <= fig.bbox.width  # it fits the figure
    one = viz.image_grid(np.zeros((1, 4, 4)), suptitle=long)
    assert len(one._suptitle.get_text()) == viz.SUPTITLE_MIN_CHARS
    assert viz.image_grid(np.zeros((2, 4, 4)), suptitle="a bold 7")._suptitle.get_text() == "a bold 7"


# --- schedules -----------------------------------------------------------------------------------


def test_plot_schedules_draws_each_quantity_of_each_schedule():
    schedules = [make_schedule("linear"), "cosine"]  # objects and names both accepted
    quantities = list(viz.SCHEDULE_QUANTITIES)
    fig = viz.plot_schedules(schedules, quantities)
    assert len(fig.axes) == len(quantities)
    cosine = make_schedule("cosine")
    for ax, quantity in zip(fig.axes, quantities):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["linear", "cosine"]
        _, compute, scale = viz.SCHEDULE_QUANTITIES[quantity]
        np.testing.assert_allclose(lines[1].get_ydata(), compute(cosine))
        assert ax.get_yscale() == scale
        assert ax.get_xlabel() and ax.get_ylabel()


def test_plot_schedules_names_the_valid_quantities():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        viz.plot_schedules("linear", ["snr", "nonsense"])


def test_noising_strip_shows_the_closed_form_forward_process():
    x0 = np.random.default_rng(1).uniform(-1, 1, (1, 1, 8, 8))
    timesteps = [0, 10, 500, 999]
    schedules = ["linear", "cosine"]
    fig = viz.noising_strip(x0, schedules, timesteps, seed=3)
    shown = _images(fig)
    assert len(shown) == len(schedules) * len(timesteps)
    eps = np.random.default_rng(3).standard_normal((8, 8))  # the strip's noise, drawn from its seed
    for r, name in enumerate(schedules):
        ab = make_schedule(name).alphas_cumprod
        for c, t in enumerate(timesteps):
            expected = np.sqrt(ab[t]) * x0[0, 0] + np.sqrt(1 - ab[t]) * eps  # DDPM eq. 4
            np.testing.assert_allclose(shown[r * len(timesteps) + c], np.clip((expected + 1) / 2, 0, 1))


def test_noising_strip_rejects_a_batch_and_out_of_range_timesteps():
    with pytest.raises(ValueError, match="one image"):
        viz.noising_strip(np.zeros((2, 1, 8, 8)), "linear", [0])
    with pytest.raises(ValueError, match="timesteps"):
        viz.noising_strip(np.zeros((8, 8)), "linear", [1000])


# --- distributions and saving --------------------------------------------------------------------


def test_histogram_vs_normal_draws_two_densities():
    values = np.random.default_rng(2).normal(1.0, 2.0, 5000)
    fig = viz.histogram_vs_normal(values, mean=1.0, std=2.0, bins=40)
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches])
    widths = np.array([p.get_width() for p in ax.patches])
    assert len(heights) == 40
    assert np.sum(heights * widths) == pytest.approx(1.0)  # a density histogram
    (line,) = ax.get_lines()
    x, pdf = line.get_xdata(), line.get_ydata()
    area = np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x))  # trapezoid rule
    assert area == pytest.approx(1.0, abs=1e-3)  # the N(1, 2²) density
    assert x[np.argmax(pdf)] == pytest.approx(1.0, abs=0.1)


def test_save_figure_writes_a_png_without_a_version_tag(tmp_path):
    fig = viz.image_grid(np.zeros((1, 4, 4), dtype=np.uint8))
    path = tmp_path / "sub" / "grid.png"
    viz.save_figure(fig, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert b"matplotlib" not in data  # no "Software: matplotlib x.y" chunk
