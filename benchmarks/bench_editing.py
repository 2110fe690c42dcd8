"""Editing with the shipped model, measured on held-out digits (tinydiff.editing.measure_*).

    python benchmarks/bench_editing.py                      # all three, 100 digits each
    python benchmarks/bench_editing.py --only inversion --n 50 --json out.json

* img2img: held-out 3s redrawn under "an 8" at strengths 0 … 1: how often the evaluation
  classifier stops reading a 3 (and reads an 8), and the mean pixel change;
* inpainting: the bottom half of held-out digits regenerated under "a handwritten {digit}";
  accuracy beside the same with the next digit's prompt and with the top half alone;
* inversion: DDIM inversion then DDIM regeneration at 20 and 50 steps, guidance 1 and 2;
  PSNR against the VAE round trip and against the input.

Each part takes one to three minutes on two CPU cores. Sampling uses the pipeline's defaults
(20 DPM++ 2M Karras steps from σ = 14.6, guidance 2) except where stated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinydiff import editing  # noqa: E402
from tinydiff.pipeline import TextToImagePipeline  # noqa: E402

PARTS = ("img2img", "inpainting", "inversion")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--n", type=int, default=100, help="held-out digits per measurement (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    pipe = TextToImagePipeline.from_pretrained()
    results = {}
    for part in args.only or PARTS:
        start = time.perf_counter()
        if part == "img2img":
            rows = editing.measure_img2img(pipe, n=args.n, seed=args.seed)
            print("img2img: held-out 3s under \"an 8\"\n  strength  class change  read as 8  mean |Δpixel|/255")
            for r in rows:
                print(f"  {r['strength']:8.1f}  {r['class_change']:11.0%}  {r['to_target']:9.0%}  "
                      f"{r['pixel_distance']:17.3f}")
        elif part == "inpainting":
            rows = [editing.measure_inpainting(pipe, n=args.n, jumps=jumps, seed=args.seed) for jumps in (0, 2)]
            print("inpainting: bottom half regenerated\n  jumps  right prompt  next digit's prompt  top half alone"
                  "  kept pixels exact")
            for jumps, r in zip((0, 2), rows):
                print(f"  {jumps:5d}  {r['accuracy']:12.0%}  {r['wrong_prompt_accuracy']:19.0%}  "
                      f"{r['top_half_only_accuracy']:14.0%}  {r['known_pixels_exact']}")
        else:
            rows = editing.measure_inversion(pipe, n=args.n, seed=args.seed)
            print("inversion: DDIM inversion + DDIM regeneration\n  steps  guidance  PSNR vs VAE round trip"
                  "  PSNR vs input  latent RMSE")
            for r in rows:
                print(f"  {r['steps']:5d}  {r['guidance_scale']:8.1f}  {r['psnr_vs_vae']:19.1f} dB  "
                      f"{r['psnr_vs_input']:10.1f} dB  {r['latent_rmse']:11.3f}")
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        results[part] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
