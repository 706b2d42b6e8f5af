"""Hash-grid NeRF: Instant-NGP encoding (pure-PyTorch twin), density / albedo field, volume
rendering with an occupancy grid, and the :class:`NeRFRenderer` (a dreamlab Renderer)."""

from dreamlab.renderers.nerf.field import NeRFField, trunc_exp
from dreamlab.renderers.nerf.hash_encoding import HashEncoding, LevelSchedule
from dreamlab.renderers.nerf.model import NeRFConfig, NeRFRenderer
from dreamlab.renderers.nerf.render import OccupancyGrid, VolumeAux, render_cameras, render_rays

__all__ = [
    "HashEncoding",
    "LevelSchedule",
    "NeRFConfig",
    "NeRFField",
    "NeRFRenderer",
    "OccupancyGrid",
    "VolumeAux",
    "render_cameras",
    "render_rays",
    "trunc_exp",
]
