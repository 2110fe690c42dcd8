"""Data parallelism over CPU cores: worker processes that compute gradients for blocks of a batch.

A training step splits its batch into one block of rows per core; each block runs forward and
backward on its own copy of the network, and the copies' gradients are added. Python threads do
this badly: a U-Net step is thousands of small NumPy calls, each dispatched while holding the
interpreter lock (GIL), and two threads doing that wait for each other. On the project's 2-core
machine a batch of 64 split over two threads took 137–172 ms per step, while two *processes* each
running a block of 32 side by side took 103–122 ms each, about what one block takes alone.
So the other blocks run in worker processes:

* **Weights in shared memory.** The model's parameters are moved into one block of shared memory
  (a ``multiprocessing.RawArray``) that the main process and every worker map. The optimizer,
  in the main process, updates them in place, so workers always see the current weights and
  nothing is copied per step.
* **Gradients in shared memory.** Each worker has its own block, and its replica's ``.grad``
  arrays are views into it: backward adds into them, then the main process adds them into the
  model's ``.grad``, worker by worker in a fixed order (so the sum does not depend on timing), and
  zeroes them.
* **Inputs through a pipe.** Per step a worker receives its rows (tens of kB, pickled) and the
  step function to run, and sends back what that function returns.

Workers are *spawned* (a fresh interpreter that imports tinydiff), on every platform: the same
behaviour on Linux, macOS and Windows, and no fork of a process holding BLAS threads. As with any
Python code that spawns processes, a script that trains with several workers must start training
under ``if __name__ == "__main__":`` (the workers import the script; the CLI and notebooks need
nothing).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import traceback
import weakref

import numpy as np

from ..backend import blas_threads, row_blocks
from ..nn import Module, mse_loss, no_grad

_ALIGN = 64  # bytes: each parameter's view starts on a cache line


class WorkerError(RuntimeError):
    """A worker process (training's gradients or sampling's rows) failed or stopped."""


def _layout(params) -> tuple[list[tuple[int, tuple, str]], int]:
    """(byte offset, shape, dtype) of each parameter in one shared block, and the block's size."""
    layout, offset = [], 0
    for p in params:
        layout.append((offset, tuple(p.data.shape), p.data.dtype.str))
        offset += -(-p.data.nbytes // _ALIGN) * _ALIGN  # rounded up to the alignment
    return layout, max(offset, _ALIGN)


def _views(block, layout) -> list[np.ndarray]:
    """One array per parameter, each a view into the shared ``block``."""
    return [np.frombuffer(block, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
            for offset, shape, dtype in layout]


def _serve(conn, weights, grads, layout) -> None:
    """A worker process's life: ``_serve_steps`` until the main process stops it or is gone.

    The main process alone decides when workers stop. Ctrl-C in a terminal interrupts every
    process of the job, so a worker ignores it: the main process gets the KeyboardInterrupt and
    stops its workers (``GradientWorkers.run``). A main process that has gone (killed, or
    stopped without a word) shows up as the end of the pipe: EOFError, ConnectionResetError when
    it went with a reply of ours unread, BrokenPipeError on a send. The worker then ends quietly:
    there is no one left to tell, and a traceback would only bury the main process's message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve_steps(conn, weights, grads, layout)
    except (EOFError, ConnectionError):  # ConnectionError: ConnectionResetError, BrokenPipeError, …
        return


def _serve_steps(conn, weights, grads, layout) -> None:
    """Say it has started, receive the pickled replica, point its weights and gradients at shared
    memory, then run each (step function, arguments) that arrives until told to stop (None)."""
    conn.send((True, "started"))
    try:
        replica = pickle.loads(conn.recv_bytes())
        for p, data, grad in zip(replica.parameters(), _views(weights, layout), _views(grads, layout)):
            p.data, p.grad = data, grad
    except Exception:  # noqa: BLE001 - handed to the main process, which raises it
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, "ready"))
    with blas_threads(1):  # the cores are shared out by processes, not by BLAS
        while True:
            message = conn.recv()
            if message is None:  # the main process stops this worker
                return
            step, args = message
            try:
                reply = (True, step(replica, *args))
            except Exception:  # noqa: BLE001 - handed to the main process, which raises it
                reply = (False, traceback.format_exc())
            try:
                conn.send(reply)
            except OSError:  # the main process closed the workers while this step ran
                return


def _stop(conns, processes) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):  # already closed, or the worker already gone
            pass
        conn.close()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()


class GradientWorkers:
    """``count`` worker processes, each with a replica of ``model`` that shares its weights.

    ``run(step, blocks)`` calls ``step(model, *blocks[0])`` in this process and
    ``step(replica_k, *blocks[k])`` in worker k at the same time, adds every replica's
    gradients into the model's, and returns the calls' results in block order. ``step`` must be a
    module-level function (it is pickled by name). NumPy only.
    """

    def __init__(self, model: Module, count: int):
        self.model = model
        self.params = model.parameters()
        dtypes = {p.data.dtype for p in self.params}
        if len(dtypes) != 1 or any(not isinstance(p.data, np.ndarray) for p in self.params):
            raise ValueError("GradientWorkers needs a NumPy model whose parameters share one dtype")
        self.layout, nbytes = _layout(self.params)
        context = multiprocessing.get_context("spawn")
        self._weights = context.RawArray(ctypes.c_char, nbytes)  # zero-filled shared memory
        self._shared = _views(self._weights, self.layout)
        self._grad_blocks = [context.RawArray(ctypes.c_char, nbytes) for _ in range(count)]
        self._grads = [_views(block, self.layout) for block in self._grad_blocks]
        self._share_weights()
        replica = pickle.dumps(model)
        self._conns, self._processes = [], []
        for block in self._grad_blocks:
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, self._weights, block, self.layout),
                                      daemon=True, name="tinydiff-grads")
            process.start()
            theirs.close()
            self._conns.append(mine)
            self._processes.append(process)
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._processes)
        # Small messages first: a worker that dies while starting (a script without the __main__
        # guard) is seen here, before anything large is written to a pipe it will never read.
        try:
            for k in range(count):
                self._receive(k)  # "started"
                self._conns[k].send_bytes(replica)
            for k in range(count):
                self._receive(k)  # "ready"
        except BaseException:
            self.close()
            raise

    def _share_weights(self) -> None:
        """Make each parameter's ``data`` its shared view again, copying in its current values, if
        something replaced the array (loading a checkpoint does)."""
        for p, view in zip(self.params, self._shared):
            if p.data is not view:
                if p.data.shape != view.shape or p.data.dtype != view.dtype:
                    raise ValueError("a parameter changed shape or dtype after the gradient workers started; "
                                     "make a new training step function")
                view[...] = p.data
                p.data = view

    def _receive(self, k: int):
        conn, process = self._conns[k], self._processes[k]
        try:  # wait for an answer or for the worker's end, whichever comes first
            if conn not in multiprocessing.connection.wait([conn, process.sentinel]):
                raise EOFError
            ok, value = conn.recv()
        except (EOFError, ConnectionError):  # ConnectionResetError: it died with a message of ours unread
            process.join(timeout=5)
            raise WorkerError(
                f"worker process {k + 1} stopped (exit code {process.exitcode}). If this runs from a script, "
                "start training or sampling under `if __name__ == \"__main__\":` (workers are spawned and import "
                "the script), or use threads=1 (training) / no worker_processes() (sampling)") from None
        if not ok:
            raise WorkerError(f"worker {k + 1} failed:\n{value}")
        return value

    def run(self, step, blocks: list[tuple], grads: bool = True) -> list:
        """The calls' results in block order; ``grads=False`` (inference) leaves the gradients alone."""
        if self.closed:
            raise WorkerError("these worker processes were stopped; start new ones")
        if len(blocks) != len(self._conns) + 1:
            raise ValueError(f"run needs {len(self._conns) + 1} blocks (this process and each worker), got {len(blocks)}")
        self._share_weights()
        try:
            for k, args in enumerate(blocks[1:]):
                try:
                    self._conns[k].send((step, args))
                except OSError:  # a broken pipe: the worker has gone
                    self._receive(k)  # raises WorkerError with its exit code
            with blas_threads(1):
                results = [step(self.model, *blocks[0])]
            results += [self._receive(k) for k in range(len(self._conns))]
        except BaseException:
            # An error here, or Ctrl-C, leaves answers and gradients of this step in the pipes and
            # the shared blocks, where the next step would read them: stop the workers instead.
            self.close()
            raise
        if grads:
            for p, *theirs in zip(self.params, *self._grads):
                for grad in theirs:
                    p.grad += grad
                    grad[...] = 0
        return results

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the workers (also done when this object is garbage-collected)."""
        self._finalizer()


# --------------------------------------------------------------------------- a diffusion step

def block_grads(unet, x_t, t, target, weights, context, mask, share: float):
    """Forward and backward of one block of a batch's rows (``train.diffusion.reference_step`` on
    fewer rows), whose ``share`` of the batch scales its loss (a mean over the block) to its part
    of the batch's mean. Returns (loss part, dcontext or None). Runs in a worker or in the main
    process; module-level, so that it is pickled by name."""
    pred = unet(x_t, t, context, mask)
    loss, dpred = mse_loss(pred, target, weights)
    _, dcontext = unet.backward(dpred * share)
    return loss * share, dcontext


class ParallelDiffusionStep:
    """The diffusion training step's forward and backward with the batch's rows cut into
    ``blocks`` blocks: the first runs here, the others in ``blocks`` − 1 ``GradientWorkers``,
    started at the first call (and again after a call that failed, which stops them).

    ``step(x_t, t, target, weights, context, mask)`` adds the batch's gradient into the U-Net's
    ``.grad`` and returns (loss, dcontext (B, L, D) or None), the same as one process computes up
    to float rounding: Σ_blocks share · mean over the block = the mean over the batch."""

    def __init__(self, unet: Module, blocks: int):
        self.unet, self.blocks, self.workers = unet, blocks, None

    def __call__(self, *arrays):
        b = arrays[0].shape[0]
        per_block = [tuple(None if a is None else a[rows] for a in arrays) + ((rows.stop - rows.start) / b,)
                     for rows in row_blocks(b, self.blocks)]
        if self.workers is None or self.workers.closed:  # the first step, or the one after an interrupted step
            self.workers = GradientWorkers(self.unet, len(per_block) - 1)
        results = self.workers.run(block_grads, per_block)
        loss = sum(part for part, _ in results)
        dcontexts = [d for _, d in results]
        return loss, None if dcontexts[0] is None else np.concatenate(dcontexts)  # (B, L, D)

    def close(self) -> None:
        """Stop the workers, if any are running."""
        if self.workers is not None:
            self.workers.close()


# --------------------------------------------------------------------------- sampling's rows

def forward_rows(net, x, t, context):
    """``net(x, t, context)`` in inference mode on one block of rows; runs in a worker or here."""
    with no_grad():
        return net(x, t, context)


class ForwardWorkers:
    """The denoiser's forward pass over several processes, for batch sampling: the rows of each
    call are cut into ``count`` + 1 blocks, one computed here and one in each worker process.

    Threads (``backend.map_rows``) share one interpreter lock among the thousands of small NumPy
    calls of a forward pass; processes do not. Starting the workers costs about half a second (each
    imports tinydiff and receives the network), which a single image never wins back: the
    pipeline uses them only when asked (``TextToImagePipeline.worker_processes``), for batch work.
    With ``pairs=True`` (classifier-free guidance: rows ``[unconditional; conditional]`` of the same
    images) each block takes the same images from both halves, like ``backend.map_row_pairs``.
    The result equals ``net(x, t, context)`` row for row.
    """

    def __init__(self, net: Module, count: int):
        self.workers = GradientWorkers(net, count)
        self.blocks = count + 1

    def __call__(self, x, t, context, pairs: bool = False):
        rows = x.shape[0]
        half = rows // 2
        if pairs and rows % 2 == 0 and half >= self.blocks:
            picks = [np.r_[b, b.start + half: b.stop + half] for b in row_blocks(half, self.blocks)]
        elif rows >= self.blocks:
            picks = [np.arange(b.start, b.stop) for b in row_blocks(rows, self.blocks)]
        else:
            return forward_rows(self.workers.model, x, t, context)
        outputs = self.workers.run(forward_rows, [(x[pick], t[pick], None if context is None else context[pick])
                                                  for pick in picks], grads=False)
        out = np.empty((rows,) + outputs[0].shape[1:], dtype=outputs[0].dtype)
        for pick, output in zip(picks, outputs):
            out[pick] = output  # back in the caller's row order
        return out

    @property
    def closed(self) -> bool:
        return self.workers.closed

    def close(self) -> None:
        self.workers.close()
