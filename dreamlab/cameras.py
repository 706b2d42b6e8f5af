"""Camera samplers: random orbit cameras for training, fixed orbits for evaluation and video.

Ranges follow DreamFusion/threestudio and DreamGaussian (distance ~2.5, fov ~49°, elevations
mostly above the horizon, azimuth uniform over the full circle). All randomness comes from an
explicit ``torch.Generator`` so training is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamlab.types import Cameras, orbit_cameras


@dataclass
class CameraSamplerConfig:
    """Ranges of the random orbit cameras used during training."""

    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    """Elevation range in degrees (uniform)."""
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    """Azimuth range in degrees (uniform; 0 looks at the object's front, +Z)."""
    distance: tuple[float, float] = (2.2, 2.6)
    """Camera distance from the origin (uniform)."""
    fov_y_deg: tuple[float, float] = (45.0, 50.0)
    """Vertical field of view range in degrees (uniform)."""
    batch_size: int = 1
    """Cameras per training step."""
    stratified_azimuth: bool = True
    """With batch > 1, spread the azimuths evenly around the circle from a random offset."""

    def validate(self) -> None:
        for name in ("elevation_deg", "azimuth_deg", "distance", "fov_y_deg"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"camera {name} range must be (low, high) with low <= high, got {(low, high)}")
        if not -90.0 <= self.elevation_deg[0] and self.elevation_deg[1] <= 90.0:
            raise ValueError(f"camera elevation must lie in [-90, 90] degrees, got {self.elevation_deg}")
        if self.distance[0] <= 0.0:
            raise ValueError(f"camera distance must be positive, got {self.distance}")
        if not 0.0 < self.fov_y_deg[0] and self.fov_y_deg[1] < 180.0:
            raise ValueError(f"camera fov must lie in (0, 180) degrees, got {self.fov_y_deg}")
        if self.batch_size < 1:
            raise ValueError(f"camera batch size must be >= 1, got {self.batch_size}")


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float32)


def sample_orbit_cameras(
    cfg: CameraSamplerConfig, resolution: int, generator: torch.Generator
) -> Cameras:
    """Draws ``cfg.batch_size`` random cameras looking at the origin, on the CPU."""
    n = cfg.batch_size
    if cfg.stratified_azimuth and n > 1:
        lo, hi = cfg.azimuth_deg
        offset = _uniform(0.0, 1.0, 1, generator)
        azimuth = lo + (hi - lo) * torch.remainder(offset + torch.arange(n) / n, 1.0)
    else:
        azimuth = _uniform(*cfg.azimuth_deg, n, generator)
    elevation = _uniform(*cfg.elevation_deg, n, generator)
    distance = _uniform(*cfg.distance, n, generator)
    fov = _uniform(*cfg.fov_y_deg, n, generator)
    return orbit_cameras(elevation, azimuth, distance, fov, resolution, resolution)


def evaluation_orbit(
    resolution: int,
    num_azimuths: int = 8,
    elevations_deg: tuple[float, ...] = (15.0,),
    distance: float = 2.4,
    fov_y_deg: float = 47.5,
    start_azimuth_deg: float = 0.0,
) -> Cameras:
    """A fixed orbit: ``num_azimuths`` evenly spaced azimuths at each elevation (elevation-major).

    Used for previews, turntable videos, texture baking views and quality metrics.
    """
    if num_azimuths < 1:
        raise ValueError(f"num_azimuths must be >= 1, got {num_azimuths}")
    azimuths = start_azimuth_deg + torch.arange(num_azimuths, dtype=torch.float32) * (360.0 / num_azimuths)
    elev = torch.tensor(elevations_deg, dtype=torch.float32).repeat_interleave(num_azimuths)
    azim = azimuths.repeat(len(elevations_deg))
    n = elev.shape[0]
    return orbit_cameras(
        elev,
        azim,
        torch.full((n,), distance),
        torch.full((n,), fov_y_deg),
        resolution,
        resolution,
    )
