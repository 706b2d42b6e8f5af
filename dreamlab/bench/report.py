"""Helpers shared by the benchmarks: machine line, Markdown/CSV tables, labelled image grids."""

from __future__ import annotations

import csv
import datetime
import io
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dreamlab.export.atomic import atomic_write_bytes, atomic_write_text


def machine() -> str:
    """One line describing the machine and torch build the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}"
    )


def fmt(value: object, digits: int = 3) -> str:
    """Table cell text: floats rounded, NaN/None as an em dash, bools as yes/no."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |")
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Writes a CSV atomically (floats with full precision, None as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if c is None else c for c in row])
    atomic_write_text(path, buffer.getvalue())
    return path


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H, W, 3] (or [3, H, W] tensor) floats in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [H, W, C] so 32 px samples stay readable."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def framed(image: np.ndarray, colour: tuple[int, int, int], width: int = 2) -> np.ndarray:
    out = image.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out


def grid_png(
    path: Path,
    rows: Sequence[Sequence[np.ndarray]],
    labels: Sequence[str],
    label_width: int = 220,
    gap: int = 4,
) -> Path:
    """Writes a PNG: one row of uint8 [h, w, 3] tiles per entry of ``rows``, a text label at left.

    Tiles in one row may differ in width (all share the row's tallest height).
    """
    from PIL import Image, ImageDraw

    heights = [max((t.shape[0] for t in row), default=8) for row in rows]
    widths = [sum(t.shape[1] for t in row) + gap * max(0, len(row) - 1) for row in rows]
    width = label_width + max(widths, default=8) + gap
    height = sum(heights) + gap * (len(rows) + 1)
    canvas = Image.new("RGB", (width, max(height, 8)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = gap
    for row, label, h in zip(rows, labels, heights):
        draw.text((4, y + max(0, h // 2 - 6)), label, fill=(0, 0, 0))
        x = label_width
        for tile in row:
            canvas.paste(Image.fromarray(tile), (x, y))
            x += tile.shape[1] + gap
        y += h + gap
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
