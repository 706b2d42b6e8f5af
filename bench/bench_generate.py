"""Time from prompt to GLB at the default settings, split into training and export.

Default: the builtin prior with its preset (what `dreamlab generate "a red cube"` does).
``--tiny-sd``: the tiny random Stable Diffusion used in tests with the Stable Diffusion preset
(measures dreamlab's own cost at SD settings; the real SD's per-step cost is measured by
bench_sds_step.py --full-size).

Usage: python -m bench.bench_generate [--tiny-sd] [--steps N] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import machine
from dreamlab.config import make_run_config
from dreamlab.export import export_asset
from dreamlab.priors import load_prior
from dreamlab.priors.stable_diffusion import StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_sd_components
from dreamlab.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--tiny-sd", action="store_true")
    args = parser.parse_args()
    if args.tiny_sd:
        prior = StableDiffusionPrior.from_components(*make_tiny_sd_components())
        cfg = make_run_config(args.prompt, prior="sd21-base", steps=args.steps, device="cpu")
    else:
        prior = load_prior("builtin")
        cfg = make_run_config(args.prompt, steps=args.steps, device="cpu")
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
    print(f"prior: {'tiny random SD' if args.tiny_sd else 'builtin'}, prompt {args.prompt!r}")
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
