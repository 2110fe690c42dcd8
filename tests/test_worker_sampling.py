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
    pipe.threads = 1  # the default count follows pipe.threads: one thread, no worker
    try:
        with pipe.worker_processes():
            assert pipe._workers is None
    finally:
        pipe.threads = None


def test_with_guidance_each_block_holds_both_halves_of_its_images(pipe):
    """pairs=True: the block computed here is [unconditional; conditional] rows of the same images,
    so the U-Net can run their shared start once (UNet._guidance_halves); pairs=False: plain blocks."""
    net = pipe.denoiser_net
    gen = np.random.default_rng(1)
    x = gen.standard_normal((4, 4, 8, 8)).astype(np.float32)
    x2, t2 = np.concatenate([x, x]), np.full(8, 500.0, np.float32)
    c2 = np.concatenate([net.null_context(4), pipe.encode_prompt(["a 1", "a 2", "a 3", "a 4"])])
    workers = ForwardWorkers(net, 1)
    seen = []
    try:
        forward = net.forward  # wrapped after the replica was sent: the block computed here is recorded
        net.forward = lambda x_, *args: seen.append(x_.copy()) or forward(x_, *args)
        workers(x2, t2, c2, pairs=True)
        workers(x2, t2, c2, pairs=False)
    finally:
        del net.forward
        workers.close()
    assert np.array_equal(seen[0], np.concatenate([x[:2], x[:2]]))  # images 0, 1 from both halves
    assert np.array_equal(seen[1], x2[:4])  # rows 0-3: the first half only


class _Stop(Exception):
    """Raised by a stub to end a CLI command once it has shown what it would run."""


@pytest.fixture
def worker_spy(monkeypatch):
    """``TextToImagePipeline.worker_processes`` replaced by a block that records its use and
    starts nothing: what each CLI command asked for, without the processes."""
    import contextlib

    used = []

    @contextlib.contextmanager
    def spy(self, count=None):
        used.append(count)
        yield self

    monkeypatch.setattr(TextToImagePipeline, "worker_processes", spy)
    return used


def test_cli_sample_starts_workers_only_for_jobs_that_win_back_their_start(worker_spy, monkeypatch, tmp_path):
    """tinydiff sample: worker processes from WORKER_MIN_IMAGE_STEPS images × steps on (a single
    image keeps the threads), never for LCM (its student runs on threads)."""
    from tinydiff import cli

    out = str(tmp_path / "x.npy")
    assert cli.main(["sample", "a 7", "--num-images", "2", "--steps", "2", "--output", out]) == 0
    assert worker_spy == []  # 4 image-steps
    monkeypatch.setattr(cli, "WORKER_MIN_IMAGE_STEPS", 4)
    assert cli.main(["sample", "a 7", "--num-images", "2", "--steps", "2", "--output", out]) == 0
    assert worker_spy == [None]
    assert cli.main(["sample", "a 7", "--num-images", "1", "--steps", "3", "--output", out]) == 0
    assert worker_spy == [None]  # 3 < 4
    assert cli.main(["sample", "a 7", "--num-images", "2", "--steps", "2", "--sampler", "lcm", "--output", out]) == 0
    assert worker_spy == [None]


def test_cli_eval_samples_on_workers(worker_spy, monkeypatch):
    """tinydiff eval's default job (1,400 images × 20 steps) runs on worker processes."""
    from tinydiff import cli, evaluate

    seen = []

    def stub(pipe, **kwargs):
        seen.append(len(worker_spy))
        raise _Stop

    monkeypatch.setattr(evaluate, "evaluate_pipeline", stub)
    with pytest.raises(_Stop):
        cli.main(["eval"])
    assert seen == [1] and worker_spy == [None]  # generating inside the block
    with pytest.raises(_Stop):
        cli.main(["eval", "--n-per-digit", "2", "--n-attribute", "1", "--steps", "1"])  # 40 image-steps
    assert seen == [1, 1]  # no new block


def test_a_worker_that_stops_during_eval_is_one_line_with_exit_status_2(monkeypatch, capsys):
    """A worker process that dies mid-batch (killed, out of memory) ends tinydiff eval with the
    worker's one-line error, not a traceback."""
    from tinydiff import cli, evaluate
    from tinydiff.train.parallel import WorkerError

    message = "worker process 1 stopped (exit code -9)"

    def dead(pipe, **kwargs):
        raise WorkerError(message)

    monkeypatch.setattr(evaluate, "evaluate_pipeline", dead)
    monkeypatch.setattr(cli, "WORKER_MIN_IMAGE_STEPS", 10**9)  # no processes needed to raise it
    assert cli.main(["eval"]) == 2
    err = capsys.readouterr().err  # the progress bar's line, then the error
    assert err.strip().splitlines()[-1] == f"tinydiff: error: {message}" and "Traceback" not in err


def test_a_nested_block_keeps_the_outer_workers_and_callbacks_keep_the_rows_here(pipe, monkeypatch):
    """A second worker_processes() inside the first starts nothing and stops nothing; with an
    attention callback watching, the rows stay in this process (the callback sees every row) even
    inside the block."""
    with pipe.worker_processes(1):
        outer = pipe._workers
        with pipe.worker_processes(1):
            assert pipe._workers is outer
        assert pipe._workers is outer and not outer.closed
        calls = []
        monkeypatch.setattr(ForwardWorkers, "__call__", lambda self, *a, **k: calls.append(1))
        rows = []
        pipe.unet.set_attention_callback(lambda name, probs: rows.append(probs.shape[0]))
        try:
            pipe("a 7", num_images=2, steps=1, seed=0)
        finally:
            pipe.unet.set_attention_callback(None)
        assert calls == [] and rows and set(rows) == {4}  # 2 images × 2 guidance halves, one call
    assert outer.closed


def test_fewer_rows_than_blocks_run_here(pipe):
    """One row for two blocks: computed in this process, the same numbers as a direct call."""
    net = pipe.denoiser_net
    x = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    t, context = np.array([300.0], np.float32), pipe.encode_prompt(["a 5"])
    workers = ForwardWorkers(net, 1)
    try:
        got = workers(x, t, context)
    finally:
        workers.close()
    from tinydiff.nn import no_grad
    with no_grad():
        np.testing.assert_array_equal(got, net(x, t, context))
