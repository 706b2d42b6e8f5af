"""Every guidance method on the 2-D Gaussian-mixture toy prior (``dreamlab.priors.toy``).

N particles (points standing in for 3D models) start in a small blob at the centre and are
optimised with Adam by each method in ``dreamlab.guidance.GUIDANCES``, called exactly as the
trainer calls it, against a target of 4 well-separated Gaussian modes (weights 0.4/0.3/0.2/0.1).
Every method runs with its paper defaults; VSD/ESD additionally need the toy's LoRA target
modules and a faster LoRA learning rate (1e-2: the paper's 1e-4 is tuned for 25k steps). Extra
rows show settings the defaults hide: SDS at the builtin prior's CFG 7.5, VSD and ESD at CFG 1
(the score of the target itself), ESD/VSD with a camera that identifies the particle
("views of one object", the ESD paper's setting), and CDS at CFG 1.

Writes ``docs/img/guidance-toy.png`` (one panel per run over [-1.25, 1.25]²: target samples as
grey dots, mode centres as crosses with 2-std circles, initial particles as small blue rings,
final particles as red discs; particles beyond the frame as hollow squares on it) and prints a
Markdown table of the measured quantities.
Uses Pillow for drawing (matplotlib is not a dependency).

Usage: nice -n 19 python bench/plot_guidance_toy.py [--steps 800] [--particles 64] [--views 8]
(about 2 CPU-minutes with the defaults).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dreamlab.cameras import CameraSamplerConfig, sample_orbit_cameras
from dreamlab.guidance import GUIDANCES
from dreamlab.priors.toy import (
    TOY_LORA_TARGETS,
    GaussianMixturePrior,
    particle_metrics,
    run_particles,
)
from dreamlab.prompts import PromptConfig, build_prompt_embeds
from dreamlab.schedules import Constant

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "guidance-toy.png"
LORA = {"lora_target_modules": TOY_LORA_TARGETS, "lora_lr": 1e-2}


def runs() -> list[tuple[str, str, dict, str]]:
    """(label, method, config overrides, camera setting) for every panel.

    Camera setting "A": fresh random cameras every step, independent of the particle (N
    independent 3D models, ProlificDreamer's particles). "B": particle i is always seen from its
    own fixed camera (views of one object: q(x | c) is a point mass, the ESD paper's setting); these
    runs use ``--object-views`` particles (8) rendered N·K/8 times each, so the camera MLP can tell
    the views apart within the budget.
    """
    rows = []
    for name in GUIDANCES:
        rows.append((name, name, dict(LORA) if name in ("vsd", "esd") else {}, "A"))
    rows += [
        ("sds s=7.5", "sds", {"guidance_scale": 7.5}, "A"),
        ("vsd s=1", "vsd", {**LORA, "guidance_scale": 1.0}, "A"),
        ("vsd s=1 cam=id", "vsd", {**LORA, "guidance_scale": 1.0}, "B"),
        ("esd s=1 lam=0.5 cam=id", "esd", {**LORA, "guidance_scale": 1.0,
                                            "entropy_weight": Constant(0.5)}, "B"),
        ("esd s=1 lam=1 cam=id", "esd", {**LORA, "guidance_scale": 1.0,
                                          "entropy_weight": Constant(1.0)}, "B"),
        ("cds s=1", "cds", {"guidance_scale": 1.0}, "A"),
    ]
    return rows


def cameras(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return sample_orbit_cameras(CameraSamplerConfig(batch_size=count), 16, generator)


def run_one(prior, embeds, method: str, overrides: dict, setting: str, args, seed: int = 0):
    if setting == "A":
        n, k = args.particles, args.views
    else:  # same batch size N·K, fewer particles
        n, k = args.object_views, args.particles * args.views // args.object_views
    init = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + seed)) * 0.2
    if setting == "A":
        def cams_for_step(step: int):
            return cameras(n * k, 1000 * seed + step)
    else:
        fixed = cameras(n, 77 + seed)[torch.arange(n).repeat_interleave(k)]

        def cams_for_step(step: int):
            return fixed
    guidance = GUIDANCES[method](**overrides).build(prior, PromptConfig())
    final, _ = run_particles(
        guidance, prior, init, cams_for_step, embeds, args.steps, args.lr, views=k, seed=seed
    )
    return init, final


# ---------------------------------------------------------------------------------- drawing

PANEL, MARGIN, HEADER = 260, 8, 34
EXTENT = 1.25  # panels show [-EXTENT, EXTENT]^2 in mixture coordinates


def _to_px(points: np.ndarray) -> np.ndarray:
    inner = PANEL - 2 * MARGIN
    xy = (points + EXTENT) / (2 * EXTENT) * inner + MARGIN
    xy[:, 1] = PANEL - xy[:, 1] + HEADER  # y up
    return xy


def draw_panel(
    title: str,
    subtitle: str,
    prior,
    reference: np.ndarray,
    init: np.ndarray,
    final: np.ndarray,
    font,
):
    img = Image.new("RGB", (PANEL, PANEL + HEADER), "white")
    d = ImageDraw.Draw(img)
    frame = [MARGIN, HEADER + MARGIN, PANEL - MARGIN, PANEL + HEADER - MARGIN]
    d.rectangle(frame, outline=(200, 200, 200))
    for x, y in _to_px(reference.copy()):
        d.point((x, y), fill=(190, 190, 190))
    for x, y in _to_px(init.copy()):
        d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], outline=(150, 170, 220))
    for (x, y), s in zip(_to_px(np.array(prior.target.means, dtype=np.float64)), prior.target.stds):
        r = 2 * s / (2 * EXTENT) * (PANEL - 2 * MARGIN)
        d.ellipse([x - r, y - r, x + r, y + r], outline=(60, 60, 60))
        d.line([x - 5, y, x + 5, y], fill=(0, 0, 0), width=2)
        d.line([x, y - 5, x, y + 5], fill=(0, 0, 0), width=2)
    outside = 0
    lo, hi = MARGIN, PANEL - MARGIN
    for x, y in _to_px(np.nan_to_num(final.copy(), nan=1e6)):
        if lo <= x <= hi and HEADER + lo <= y <= HEADER + hi:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 60, 30), outline=(120, 20, 0))
            continue
        outside += 1  # off the panel: a hollow square on the frame, in the particle's direction
        x, y = min(max(x, lo), hi), min(max(y, HEADER + lo), HEADER + hi)
        d.rectangle([x - 3, y - 3, x + 3, y + 3], outline=(220, 60, 30), width=2)
    title += f"  ({outside} off-panel)" if outside else ""
    d.text((6, 3), title, fill=(0, 0, 0), font=font)
    d.text((6, 18), subtitle, fill=(60, 60, 60), font=font)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--views", type=int, default=8, help="renders of each particle per step")
    parser.add_argument(
        "--object-views", type=int, default=8,
        help="particles in the 'views of one object' runs (cam=id), same batch size",
    )
    parser.add_argument(
        "--lr", type=float, default=0.01, help="Adam lr in pixel units (cosine-decayed)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    prior = GaussianMixturePrior()
    embeds = build_prompt_embeds(prior, "four blobs")
    reference = prior.target.sample(4096, torch.Generator().manual_seed(1))
    exact = prior.target.sample(args.particles, torch.Generator().manual_seed(2))
    truth = particle_metrics(exact, prior, reference)

    panels, table = [], []
    for label, method, overrides, setting in runs():
        start = time.process_time()
        try:
            init, final = run_one(prior, embeds, method, overrides, setting, args)
        except Exception as err:  # report, keep going: the table shows which method failed and why
            print(f"{label}: FAILED {type(err).__name__}: {err}")
            table.append((label, None, f"{type(err).__name__}: {err}"))
            continue
        seconds = time.process_time() - start
        m = particle_metrics(final, prior, reference)
        m["cpu_s"] = seconds
        table.append((label, m, ""))
        occ = "/".join(f"{m[f'occupancy_{i}']:.2f}" for i in range(4))
        subtitle = f"occ {occ}  swd {m['swd']:.2f}"
        panels.append(draw_panel(label, subtitle, prior, reference[:1500].numpy(), init.numpy(),
                                 final.numpy(), FONT))
        print(f"{label}: {seconds:.1f} s cpu", flush=True)

    cols = 4
    rows = math.ceil((len(panels) + 1) / cols)
    sheet = Image.new("RGB", (cols * PANEL, rows * (PANEL + HEADER)), "white")
    weights = "/".join(str(w) for w in prior.target.weights)
    target_panel = draw_panel(f"target ({args.particles} exact samples)", f"weights {weights}",
                              prior, reference[:1500].numpy(), np.zeros((0, 2)), exact.numpy(), FONT)
    for i, panel in enumerate([target_panel, *panels]):
        sheet.paste(panel, ((i % cols) * PANEL, (i // cols) * (PANEL + HEADER)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")

    keys = ["modes_occupied", "occupancy_tv", "spread_ratio", "nn_dist", "knn_entropy",
            "mode_dist", "max_abs", "swd"]
    print()
    object_k = args.particles * args.views // args.object_views
    print(f"{args.particles} particles x {args.views} views ('cam=id' runs: {args.object_views} "
          f"particles x {object_k} views), {args.steps} Adam steps (lr {args.lr}, cosine), seed 0; "
          "occupancy = fraction of particles nearest each mode")
    print()
    print("| run | occupancy (0.4/0.3/0.2/0.1) | " + " | ".join(keys) + " | cpu s |")
    print("|---|---|" + "---|" * len(keys) + "---|")
    truth_occ = "/".join(f"{truth[f'occupancy_{i}']:.2f}" for i in range(4))
    cells = " | ".join(f"{truth[k]:.3g}" for k in keys)
    print(f"| {args.particles} exact samples | {truth_occ} | {cells} | – |")
    for label, m, error in table:
        if m is None:
            print(f"| {label} | failed: {error} |" + " |" * (len(keys) + 1))
            continue
        occ = "/".join(f"{m[f'occupancy_{i}']:.2f}" for i in range(4))
        cells = " | ".join(f"{m[k]:.3g}" for k in keys)
        print(f"| {label} | {occ} | {cells} | {m['cpu_s']:.1f} |")


try:
    FONT = ImageFont.load_default(size=12)
except TypeError:  # Pillow < 10.1
    FONT = ImageFont.load_default()

if __name__ == "__main__":
    main()
