"""The recipe's first two stages side by side: with two cores the vae stage trains in a process of
its own while the clip stage trains in the main one; the same checkpoints as one after the other."""

import multiprocessing
import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest

from tinydiff.io import CheckpointError, load_checkpoint
from tinydiff.train.recipes import RecipeConfig, RecipeError, quick_recipe, train_mnist_captions


def config(threads):
    return replace(quick_recipe(), clip_steps=8, vae_steps=12, threads=threads)


def arrays(path):
    return load_checkpoint(path)[0]


def test_side_by_side_stages_write_the_same_checkpoints_as_one_after_the_other(tmp_path):
    events = {1: [], 2: []}
    for threads in (1, 2):
        train_mnist_captions(tmp_path / str(threads), config=config(threads), stages=["clip", "vae"],
                             callback=events[threads].append)
    for stage in ("clip", "vae"):
        a, b = arrays(tmp_path / "1" / stage / "state.npz"), arrays(tmp_path / "2" / stage / "state.npz")
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), (stage, key)
    # every step of both stages reaches the callback, and each stage starts and ends once
    for threads in (1, 2):
        for stage, steps in (("clip", 8), ("vae", 12)):
            mine = [e for e in events[threads] if e["stage"] == stage]
            assert [e["step"] for e in mine if "step" in e] == list(range(1, steps + 1)), (threads, stage)
            assert [e.get("event") for e in mine if "event" in e] == ["start", "end"], (threads, stage)
    record = (tmp_path / "2" / "recipe.json").read_text()
    assert '"vae"' in record and '"clip"' in record  # both stages' seconds recorded


def test_an_error_in_the_vae_process_is_raised_here(tmp_path):
    """A damaged vae checkpoint on --resume: the same error as when the stage runs in this process."""
    out = tmp_path / "run"
    (out / "vae").mkdir(parents=True)
    (out / "vae" / "state.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        train_mnist_captions(out, config=config(2), stages=["clip", "vae"], resume=True)


def test_a_vae_process_that_dies_is_a_clear_error_and_resume_finishes(tmp_path):
    out = tmp_path / "run"

    def kill_it(event):
        if event["stage"] == "clip" and event.get("step") == 2:
            for child in multiprocessing.active_children():
                if child.name == "tinydiff-vae":
                    os.kill(child.pid, signal.SIGKILL)
                    child.join()

    with pytest.raises(RecipeError, match="vae stage's process stopped.*--resume"):
        train_mnist_captions(out, config=config(2), stages=["clip", "vae"], callback=kill_it)
    train_mnist_captions(out, config=config(2), stages=["clip", "vae"], resume=True)
    assert (out / "vae" / "state.npz").exists() and (out / "clip" / "state.npz").exists()


def test_a_vae_stage_that_ends_before_the_clip_stage(tmp_path):
    """The vae process finishes and exits while the clip stage still trains: its end message is
    kept, not mistaken for a process that stopped."""
    seen = []

    def slow_clip(event):
        seen.append(event)
        if event["stage"] == "clip" and event.get("step") == 1:  # wait here until the vae process has exited
            deadline = time.time() + 60
            while any(c.name == "tinydiff-vae" for c in multiprocessing.active_children()) and time.time() < deadline:
                time.sleep(0.05)

    train_mnist_captions(tmp_path / "run", config=replace(config(2), vae_steps=2), stages=["clip", "vae"],
                         callback=slow_clip)
    vae_end = next(i for i, e in enumerate(seen) if e["stage"] == "vae" and e.get("event") == "end")
    clip_steps = [i for i, e in enumerate(seen) if e["stage"] == "clip" and "step" in e]
    assert clip_steps[0] < [i for i, e in enumerate(seen) if e["stage"] == "vae" and "step" in e][0]  # relayed later
    assert vae_end > clip_steps[0]
