"""Analytic fake renderers for the export tests: a torus and a cube as smooth density fields.

The density is a sigmoid of a signed distance function (inside ~``peak``, outside ~0), the colour
is either a constant or a smooth gradient of the position, so tests know the exact answer.
``render`` draws a cheap shaded disc (no volume rendering); it only has to give the video and
preview writers images of the right shape that change with the camera.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dreamlab.export.ply import SplatArrays
from dreamlab.renderers.base import ParamGroup, Renderer
from dreamlab.types import Cameras, RenderOutput

JS_DIR = Path(__file__).resolve().parent / "js"


def torus_sdf(xyz: Tensor, major: float = 0.35, minor: float = 0.12) -> Tensor:
    """Torus around the Y axis (hole visible from above)."""
    q = torch.sqrt(xyz[:, 0] ** 2 + xyz[:, 2] ** 2) - major
    return torch.sqrt(q**2 + xyz[:, 1] ** 2) - minor


def box_sdf(xyz: Tensor, half: float = 0.3) -> Tensor:
    q = xyz.abs() - half
    outside = q.clamp_min(0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp_max(0)
    return outside + inside


class FakeFieldRenderer(Renderer):
    """A Renderer whose density/colour are analytic (no trainable parameters)."""

    def __init__(
        self,
        shape: str = "torus",
        color: tuple[float, float, float] | None = (0.8, 0.3, 0.1),
        sharpness: float = 80.0,
        peak: float = 5.0,
        offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        super().__init__()
        self.shape = shape
        self.const_color = color  # None -> gradient colour of the position
        self.sharpness = sharpness
        self.peak = peak
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))

    def sdf(self, xyz: Tensor) -> Tensor:
        p = xyz - self.offset
        if self.shape == "torus":
            return torus_sdf(p)
        if self.shape == "cube":
            return box_sdf(p)
        if self.shape == "empty":
            return torch.full_like(p[:, 0], 10.0)
        raise ValueError(self.shape)

    def density(self, xyz: Tensor) -> Tensor:
        return self.peak * torch.sigmoid(-self.sharpness * self.sdf(xyz))

    def color(self, xyz: Tensor) -> Tensor:
        if self.const_color is not None:
            return torch.tensor(self.const_color, dtype=xyz.dtype).expand(xyz.shape[0], 3).clone()
        return gradient_color(xyz)

    def render(self, cams: Cameras, background: Tensor) -> RenderOutput:
        b, h, w = len(cams), cams.height, cams.width
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        r = torch.sqrt((ii + 0.5 - h / 2) ** 2 + (jj + 0.5 - w / 2) ** 2) / (0.3 * h)
        alpha = (r < 1).float()[None, :, :, None].expand(b, h, w, 1)
        shade = (0.5 + 0.5 * torch.cos(torch.deg2rad(cams.azimuth_deg)))[:, None, None, None]
        base = torch.tensor(self.const_color or (0.2, 0.6, 0.9))
        fg = (base * (0.4 + 0.6 * shade)).expand(b, h, w, 3)
        bg = background.reshape(-1, 3).expand(b, 3)[:, None, None, :]
        rgb = alpha * fg + (1 - alpha) * bg
        return RenderOutput(rgb=rgb, alpha=alpha, depth=alpha * 2.4)

    def param_groups(self) -> list[ParamGroup]:
        return []

    def checkpoint_state(self) -> dict[str, Any]:
        return {"shape": self.shape}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.shape = state["shape"]

    @property
    def size(self) -> int:
        return 0


class FakeSplatRenderer(FakeFieldRenderer):
    """The torus renderer that also exposes Gaussian parameters, like the splat renderer."""

    def splat_arrays(self) -> SplatArrays:
        return random_splats(50, sh_degree=1, seed=0)


def gradient_color(xyz: Tensor) -> Tensor:
    """A smooth, position-dependent colour in [0.1, 0.9] (to check UV/texel placement)."""
    return (0.5 + 0.8 * xyz).clamp(0.1, 0.9)


def random_splats(n: int, sh_degree: int = 3, seed: int = 0) -> SplatArrays:
    rng = np.random.default_rng(seed)
    k = (sh_degree + 1) ** 2 - 1
    quats = rng.normal(size=(n, 4)).astype(np.float32)
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    return SplatArrays(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        sh_dc=rng.normal(size=(n, 3)).astype(np.float32),
        sh_rest=rng.normal(size=(n, k, 3)).astype(np.float32),
        opacity_logits=rng.normal(size=(n,)).astype(np.float32),
        log_scales=rng.normal(size=(n, 3)).astype(np.float32) - 3,
        quats=quats,
    )


def run_gltf_validator(path: Path) -> dict:
    """Runs the Khronos glTF-Validator (tests/js) on ``path`` and returns its JSON report.

    Raises AssertionError (a test failure, never a skip) when node or the npm package is missing.
    """
    node = shutil.which("node")
    assert (
        node is not None
    ), "node is not on PATH: install Node.js >= 18 to run the glTF validator test"
    assert (JS_DIR / "node_modules" / "gltf-validator").is_dir(), (
        f"gltf-validator is not installed: run `npm ci --prefix {JS_DIR.relative_to(JS_DIR.parents[1])}` "
        "from the repository root"
    )
    proc = subprocess.run(
        [node, str(JS_DIR / "validate.mjs"), str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"validator failed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


validate_glb = run_gltf_validator
"""Alias used by the CLI end-to-end tests."""
