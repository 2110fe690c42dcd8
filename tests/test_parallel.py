"""Gradient worker processes (train/parallel.py): shared weights, summed gradients, clear failures."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tinydiff.nn import Linear, manual_seed
from tinydiff.train.parallel import GradientWorkers, WorkerError

ROOT = Path(__file__).resolve().parents[1]


def linear_step(model, x, dout):
    """Forward and backward of one block of rows (module level: workers import it by name)."""
    out = model(x)
    model.backward(dout)
    return float(out.sum())


def make_linear():
    manual_seed(1)
    return Linear(4, 3).double()


def reference_grads(x, dout, weight=None):
    model = make_linear()
    if weight is not None:
        model.weight.data = weight.copy()
    out = linear_step(model, x, dout)
    return out, model.weight.grad, model.bias.grad


@pytest.fixture
def data():
    gen = np.random.default_rng(0)
    return gen.standard_normal((7, 4)), gen.standard_normal((7, 3))


def blocks_of(x, dout, bounds=(0, 3, 5, 7)):
    return [(x[lo:hi], dout[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def test_workers_sum_the_gradients_of_all_blocks_and_follow_replaced_weights(data):
    x, dout = data
    model = make_linear()
    workers = GradientWorkers(model, 2)
    try:
        for weight in (None, np.full((3, 4), 0.5)):  # then a new array, as loading a checkpoint gives
            if weight is not None:
                model.weight.data = weight.copy()
            model.zero_grad()
            parts = workers.run(linear_step, blocks_of(x, dout))
            out, dw, db = reference_grads(x, dout, weight)
            assert sum(parts) == pytest.approx(out, rel=1e-12)
            np.testing.assert_allclose(model.weight.grad, dw, rtol=1e-12)
            np.testing.assert_allclose(model.bias.grad, db, rtol=1e-12)
            assert np.abs(dw).max() > 0
    finally:
        workers.close()


def test_an_error_in_a_worker_is_raised_here_with_its_traceback(data):
    x, dout = data
    workers = GradientWorkers(make_linear(), 1)
    try:
        with pytest.raises(WorkerError, match="worker 1 failed(.|\n)*ValueError"):
            workers.run(linear_step, [(x, dout), (x[:, :2], dout)])  # the worker's block has 2 features, not 4
    finally:
        workers.close()


def test_a_failed_step_stops_the_workers_so_no_stale_answer_is_read_later(data):
    """The worker's answer to a step that failed here would otherwise wait in its pipe and be
    taken for the next step's; diffusion_grads starts new workers after such a step."""
    x, dout = data
    workers = GradientWorkers(make_linear(), 1)
    with pytest.raises(ValueError):
        workers.run(linear_step, [(x[:, :2], dout), (x, dout)])  # this process's block is the bad one
    assert workers.closed
    with pytest.raises(WorkerError, match="stopped"):
        workers.run(linear_step, blocks_of(x, dout, (0, 4, 7)))


def test_a_worker_that_died_gives_an_error_not_a_hang(data):
    x, dout = data
    workers = GradientWorkers(make_linear(), 1)
    workers._processes[0].kill()
    workers._processes[0].join()
    with pytest.raises(WorkerError, match="stopped"):
        workers.run(linear_step, blocks_of(x, dout, (0, 4, 7)))


@pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals to stop and kill the worker")
def test_a_worker_that_died_with_a_message_unread_gives_a_worker_error(data):
    """A worker that dies with a message of ours unread resets the pipe (ConnectionResetError on
    Linux): that is the same clear WorkerError as any other worker death."""
    x, dout = data
    workers = GradientWorkers(make_linear(), 1)
    process = workers._processes[0]
    os.kill(process.pid, signal.SIGSTOP)  # it cannot read what comes next
    workers._conns[0].send("never read")
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    with pytest.raises(WorkerError, match="stopped"):
        workers.run(linear_step, blocks_of(x, dout, (0, 4, 7)))


def test_a_script_without_the_main_guard_gets_a_clear_error(tmp_path):
    """Spawned workers import the script; unguarded, each would start workers again. The worker
    dies while starting, and the script must stop with the advice, not hang."""
    script = tmp_path / "train_unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tinydiff.nn import Linear
        from tinydiff.train.parallel import GradientWorkers
        GradientWorkers(Linear(2, 2), 1)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr.splitlines()[-1]


def test_a_worker_whose_main_process_went_with_a_reply_unread_ends_quietly(data, capfd):
    """A main process killed between steps leaves the worker's last reply unread; the worker's next
    read then fails (ConnectionResetError on Linux, EOFError elsewhere). It must end with exit
    code 0 and no traceback on the terminal, below the main process's own message."""
    x, dout = data
    workers = GradientWorkers(make_linear(), 1)
    conn, process = workers._conns[0], workers._processes[0]
    conn.send((linear_step, (x, dout)))
    assert conn.poll(60)  # the reply has arrived and stays unread
    conn.close()  # what the end of the main process does to its end of the pipe
    process.join(60)
    workers.close()
    assert process.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C is not a signal sent to a process there")
def test_ctrl_c_is_left_to_the_main_process(data, capfd):
    """Ctrl-C in a terminal sends SIGINT to every process of the job. The workers ignore it (the main
    process stops them): no KeyboardInterrupt traceback from a worker, and steps still run."""
    x, dout = data
    workers = GradientWorkers(make_linear(), 1)
    try:
        os.kill(workers._processes[0].pid, signal.SIGINT)
        model = workers.model
        for _ in range(2):
            model.zero_grad()
            parts = workers.run(linear_step, blocks_of(x, dout, (0, 4, 7)))
            out, dw, _ = reference_grads(x, dout)
            assert sum(parts) == pytest.approx(out, rel=1e-12)
            np.testing.assert_allclose(model.weight.grad, dw, rtol=1e-12)
    finally:
        workers.close()
    assert workers._processes[0].exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def test_workers_start_after_a_forward_pass_that_kept_its_caches():
    """Regression: the replica was pickled with the caches a forward pass keeps for backward (a
    U-Net's hold the layer module that ran, which cannot be pickled), so workers started after a
    forward with gradients on failed with "cannot pickle 'module' object". The caches stay out of
    the pickle and in the model, whose backward still runs."""
    import pickle

    from tinydiff.models import UNet
    from tinydiff.train.latent_unet import latent_unet_config

    unet = UNet(latent_unet_config(), seed=0)
    gen = np.random.default_rng(0)
    x = gen.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = gen.standard_normal((2, 16, 64)).astype(np.float32)
    out = unet(x, np.array([10.0, 900.0], np.float32), context)  # gradients on: every layer keeps a cache
    replica = pickle.loads(pickle.dumps(unet))
    assert all(getattr(m, "_cache", None) is None for m in replica.modules())
    assert any(getattr(m, "_cache", None) is not None for m in unet.modules())
    workers = GradientWorkers(unet, 1)
    workers.close()
    unet.backward(np.ones_like(out))  # the model's own caches were left alone
    assert float(np.abs(unet.conv_in.weight.grad).sum()) > 0
