"""Sampling with worker processes (``TextToImagePipeline.worker_processes``): the same images as
threads, rows back in order, used only inside the block."""

import numpy as np
import pytest

from tinydiff.pipeline import TextToImagePipeline
from tinydiff.train.parallel import ForwardWorkers


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


@pytest.mark.parametrize("guidance_scale, num_images", [(2.0, 5), (1.0, 3)])
def test_workers_draw_the_same_images_as_threads(pipe, guidance_scale, num_images, monkeypatch):
    """Blocks of rows cut as map_row_pairs / map_rows cuts them, in processes instead of threads:
    the same arithmetic, so the same latents bit for bit."""
    pipe.threads = 2
    options = dict(num_images=num_images, steps=3, guidance_scale=guidance_scale, seed=4, return_latents=True)
    images, latents = pipe("a bold handwritten 3", **options)
    calls = []
    original = ForwardWorkers.__call__
    monkeypatch.setattr(ForwardWorkers, "__call__", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
    with pipe.worker_processes(1):
        assert pipe._workers is not None
        images_w, latents_w = pipe("a bold handwritten 3", **options)
    assert calls == [{"pairs": guidance_scale != 1}] * 3  # every denoiser call went to the workers
    assert pipe._workers is None  # stopped at the end of the block
    assert np.array_equal(latents, latents_w)
    assert np.array_equal(images, images_w)


def test_worker_rows_come_back_in_the_callers_order(pipe):
    """Each block (pairs: the same images from both halves) is computed apart and put back where
    its rows came from: equal to one call on all rows."""
    net = pipe.denoiser_net
    gen = np.random.default_rng(0)
    x = gen.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([900.0, 500.0, 20.0], np.float32)
    context = pipe.encode_prompt(["a 1", "a bold 2", "a thin 3"])
    x2, t2 = np.concatenate([x, x]), np.concatenate([t, t])  # [unconditional; conditional] rows of 3 images
    c2 = np.concatenate([net.null_context(3), context])
    workers = ForwardWorkers(net, 1)
    try:
        for pairs in (True, False):
            got = workers(x2, t2, c2, pairs=pairs)
            for i in range(6):  # each row alone: the same network, rows independent
                expected = pipe.denoiser_net(x2[i:i + 1], t2[i:i + 1], c2[i:i + 1])
                np.testing.assert_allclose(got[i], expected[0], rtol=1e-4, atol=1e-5)
    finally:
        workers.close()
    assert workers.closed


def test_no_workers_outside_the_block_or_on_one_core(pipe):
    with pipe.worker_processes(0):  # one core: nothing to share out
        assert pipe._workers is None
    assert pipe._workers is None
