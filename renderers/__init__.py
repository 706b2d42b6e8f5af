"""3D representations that can be rendered differentiably (installed as ``dreamlab.renderers``)."""

from dreamlab.renderers.gaussians.model import GaussianConfig
from dreamlab.renderers.nerf.model import NeRFConfig

RENDERERS: dict[str, type] = {"gaussians": GaussianConfig, "nerf": NeRFConfig}
"""Renderer configs by CLI name; each config builds its renderer (see dreamlab.train.build_renderer)."""


def renderer_name(cfg: object) -> str:
    """The RENDERERS key of a renderer config."""
    for name, config_type in RENDERERS.items():
        if type(cfg) is config_type:
            return name
    raise KeyError(f"unregistered renderer config {type(cfg).__name__}")
