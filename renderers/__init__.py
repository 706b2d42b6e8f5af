"""3D representations that can be rendered differentiably (installed as ``dreamlab.renderers``)."""

from dreamlab.renderers.gaussians.model import GaussianConfig

RENDERERS: dict[str, type] = {"gaussians": GaussianConfig}
"""Renderer configs by CLI name; each config builds its renderer (see dreamlab.train.build_renderer)."""
