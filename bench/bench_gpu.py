"""GPU benchmark behind bench/gpu_check.sh: rasterizer backends, one SDS / VSD step, one full run.

Sections (``--sections``, all by default), each written to a Markdown report
(``gpu_report.md`` in ``--out``, default ``$OUT`` or ``bench-results/gpu``) headed by the card's
name from nvidia-smi:

* ``raster``: forward and forward+backward of ``rasterize_gaussians`` for every backend
  (``cuda`` = dreamlab's kernels, ``gsplat``, ``torch`` = the PyTorch twin) at 512² and 1024² with
  100k / 500k / 1M Gaussians (uniform in a ball of radius 0.5, scales ~0.6x the mean spacing,
  random rotations, opacity 0.5, one camera at distance 2.5, fov 49°). The torch twin is skipped
  at and beyond the first size where one step exceeds ``--torch-step-limit-s`` or runs out of
  memory.
* ``sds``, ``vsd``: one guidance step (encode, noise, CFG UNet passes, VSD's LoRA step, backward
  to the render) on a 512² render with an SD 2.1-base-architecture UNet + VAE built from config
  with random weights, fp16 on CUDA (bench/bench_sds_step.py builds them).
* ``prior``: training steps of the builtin prior (``dreamlab prior train-builtin``'s trainer,
  default network and batch 32) on the device, fp32 and bf16 autocast: median step time and the
  projected time of the default 6,500 steps, plus the first step's loss against the CPU's on the
  same batch and initial weights (how far the device's arithmetic drifts).
* ``generate``: ``python -m dreamlab generate "a red cube" --device cuda`` with the builtin prior
  and default settings, wall time including export.

``--device cpu --quick`` runs a tiny version of everything on the CPU (tests use it).
``--warm-gsplat`` only triggers gsplat's JIT build (gpu_check.sh runs it in the background).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `bench` is a folder of the checkout, not an installed package

import torch

SECTIONS = ("raster", "sds", "vsd", "prior", "generate")
BACKENDS = ("cuda", "gsplat", "torch")


@dataclass
class Report:
    header: list[str] = field(default_factory=list)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)

    def add(self, title: str, lines: list[str]) -> None:
        self.sections.append((title, lines))

    def markdown(self) -> str:
        parts = list(self.header) + [""]
        for title, lines in self.sections:
            parts += [f"## {title}", "", *lines, ""]
        return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--counts", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--torch-step-limit-s", type=float, default=3.0)
    parser.add_argument("--budget-s", type=float, default=None, help="skip sections past this")
    parser.add_argument("--generate-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--warm-gsplat", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolutions is None:
        args.resolutions = [32] if args.quick else [512, 1024]
    if args.counts is None:
        args.counts = [300] if args.quick else [100_000, 500_000, 1_000_000]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 10
    if args.out is None:
        args.out = (
            Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench-results" / "gpu"
        )
    return args


def card_description(device: str) -> str:
    """'NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.x' from nvidia-smi, else what torch says."""
    if device == "cuda" and shutil.which("nvidia-smi"):
        query = [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ]
        proc = subprocess.run(query, capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            name, memory, driver = (p.strip() for p in proc.stdout.splitlines()[0].split(","))
            return f"{name}, {memory}, driver {driver}"
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median and min wall time of ``fn`` in ms, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(samples), min(samples)


# ----------------------------------------------------------------------------- rasterizer


def raster_scene(n: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(n, 3, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    means = direction * 0.5 * torch.rand(n, 1, generator=g) ** (1.0 / 3.0)
    spacing = (4.0 / 3.0 * math.pi * 0.5**3 / max(n, 1)) ** (1.0 / 3.0)
    log_scales = math.log(0.6 * spacing) + 0.3 * torch.randn(n, 3, generator=g)
    quats = torch.randn(n, 4, generator=g)
    opac = torch.full((n,), 0.5)
    colors = torch.rand(n, 3, generator=g)
    return [t.to(device) for t in (means, quats, log_scales, opac, colors)]


def _availability(backend: str, device: str) -> str | None:
    from dreamlab.renderers.gaussians.rasterize import select_backend

    try:
        chosen = select_backend(backend, device)
    except (ValueError, RuntimeError) as exc:
        text = str(exc)
        return (text if len(text) <= 200 else text[:197] + "...").replace("|", "/")
    return None if chosen == backend else f"resolved to {chosen}"


def bench_raster(args: argparse.Namespace) -> list[str]:
    from dreamlab.renderers.gaussians.rasterize import rasterize_gaussians
    from dreamlab.types import orbit_cameras

    device = args.device
    lines = [
        (
            "forward = render with autograd recording; step = forward + backward of a random "
            f"linear loss on rgb and depth. Median of {args.repeats} after 1 warm-up; peak = extra "
            "GPU memory of one step. pairs: torch = (Gaussian, pixel) pairs, cuda / gsplat = "
            "(Gaussian, tile) intersections."
        ),
        "",
        "| resolution | Gaussians | backend | forward ms | step ms | step min ms | pairs | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    unavailable = {b: _availability(b, device) for b in args.backends}
    torch_stopped: tuple[int, int, str] | None = None
    for res in args.resolutions:
        cams = orbit_cameras(
            torch.tensor([30.0]), torch.tensor([15.0]), torch.tensor([2.5]), torch.tensor([49.0]),
            res, res,
        ).to(device)  # fmt: skip
        bg = torch.ones(3, device=device)
        weights = torch.rand(1, res, res, 3, generator=torch.Generator().manual_seed(1)).to(device)
        for count in args.counts:
            scene = raster_scene(count, device)
            for backend in args.backends:
                row = f"| {res}² | {count:,} | {backend} |"
                if unavailable[backend] is not None:
                    lines.append(f"{row} unavailable: {unavailable[backend]} | | | | |")
                    continue
                if (
                    backend == "torch"
                    and torch_stopped
                    and res >= torch_stopped[0]
                    and count >= torch_stopped[1]
                ):
                    lines.append(f"{row} skipped ({torch_stopped[2]}) | | | | |")
                    continue
                params = [t.clone().requires_grad_() for t in scene]

                def forward(params=params, backend=backend, cams=cams, bg=bg):
                    return rasterize_gaussians(*params, cams, bg, backend=backend)

                def step(params=params, forward=forward, weights=weights):
                    for p in params:
                        p.grad = None
                    rgb, _, depth, _ = forward()
                    ((rgb * weights).sum() + 0.1 * depth.mean()).backward()

                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    first = time.perf_counter() - t0
                    peak = (
                        (torch.cuda.max_memory_allocated() - base) / 2**20
                        if device == "cuda"
                        else float("nan")
                    )
                    repeats = args.repeats
                    if backend == "torch" and first > args.torch_step_limit_s:
                        repeats = 1
                        torch_stopped = (res, count, f"{res}²/{count:,} took {first:.1f} s a step")
                    pairs = forward()[3].num_pairs
                    fwd_med, _ = time_ms(forward, device, repeats, warmup=0)
                    step_med, step_min = time_ms(step, device, repeats, warmup=0)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    lines.append(f"{row} out of memory | | | | |")
                    if backend == "torch":
                        torch_stopped = (res, count, f"out of memory at {res}²/{count:,}")
                    continue
                peak_text = f"{peak:.0f}" if math.isfinite(peak) else "—"
                lines.append(
                    f"{row} {fwd_med:.2f} | {step_med:.2f} | {step_min:.2f} | {pairs:,} | {peak_text} |"
                )
                print(lines[-1], flush=True)
                del params
    return lines


def warm_gsplat() -> int:
    """Triggers gsplat's JIT build with one tiny render (gpu_check.sh runs this in background)."""
    from dreamlab.renderers.gaussians.rasterize import rasterize_gaussians
    from dreamlab.types import orbit_cameras

    start = time.perf_counter()
    cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.5]),
                         torch.tensor([49.0]), 32, 32).to("cuda")  # fmt: skip
    rasterize_gaussians(
        *raster_scene(100, "cuda"), cams, torch.ones(3, device="cuda"), backend="gsplat"
    )
    torch.cuda.synchronize()
    print(f"gsplat ready in {time.perf_counter() - start:.1f} s")
    return 0


