"""Builtin-prior training time on this machine: world-cache rendering plus the median training
step, extrapolated to the default step count (the "trains in at most an hour on 2 CPU cores"
target of issue 3), for each training arithmetic asked for (fp32, bf16 autocast).

A full training run's wall time depends on whatever else shares the cores (2-thread torch slows
5-10x next to any busy process), so this measures the two costs on an idle machine and adds
them up: cache build (measured once, from scratch, into a temporary folder) + default steps x the
median of ``--steps`` training steps after warm-up. With several precisions, their steps are
timed in alternating blocks of 5 in the same process, so that drift of the machine's speed hits
each alike.

Usage: python -m bench.bench_prior_training [--steps 40] [--warmup 5] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine
from dreamlab.priors.train_builtin import PRECISIONS, BuiltinPriorTrainer, BuiltinTrainConfig, cpu_has_native_bf16
from dreamlab.world.dataset import load_or_build_world_cache

BLOCK = 5


def run(steps: int, warmup: int, precisions: list[str]) -> list[str]:
    cfg = BuiltinTrainConfig()
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        cache = load_or_build_world_cache(cfg.data, Path(work))
        cache_s = time.perf_counter() - started
        trainers = {
            p: BuiltinPriorTrainer(dataclasses.replace(cfg, precision=p), Path(work) / p, cache=cache)
            for p in precisions
        }
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer.train_step()
        times: dict[str, list[float]] = {p: [] for p in precisions}
        while min(len(t) for t in times.values()) < steps:
            for p, trainer in trainers.items():
                times[p].extend(trainer.train_step().seconds for _ in range(BLOCK))
    rows = []
    for p in precisions:
        step_s = statistics.median(times[p])
        total_min = (cache_s + cfg.steps * step_s) / 60.0
        rows += [
            f"| training step, {p}, batch {cfg.batch_size} (median of {len(times[p])}, min {min(times[p]):.3f}, "
            f"max {max(times[p]):.3f}) | {step_s:.3f} s |",
            f"| **default run, {p}: cache + {cfg.steps} steps** | **{total_min:.1f} min** |",
        ]
    return [
        f"Machine: {machine()}, torch threads {torch.get_num_threads()}, native bf16: {cpu_has_native_bf16()}",
        f"Command: python -m bench.bench_prior_training --steps {steps} --warmup {warmup} --precision {' '.join(precisions)}",
        "",
        "| what | value |",
        "|---|---|",
        f"| world cache, {cfg.data.num_views} views at {cfg.data.resolution} px (from scratch) | {cache_s:.1f} s |",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"])
    args = parser.parse_args()
    print("\n".join(run(args.steps, args.warmup, args.precision)))


if __name__ == "__main__":
    main()
