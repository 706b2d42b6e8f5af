"""Benchmark of the hash-grid NeRF renderer: one training step (render + backward + Adam + grid
bookkeeping) on CPU, against image size, samples per ray and the occupancy grid.

Scene: the NeRF of a finished run (``--checkpoint``, a run folder or checkpoint file; default: the
untrained renderer with its initial density blob, a soft ball of radius ~0.5) with the builtin
prior's NeRF preset (``dreamlab.config.BUILTIN_PRIOR_NERF_PRESET``) unless the checkpoint says
otherwise; one camera at distance 2.4, fov 47.5 degrees, elevation 15 (the trainer's mean
camera). The loss is a fixed random linear function of the image, so backward does the full work.
With the grid on, it is refreshed from the field once before timing (as after the first training
steps) and not during the timed steps, so every step sees the same occupancy; "evaluated" is the
share of samples the field was evaluated at.

The Gaussian renderer's step at the builtin preset (2,000 Gaussians, 64 px) is timed in the same
run as the baseline the issue compares against.

Timings need an otherwise idle machine (2 torch threads on 2 cores; see bench_renderer.py).

Usage::

    python bench/bench_nerf.py                              # sizes 32, 64; samples 24, 48, 96
    python bench/bench_nerf.py --checkpoint outputs/a-red-cube --repeats 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench.common import machine, time_ms


def _camera(size: int):
    from dreamlab.types import orbit_cameras

    one = torch.ones(1)
    return orbit_cameras(15.0 * one, 30.0 * one, 2.4 * one, 47.5 * one, size, size)


def _nerf(checkpoint: str | None, samples: int, grid: bool):
    from dreamlab.config import BUILTIN_PRIOR_NERF_PRESET
    from dreamlab.renderers.nerf import NeRFConfig, NeRFRenderer

    if checkpoint:
        from dreamlab.renderers.gaussians.from_density import load_renderer_from_checkpoint

        source = load_renderer_from_checkpoint(checkpoint)
        cfg = dataclasses.replace(source.cfg, num_samples=samples, occupancy_grid=grid)
        model = NeRFRenderer(cfg, generator=torch.Generator().manual_seed(0))
        state = source.checkpoint_state()
        own = model.state_dict()
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if k in own}
        if not grid:
            model.load_state_dict(state["state_dict"], strict=False)
            model.field.encoding.active_levels = state["active_levels"]
        else:
            model.load_checkpoint_state(state)
    else:
        cfg = NeRFConfig(**{**BUILTIN_PRIOR_NERF_PRESET, "num_samples": samples, "occupancy_grid": grid})
        model = NeRFRenderer(cfg, generator=torch.Generator().manual_seed(0))
    model.train()
    if model.grid is not None:
        model.grid.update_every = 0  # timed steps keep one occupancy
        model.grid.update(model.field.density, torch.Generator().manual_seed(1))
    return model


def bench_nerf_step(checkpoint: str | None, size: int, samples: int, grid: bool, repeats: int) -> dict:
    model = _nerf(checkpoint, samples, grid)
    groups = [{"params": g.params, "lr": g.lr(0.0), "name": g.name} for g in model.param_groups()]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
    cams = _camera(size)
    weights = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(2))
    bg = torch.ones(3)
    evaluated = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model.render(cams, bg)
        (out.rgb * weights).sum().backward()
        model.after_backward(out, 1, 0.5, opt)
        opt.step()
        evaluated.append(out.aux.num_evaluated / out.aux.num_samples)

    median, best = time_ms(step, repeats)
    return {
        "renderer": "nerf",
        "size": size,
        "samples": samples,
        "grid": grid,
        "median_ms": round(median, 1),
        "min_ms": round(best, 1),
        "evaluated": round(sum(evaluated) / len(evaluated), 3),
        "params": model.size,
    }


def bench_gaussian_step(size: int, repeats: int) -> dict:
    from dreamlab.renderers.gaussians import GaussianConfig, GaussianRenderer

    model = GaussianRenderer(GaussianConfig(num_init=2000, init_radius=0.35), torch.Generator().manual_seed(0))
    groups = [{"params": g.params, "lr": g.lr(0.0), "name": g.name} for g in model.param_groups()]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
    cams = _camera(size)
    weights = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(2))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model.render(cams, torch.ones(3))
        (out.rgb * weights).sum().backward()
        opt.step()

    median, best = time_ms(step, repeats)
    return {"renderer": "gaussians (2000)", "size": size, "samples": "", "grid": "",
            "median_ms": round(median, 1), "min_ms": round(best, 1), "evaluated": "", "params": model.size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a NeRF run folder or checkpoint (default: initial blob)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--samples", type=int, nargs="+", default=[24, 48, 96])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# machine: {machine()}; torch threads {args.threads}; load {os.getloadavg()[0]:.2f}")
    print(f"# date: {time.strftime('%Y-%m-%d %H:%M')}; checkpoint: {args.checkpoint or 'initial blob'}")
    rows = []
    for size in args.sizes:
        rows.append(bench_gaussian_step(size, args.repeats))
        for samples in args.samples:
            for grid in (False, True):
                rows.append(bench_nerf_step(args.checkpoint, size, samples, grid, args.repeats))
    keys = ["renderer", "size", "samples", "grid", "median_ms", "min_ms", "evaluated", "params"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
