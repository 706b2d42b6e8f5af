"""Builtin-prior training time on this machine: world-cache rendering plus the median training
step, extrapolated to the default step count (the "trains in at most an hour on 2 CPU cores"
target of issue 3).

A full training run's wall time depends on whatever else shares the cores (2-thread torch slows
5-10x next to any busy process), so this measures the two costs on an idle machine and adds
them up: cache build (measured once, from scratch, into a temporary folder) + default steps x the
median of ``--steps`` training steps after warm-up.

Usage: python bench/bench_prior_training.py [--steps 40] [--warmup 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine
from dreamlab.priors.train_builtin import BuiltinPriorTrainer, BuiltinTrainConfig
from dreamlab.world.dataset import load_or_build_world_cache


def run(steps: int, warmup: int) -> list[str]:
    cfg = BuiltinTrainConfig()
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        cache = load_or_build_world_cache(cfg.data, Path(work))
        cache_s = time.perf_counter() - started
        trainer = BuiltinPriorTrainer(cfg, Path(work), cache=cache)
        times = []
        for index in range(warmup + steps):
            report = trainer.train_step()
            if index >= warmup:
                times.append(report.seconds)
    step_s = statistics.median(times)
    total_min = (cache_s + cfg.steps * step_s) / 60.0
    return [
        f"Machine: {machine()}, torch threads {torch.get_num_threads()}",
        f"Command: python bench/bench_prior_training.py --steps {steps} --warmup {warmup}",
        "",
        "| what | value |",
        "|---|---|",
        f"| world cache, {cfg.data.num_views} views at {cfg.data.resolution} px (from scratch) | {cache_s:.1f} s |",
        f"| training step, batch {cfg.batch_size} (median of {steps}, min {min(times):.3f}, max {max(times):.3f}) | {step_s:.3f} s |",
        f"| **default run: cache + {cfg.steps} steps** | **{total_min:.1f} min** |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    print("\n".join(run(args.steps, args.warmup)))


if __name__ == "__main__":
    main()
