"""Over-saturation of each guidance method's results, read from the zoo's quality.png grids.

For every method folder under ``bench-results/zoo-composites`` (written by ``dreamlab bench
quality ... --out bench-results/zoo-composites/NAME``): each run's result row is compared with
its ground-truth row, over the pixels that are foreground in both (any channel below 0.93 on the
white background), by mean HSV saturation (max - min) / max. Prints result, truth and their
difference ("excess": > 0 means more saturated than the ground truth). Reads the 8-bit PNG the
benchmark writes, so it is a coarse measure; the layout constants match ``bench.report.grid_png``
as ``bench.quality._write_png`` calls it (label 220 px, gap 2 px, 64 px tiles).

New runs of ``dreamlab bench quality`` report the same quantity exactly (the "saturation" column,
docs/metrics.md, from float renders); this script reads it back from the PNGs of runs made before
that column existed.

Usage: python bench/zoo_saturation.py [--root bench-results/zoo-composites] [METHOD ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path("bench-results/zoo-composites")
LABEL, GAP, TILE = 220, 2, 64


def saturation(rgb: np.ndarray) -> np.ndarray:
    high, low = rgb.max(-1), rgb.min(-1)
    return np.where(high > 1e-6, (high - low) / np.maximum(high, 1e-6), 0.0)


def run_tiles(image: np.ndarray, run: int) -> tuple[np.ndarray, np.ndarray]:
    """(result row, ground-truth row) of run number ``run`` (the CSV's row order) in a
    ``quality.png`` read as an [H, W, 3] array, label column cut off."""
    top = GAP + 2 * run * (TILE + GAP)
    return image[top : top + TILE, LABEL:], image[top + TILE + GAP : top + 2 * TILE + GAP, LABEL:]


def method_saturation(png: Path) -> tuple[float, float]:
    """(mean result saturation, mean truth saturation) over the runs of one quality.png."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(np.float32) / 255.0
    runs = (image.shape[0] - GAP) // (2 * (TILE + GAP))
    results, truths = [], []
    for k in range(runs):
        result, truth = run_tiles(image, k)
        both = (truth < 0.93).any(-1) & (result < 0.93).any(-1)
        results.append(saturation(result)[both].mean())
        truths.append(saturation(truth)[both].mean())
    return float(np.mean(results)), float(np.mean(truths))


def main(argv: list[str]) -> None:
    root = ROOT
    if argv[:1] == ["--root"]:
        root, argv = Path(argv[1]), argv[2:]
    methods = argv or sorted(p.name for p in root.iterdir() if (p / "quality.png").is_file())
    print("| method | result saturation | truth | excess |\n|---|---|---|---|")
    for name in methods:
        result, truth = method_saturation(root / name / "quality.png")
        print(f"| {name} | {result:.3f} | {truth:.3f} | {result - truth:+.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