# ----------------------------------------------------------------------------- guidance steps


def bench_guidance(args: argparse.Namespace, methods: list[str]) -> list[str]:
    from bench.bench_sds_step import _WidenedPrior, sd21_base_components
    from dreamlab.cameras import CameraSamplerConfig, sample_orbit_cameras
    from dreamlab.guidance.sds import SDSConfig
    from dreamlab.guidance.vsd import VSDConfig
    from dreamlab.priors.stable_diffusion import StableDiffusionPrior
    from dreamlab.priors.testing import make_tiny_sd_components
    from dreamlab.prompts import build_prompt_embeds

    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    if args.quick:
        prior = StableDiffusionPrior.from_components(
            *make_tiny_sd_components(), device=device, dtype=dtype
        )
        what, res = f"tiny random SD ({prior.image_size} px)", prior.image_size
    else:
        prior = _WidenedPrior.from_components(
            *sd21_base_components(device), device=device, dtype=dtype
        )
        what, res = "SD 2.1-base architecture, random weights", 512
    build_s = time.perf_counter() - start
    lines = [
        (
            f"{what}, {str(dtype).replace('torch.', '')}, render {res}² -> latents "
            f"{res // prior.vae_scale_factor}²; prior built in {build_s:.1f} s. One step = "
            "guidance call (VSD: including its LoRA step) + backward to the render."
        ),
        "",
        "| method | median ms | min ms | peak GiB |",
        "|---|---|---|---|",
    ]
    embeds = build_prompt_embeds(prior, "a red cube")
    gen = torch.Generator().manual_seed(0)
    for name in methods:
        guidance = (SDSConfig() if name == "sds" else VSDConfig()).build(prior)
        cams = sample_orbit_cameras(CameraSamplerConfig(), res, gen).to(device)
        image = torch.rand(1, res, res, 3, device=device, requires_grad=True)

        def step(guidance=guidance, cams=cams, image=image):
            image.grad = None
            guidance(image, cams, embeds, 0.5, gen).loss.backward()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        median, best = time_ms(step, device, max(1, args.repeats // 2), warmup=1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        peak_text = f"{peak:.1f}" if math.isfinite(peak) else "—"
        lines.append(f"| {name.upper()} | {median:.0f} | {best:.0f} | {peak_text} |")
        print(lines[-1], flush=True)
        del guidance
    return lines


# ----------------------------------------------------------------------------- prior training


def bench_prior_training(args: argparse.Namespace) -> list[str]:
    from dreamlab.priors.train_builtin import (
        BuiltinPriorTrainer,
        BuiltinTrainConfig,
        autocast_supported,
        cpu_has_native_bf16,
    )
    from dreamlab.world.dataset import WorldDataConfig, load_or_build_world_cache

    device = torch.device(args.device)
    steps = 2 if args.quick else 40
    batch = 8 if args.quick else 32
    data = WorldDataConfig(num_views=64 if args.quick else 2000)  # a step's cost does not depend on it
    lines = [
        f"Trainer of `dreamlab prior train-builtin`, default network, batch {batch}, {data.num_views}-view "
        f"cache; median of {steps} steps after 3 warm-up steps. 'first-step loss vs CPU': the same "
        "batch and initial weights on the CPU in fp32.",
        "",
        "| arithmetic | median s / step | 6,500 steps (min) | first-step loss | vs CPU |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cache = load_or_build_world_cache(data, Path(tmp) / "cache")
        cpu_cfg = BuiltinTrainConfig(steps=6500, batch_size=batch, data=data, precision="fp32")
        cpu_loss = BuiltinPriorTrainer(cpu_cfg, Path(tmp) / "cpu", cache=cache).train_step().loss
        for precision in ("fp32", "bf16"):
            reason = autocast_supported(precision, device)
            if reason is None and precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
                reason = "this CPU has no native bf16"
            if reason is not None:
                lines.append(f"| {precision} | skipped: {reason} | | | |")
                continue
            cfg = BuiltinTrainConfig(steps=6500, batch_size=batch, data=data, precision=precision)
            trainer = BuiltinPriorTrainer(cfg, Path(tmp) / precision, cache=cache, device=device)
            first = trainer.train_step().loss
            for _ in range(2):
                trainer.train_step()
            median, _ = time_ms(trainer.train_step, args.device, steps, warmup=0)
            lines.append(
                f"| {precision} | {median / 1000:.4f} | {6500 * median / 60000:.1f} | {first:.5f} | "
                f"{(first - cpu_loss) / cpu_loss:+.2%} |"
            )
            print(lines[-1], flush=True)
    return lines


# ----------------------------------------------------------------------------- full run


def generate_command(device: str, out_dir: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dreamlab", "generate", "a red cube", "--device", device,
           "--out", str(out_dir), "--quiet"]  # fmt: skip
    if quick:
        cmd += ["--steps", "3", "--formats", "ply"]
    return cmd


def bench_generate(args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = generate_command(args.device, Path(tmp), args.quick)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.generate_timeout_s, check=False
            )
            code, tail = proc.returncode, (proc.stdout + proc.stderr)[-800:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", ""
        wall = time.perf_counter() - start
        run_log = Path(tmp) / "a-red-cube" / "run.log"
        text = run_log.read_text() if run_log.is_file() else ""
        shown = " ".join(c if " " not in c else f'"{c}"' for c in cmd[1:]).replace(tmp, "TMPDIR")
    backend = re.search(r"gaussian rasterizer: (backend .*)", text)
    export = re.search(r"export took ([0-9.]+) s", text)
    steps = re.findall(r"step (\d+)/(\d+)", text)
    lines = [
        "| command | exit | wall s | export s | last step | rasterizer |",
        "|---|---|---|---|---|---|",
        (
            f"| `python {shown}` | {code} | {wall:.1f} | {export.group(1) if export else '?'} | "
            f"{'/'.join(steps[-1]) if steps else '?'} | {backend.group(1) if backend else '?'} |"
        ),
    ]
    if code != 0:
        lines += ["", "```", tail.strip(), "```"]
    return lines


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warm_gsplat:
        return warm_gsplat()
    start = time.perf_counter()
    report = Report(
        header=[
            f"# dreamlab GPU check: {card_description(args.device)}",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}), Python {platform.python_version()}, device {args.device}"
            + (", --quick" if args.quick else ""),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_report.md"

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    guidance = [s for s in ("sds", "vsd") if s in args.sections]
    for section in args.sections:
        if section == "vsd" and "sds" in args.sections:
            continue  # measured together with sds (one prior build)
        title = {"raster": "Rasterizer", "sds": "Guidance steps", "vsd": "Guidance steps",
                 "prior": "Builtin prior training", "generate": "Full run (builtin prior, defaults)"}[section]  # fmt: skip
        if over_budget():
            report.add(title, [f"skipped: time budget of {args.budget_s:.0f} s used up"])
            continue
        t0 = time.perf_counter()
        try:
            if section == "raster":
                lines = bench_raster(args)
            elif section in ("sds", "vsd"):
                lines = bench_guidance(args, guidance)
            elif section == "prior":
                lines = bench_prior_training(args)
            else:
                lines = bench_generate(args)
        except Exception as exc:  # noqa: BLE001 - a failing section must not lose the others' results
            lines = [f"failed: {type(exc).__name__}: {exc}"]
        lines.append(f"\n({time.perf_counter() - t0:.0f} s)")
        report.add(title, lines)
        path.write_text(report.markdown())  # keep partial results if a later section hangs
    path.write_text(report.markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
