"""Time from prompt to GLB at the default settings, split into training and export.

The prior is the tiny random SD used in tests (the default Stable Diffusion prior needs weights
that cannot be downloaded here; its per-step cost is measured by bench_sds_step.py --full-size).
Everything else (Gaussian count, steps, resolution schedule, export settings) is the default.

Usage: python -m bench.bench_generate [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import machine
from dreamlab.config import RunConfig, TrainConfig
from dreamlab.export import export_asset
from dreamlab.priors.stable_diffusion import StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_sd_components
from dreamlab.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    args = parser.parse_args()
    prior = StableDiffusionPrior.from_components(*make_tiny_sd_components())
    cfg = RunConfig(prompt="a red cube", train=TrainConfig(steps=args.steps), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        trainer = Trainer(cfg, prior=prior, run_dir=out)
        reports = list(trainer)
        train_s = time.perf_counter() - start
        timings = {}
        for fmt in ("glb", "obj", "ply", "mp4", "png"):
            t0 = time.perf_counter()
            export_asset(trainer.renderer, out, cfg.export, formats=(fmt,))
            timings[fmt] = time.perf_counter() - t0
    print(f"machine: {machine()}")
    print(f"steps {len(reports)}, final Gaussians {reports[-1].num_gaussians}")
    print("| phase | seconds |")
    print("|---|---|")
    print(f"| training ({len(reports)} steps, incl. checkpoints) | {train_s:.1f} |")
    for fmt, seconds in timings.items():
        print(f"| export {fmt} | {seconds:.1f} |")
    print(f"| prompt to GLB (training + glb) | {train_s + timings['glb']:.1f} |")
    print(f"| everything | {train_s + sum(timings.values()):.1f} |")


if __name__ == "__main__":
    main()
