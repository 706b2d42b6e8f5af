"""Loading and validating a user's reference image (VPCSM's ``--image-prompt PATH``).

Pillow reads the file; this module only checks what a diffusion prior can use and says what is
wrong in one line: the path exists and is a file, it decodes as a still image, its mode is
greyscale / RGB / palette / CMYK (with or without alpha), it is at least ``MIN_SIDE`` pixels on its
short side and at most ``MAX_SIDE`` on its long side, at most ``MAX_ASPECT``:1, and, with alpha,
not fully transparent. The result is RGB in [0, 1], alpha composited over the run's background,
padded to a square with that background (so the whole object stays in view).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MIN_SIDE = 16
MAX_SIDE = 8192
MAX_ASPECT = 4.0
SUPPORTED = "PNG, JPEG, WebP, BMP, TIFF or GIF (a still image)"


class ImagePromptError(ValueError):
    """The image prompt cannot be used; the message says why and what to do."""


def load_image_prompt(path: str | os.PathLike[str], background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Reads and validates ``path`` -> [3, S, S] float32 RGB in [0, 1] (module docstring)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImagePromptError(f"image prompt {path} does not exist")
    if not path.is_file():
        raise ImagePromptError(f"image prompt {path} is not a file")
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise ImagePromptError(f"image prompt {path} is animated ({image.n_frames} frames); give one still image")
            image.load()
            mode, size = image.mode, image.size
            if mode in ("P", "PA"):
                image = image.convert("RGBA")
            elif mode == "CMYK":
                image = image.convert("RGB")
            elif mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                image = Image.fromarray(np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
            elif mode == "F":
                array = np.asarray(image, dtype=np.float64)
                image = Image.fromarray(np.clip(array * 255.0, 0, 255).astype(np.uint8))
            elif mode not in ("L", "LA", "RGB", "RGBA"):
                raise ImagePromptError(f"image prompt {path} has unsupported pixel mode {mode!r}; save it as RGB or RGBA")
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    except ImagePromptError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImagePromptError(f"cannot read image prompt {path} as an image ({err}); use {SUPPORTED}") from None
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise ImagePromptError(f"image prompt {path} is {width}x{height} pixels; it needs at least {MIN_SIDE} on each side")
    if max(width, height) > MAX_SIDE:
        raise ImagePromptError(f"image prompt {path} is {width}x{height} pixels; at most {MAX_SIDE} per side, resize it")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImagePromptError(
            f"image prompt {path} is {width}x{height} pixels; crop it to the object (aspect ratio at most {MAX_ASPECT:g}:1)"
        )
    alpha = rgba[..., 3:]
    if not (alpha > 0.0).any():
        raise ImagePromptError(f"image prompt {path} is fully transparent")
    bg = np.asarray(background, dtype=np.float32)
    rgb = rgba[..., :3] * alpha + bg * (1.0 - alpha)
    side = max(width, height)
    square = np.empty((side, side, 3), dtype=np.float32)
    square[:] = bg
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = rgb
    return torch.from_numpy(square).permute(2, 0, 1).contiguous()
