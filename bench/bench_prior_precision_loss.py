"""Does bf16 autocast train the builtin prior as well as fp32 early on? Trains two priors from
the same seed on the same batches (the batch and noise draws do not depend on the arithmetic),
one per precision, for ``--steps`` steps of the default recipe, and reports the mean training
loss over the last ``--window`` steps of each, plus the largest gap between the two EMA UNets'
weights. A cheap check before spending an hour on a full bf16 training run; it says nothing
about sample quality (that is `dreamlab bench prior` on the finished weights).

Usage: python -m bench.bench_prior_precision_loss [--steps 600] [--window 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import machine
from dreamlab.priors.train_builtin import BuiltinPriorTrainer, BuiltinTrainConfig
from dreamlab.world.dataset import load_or_build_world_cache


def run(steps: int, window: int) -> list[str]:
    cfg = BuiltinTrainConfig()
    rows, emas = [], {}
    with tempfile.TemporaryDirectory() as work:
        cache = load_or_build_world_cache(cfg.data, Path(work))
        for precision in ("fp32", "bf16"):
            trainer_cfg = dataclasses.replace(cfg, precision=precision, checkpoint_every=10**9)
            trainer = BuiltinPriorTrainer(trainer_cfg, Path(work) / precision, cache=cache)
            losses, seconds = [], []
            for _ in range(steps):
                report = trainer.train_step()
                losses.append(report.loss)
                seconds.append(report.seconds)
            emas[precision] = torch.cat([p.detach().flatten() for p in trainer.ema_unet.parameters()])
            rows.append(
                f"| {precision} | {statistics.mean(losses[-window:]):.5f} | {statistics.median(seconds):.3f} |"
            )
    gap = float((emas["fp32"] - emas["bf16"]).abs().max())
    scale = float(emas["fp32"].abs().max())
    return [
        f"Machine: {machine()}",
        f"Command: python -m bench.bench_prior_precision_loss --steps {steps} --window {window}",
        "",
        f"| arithmetic | mean training loss, steps {steps - window + 1}–{steps} | median step s |",
        "|---|---|---|",
        *rows,
        "",
        f"Largest |fp32 − bf16| over the EMA UNet's weights after {steps} steps: {gap:.2e} "
        f"(largest |weight| {scale:.2f}).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--window", type=int, default=200)
    args = parser.parse_args()
    if not 0 < args.window <= args.steps:
        parser.error("--window must lie in 1..--steps")
    print("\n".join(run(args.steps, args.window)))


if __name__ == "__main__":
    main()
