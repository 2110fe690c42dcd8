"""Time to quality: prompt accuracy and MNIST-FD against training minutes for the mnist-captions recipe.

    python benchmarks/time_to_quality.py --out runs/ttq                 # train, then evaluate snapshots
    python benchmarks/time_to_quality.py --out runs/ttq --evaluate-only # evaluate the snapshots again
    python benchmarks/time_to_quality.py --out runs/ttq --unet-steps 3000 --unet-lr 2e-3   # another recipe

The script runs ``tinydiff train mnist-captions`` (``train_mnist_captions`` with the default
``RecipeConfig``, or the settings given) in ``--out`` and, every ``--every`` U-Net steps, copies
the U-Net stage's checkpoint (the loop writes one every 500 steps) to ``OUT/snapshots/`` with the
wall-clock time since the run began: the clip and vae stages count, since a user waits for them
too. After training, each snapshot's EMA weights are put into the finished pipeline in place of
the final ones and evaluated like ``tinydiff eval`` (``evaluate.evaluate_pipeline``: prompt
accuracy on 1,000 images, MNIST-FD against held-out digits). Training and evaluation never run at
the same time, so the minutes are those of training alone.

Writes ``OUT/time_to_quality.json`` (one row per snapshot) and ``OUT/time_to_quality.png`` (the
curve), and prints the table. The machine's load average is printed at the start and end of
training: on a shared machine the minutes stretch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Stop(Exception):
    """Raised from the callback to end the run early (``--stop-after``)."""


def train_with_snapshots(out: Path, config, every: int, stop_after: int | None = None) -> list[dict]:
    """Run the recipe in ``out``, copying the U-Net checkpoint every ``every`` steps; returns the
    snapshots [{"step", "minutes", "path"}] (the last one is the finished stage's). With
    ``stop_after``, training ends after the snapshot of that U-Net step (the rest of the curve
    is not needed, the learning-rate schedule stays the full recipe's), and the pipeline is
    assembled from the checkpoints as they are."""
    from tinydiff.train.recipes import train_mnist_captions

    snapshots_dir = out / "snapshots"
    snapshots_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "unet" / "state.npz"
    start = time.perf_counter()
    marks: dict[int, float] = {}  # U-Net step → minutes since the start, when the step finished
    snapshots: list[dict] = []

    def keep(step: int) -> None:
        path = snapshots_dir / f"unet-{step:05d}.npz"
        shutil.copyfile(checkpoint, path)
        snapshots.append({"step": step, "minutes": marks[step], "path": str(path)})
        (out / "snapshots.json").write_text(json.dumps(snapshots, indent=1))
        print(f"snapshot at U-Net step {step}: {marks[step]:.2f} min", flush=True)
        if stop_after is not None and step >= stop_after:
            raise _Stop

    def callback(event: dict) -> None:
        if event["stage"] != "unet":
            if event.get("event") == "end":
                print(f"{event['stage']}: {event['seconds']:.0f} s", flush=True)
            return
        if event.get("event") == "end":
            last = event["total_steps"]
            marks.setdefault(last, (time.perf_counter() - start) / 60)
            keep(last)  # the loop writes its last checkpoint before the stage ends
            return
        if event.get("event") == "start":
            return
        step = event["step"]
        marks[step] = (time.perf_counter() - start) / 60
        # the loop calls back before it writes the checkpoint of step k, so step k's checkpoint is
        # on disk when step k + 1 calls back
        if (step - 1) % every == 0 and step - 1 > 0 and step - 1 < event["total_steps"]:
            keep(step - 1)

    print(f"training in {out}; load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        train_mnist_captions(out, config=config, callback=callback)
    except _Stop:
        print(f"stopped after U-Net step {stop_after}; assembling the pipeline from the checkpoints", flush=True)
        train_mnist_captions(out, config=config, stages=[], resume=True)
    print(f"training done in {(time.perf_counter() - start) / 60:.1f} min; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    return snapshots


def evaluate_snapshots(out: Path, snapshots: list[dict], n_per_digit: int, weights: str = "ema") -> list[dict]:
    from tinydiff.evaluate import evaluate_pipeline
    from tinydiff.io import load_checkpoint
    from tinydiff.pipeline import TextToImagePipeline
    from tinydiff.train.loop import checkpoint_weights

    pipe = TextToImagePipeline.from_pretrained(out / "model")
    rows = []
    for snap in snapshots:
        arrays = load_checkpoint(snap["path"])[0]
        pipe.denoiser_net.load_state_dict(checkpoint_weights(arrays, weights, path=snap["path"]))
        results = evaluate_pipeline(pipe, n_per_digit=n_per_digit)
        floor = results["mnist_fd_real_vs_real"]
        row = {"step": snap["step"], "minutes": snap["minutes"], "weights": weights,
               "prompt_accuracy": results["prompt_accuracy"],
               "mnist_fd": results["mnist_fd"], "fd_floor": floor}
        rows.append(row)
        print(f"step {row['step']:5d}  {row['minutes']:5.1f} min  accuracy {row['prompt_accuracy']:.1%}  "
              f"FD {row['mnist_fd']:.2f} ({row['mnist_fd'] / floor:.2f}× floor)", flush=True)
    return rows


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Prompt accuracy and FD / floor against training minutes, one line per set of weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, rows in curves.items():
        minutes = [r["minutes"] for r in rows]
        ax1.plot(minutes, [100 * r["prompt_accuracy"] for r in rows], "o-", label=label)
        ax2.plot(minutes, [r["mnist_fd"] / r["fd_floor"] for r in rows], "o-", label=label)
    ax1.axhline(97, color="gray", ls="--", lw=1)
    ax1.axvline(10, color="gray", ls=":", lw=1)
    ax1.set(xlabel="training minutes (2 cores, all stages)", ylabel="prompt accuracy (%)  [97% dashed]")
    ax1.legend(loc="lower right")
    ax2.axhline(3, color="gray", ls="--", lw=1)
    ax2.axvline(10, color="gray", ls=":", lw=1)
    ax2.set(xlabel="training minutes (2 cores, all stages)", ylabel="MNIST-FD / floor  [3× dashed]", yscale="log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="run folder (a fresh one unless --evaluate-only)")
    parser.add_argument("--every", type=int, default=500, help="U-Net steps between snapshots (a multiple of 500)")
    parser.add_argument("--unet-steps", type=int, help="the recipe's unet_steps (default: the recipe's)")
    parser.add_argument("--unet-lr", type=float, help="the recipe's unet_lr (default: the recipe's)")
    parser.add_argument("--clip-steps", type=int, help="the recipe's clip_steps (default: the recipe's)")
    parser.add_argument("--vae-steps", type=int, help="the recipe's vae_steps (default: the recipe's)")
    parser.add_argument("--n-per-digit", type=int, default=100, help="evaluation images per digit (default: 100)")
    parser.add_argument("--stop-after", type=int, help="end training after the snapshot of this U-Net step")
    parser.add_argument("--quick", action="store_true", help="a smoke run of the script (quick_recipe, 1,000 U-Net steps)")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the snapshots of a finished run")
    parser.add_argument("--weights", choices=["ema", "last"], default="ema",
                        help="the snapshots' weights to evaluate: the moving average (default, what the recipe ships) or the last")
    parser.add_argument("--from-step", type=int, default=0, help="--evaluate-only: only snapshots from this U-Net step on")
    parser.add_argument("--compare", type=Path, metavar="RUN",
                        help="also draw the curves of another run folder of this script (e.g. an older recipe's)")
    parser.add_argument("--figure", type=Path, help="write the figure here too (e.g. figures/time_to_quality.png)")
    parser.add_argument("--plot-only", action="store_true", help="only draw the figure from the run's evaluated JSON files")
    args = parser.parse_args()
    if args.every % 500:
        parser.error(f"--every must be a multiple of 500 (the loop checkpoints every 500 steps), got {args.every}")

    from dataclasses import replace

    from tinydiff.train.recipes import RecipeConfig, quick_recipe

    given = {"unet_steps": args.unet_steps, "unet_lr": args.unet_lr, "clip_steps": args.clip_steps,
             "vae_steps": args.vae_steps}
    base = replace(quick_recipe(), unet_steps=1000) if args.quick else RecipeConfig()
    config = replace(base, **{k: v for k, v in given.items() if v is not None})
    if args.plot_only:
        pass
    elif args.evaluate_only:
        snapshots = [s for s in json.loads((args.out / "snapshots.json").read_text()) if s["step"] >= args.from_step]
    else:
        snapshots = train_with_snapshots(args.out, config, args.every, args.stop_after)
    name = "time_to_quality" if args.weights == "ema" else "time_to_quality_last"
    if not args.plot_only:
        rows = evaluate_snapshots(args.out, snapshots, args.n_per_digit, args.weights)
        (args.out / f"{name}.json").write_text(json.dumps({"config": config.to_dict(), "rows": rows}, indent=1))
    settings = ", ".join(f"{k} {v}" for k, v in given.items() if v is not None) or "the default recipe"
    curves = {}  # every set of weights evaluated so far in this run folder (and --compare's), in one plot
    for folder in (args.out, args.compare):
        tag = f" ({folder.name})" if args.compare else ""  # two runs: each curve names its folder
        for weights, file in (("moving average (shipped)", "time_to_quality.json"),
                              ("last weights", "time_to_quality_last.json")):
            if folder is not None and (folder / file).exists():
                curves[weights + tag] = json.loads((folder / file).read_text())["rows"]
    figures = [args.out / "time_to_quality.png"] + ([args.figure] if args.figure else [])
    for figure in figures:
        plot(curves, figure, f"tinydiff train mnist-captions ({settings})")
    print(f"wrote {args.out / (name + '.json')} and {', '.join(map(str, figures))}")


if __name__ == "__main__":
    main()
