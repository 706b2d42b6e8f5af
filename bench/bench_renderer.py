"""Benchmark of the Gaussian rasterizer: one training step (render + backward + Adam) on CPU.

Scene: ``GaussianRenderer`` initialised the default way (uniform in a ball of radius 0.5, scales
= RMS distance to the 3 nearest neighbours, random rotations added here) with every opacity set
to ``--opacity``; one camera at distance 2.5, fov 49 degrees, elevation 15. The loss is a fixed
random linear function of the image (so backward does the full work).

Each configuration runs in its own subprocess so that memory can be measured cleanly: the
reported "peak extra RSS" is the process's peak resident set during the steps (warm-up step
included) minus the resident set just before them (scene built), i.e. the extra memory a
training step needs (tensors kept for backward, pair lists, temporaries, Adam state). The peak
is the kernel's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; where that is not
allowed it falls back to ``resource.getrusage(...).ru_maxrss`` (then a setup peak can hide the
step's). tracemalloc is not used: it does not see torch's allocations.

Timings on a shared machine are only meaningful when it is otherwise idle: with 2 torch threads
on 2 cores, any other busy process makes every op wait for a descheduled thread (10x slower).
The load average is printed before and after.

Usage::

    python bench/bench_renderer.py                  # full table (64/128/256 x 1k/5k/20k)
    python bench/bench_renderer.py --sizes 64 --counts 5000 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_one(size: int, count: int, repeats: int, opacity: float, threads: int) -> dict:
    import torch
    from dreamlab.renderers.gaussians import GaussianConfig, GaussianRenderer

    from dreamlab.types import orbit_cameras

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    cfg = GaussianConfig(num_init=count, init_opacity=opacity)
    model = GaussianRenderer(cfg, generator=gen)
    with torch.no_grad():
        model.quats.copy_(torch.randn(count, 4, generator=gen))
    groups = [{"params": g.params, "lr": g.lr(0.0), "name": g.name} for g in model.param_groups()]
    opt = torch.optim.Adam(groups, eps=1e-15)
    cams = orbit_cameras(
        torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([2.5]), torch.tensor([49.0]),
        size, size,
    )  # fmt: skip
    bg = torch.ones(3)
    weights = torch.rand(1, size, size, 3, generator=gen)

    def step() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model.render(cams, bg)
        t1 = time.perf_counter()
        loss = (out.rgb * weights).sum() + 0.1 * out.depth.mean()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, t1 - t0, out.aux.num_pairs

    rss0 = _status_kib("VmRSS")
    exact_peak = _reset_peak()
    step()  # warm-up (allocations, Adam state)
    totals, forwards, pairs = [], [], 0
    for _ in range(repeats):
        total, fwd, pairs = step()
        totals.append(total)
        forwards.append(fwd)
    if exact_peak:
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "size": size,
        "count": count,
        "pairs": pairs,
        "step_ms": 1000 * statistics.median(totals),
        "fwd_ms": 1000 * statistics.median(forwards),
        "min_ms": 1000 * min(totals),
        "peak_mib": max(0, peak - rss0) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--opacity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, count = (int(v) for v in args.one.split(","))
        print(json.dumps(run_one(size, count, args.repeats, args.opacity, args.threads)))
        return

    load = os.getloadavg()[0]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {args.threads}, opacity {args.opacity}, repeats {args.repeats}, "
        f"load average at start {load:.2f}, {time.strftime('%Y-%m-%d')}"
    )
    print()
    print(
        "| resolution | Gaussians | pairs | step median (ms) | step min (ms) | forward (ms) | peak extra RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for count in args.counts:
            cmd = [
                sys.executable, __file__, "--one", f"{size},{count}", "--repeats", str(args.repeats),
                "--opacity", str(args.opacity), "--threads", str(args.threads),
            ]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"| {size}x{size} | {count} | {r['pairs']} | {r['step_ms']:.0f} | {r['min_ms']:.0f} "
                f"| {r['fwd_ms']:.0f} | {r['peak_mib']:.0f} |",
                flush=True,
            )
    print()
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
