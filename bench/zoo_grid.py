"""One picture per prompt comparing guidance methods: ground truth, then each method's result row.

Reads the ``quality.png`` grids that ``dreamlab bench quality --out DIR`` writes (a result row and
a ground-truth row per run; cut with ``bench.zoo_saturation.run_tiles``) and the matching
``quality.csv`` (for the run order), and writes
one PNG with the truth once and every method's result for the chosen prompt and seed, each row
labelled with the method name and its IoU / Janus from the CSV.

Usage::

    python -m bench.zoo_grid OUT.png "a house" sds=bench-results/x/sds vsd=bench-results/x/vsd ...
        [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from bench.zoo_saturation import GAP, run_tiles
from dreamlab.bench.report import grid_png


def result_and_truth(run_dir: Path, prompt: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(result row, truth row, CSV row) of ``prompt`` at ``seed`` in one bench folder."""
    with open(run_dir / "quality.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    index = next((k for k, r in enumerate(rows) if r["prompt"] == prompt and int(r["seed"]) == seed), None)
    if index is None:
        raise SystemExit(f"{run_dir}: no run of {prompt!r} at seed {seed}")
    image = np.asarray(Image.open(run_dir / "quality.png").convert("RGB"))
    result, truth = run_tiles(image, index)
    return result, truth, rows[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("runs", nargs="+", help="NAME=FOLDER of a bench quality run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows, labels = [], []
    for k, item in enumerate(args.runs):
        name, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"expected NAME=FOLDER, got {item!r}")
        result, truth, row = result_and_truth(Path(folder), args.prompt, args.seed)
        if k == 0:
            rows.append([truth])
            labels.append(f"{args.prompt}: ground truth")
        janus = f", Janus {float(row['janus']):.2f}" if row.get("janus") else ""
        rows.append([result])
        labels.append(f"{name}: IoU {float(row['iou']):.3f}{janus}")
    grid_png(args.out, rows, labels, gap=GAP)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
