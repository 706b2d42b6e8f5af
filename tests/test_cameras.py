"""Camera convention, orbit sampler and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from dreamlab import schedules
from dreamlab.cameras import CameraSamplerConfig, evaluation_orbit, sample_orbit_cameras
from dreamlab.types import orbit_cameras, wrap_azimuth


def _project(cams, point):
    """Projects a world point with the documented pinhole convention -> (u, v, depth)."""
    p = torch.cat([point, torch.ones(1)])
    cam = cams.w2c[0] @ p
    depth = -cam[2]
    f = cams.focal[0]
    u = cams.width / 2 + f * cam[0] / depth
    v = cams.height / 2 - f * cam[1] / depth
    return float(u), float(v), float(depth)


def test_azimuth_zero_looks_at_front_from_plus_z():
    cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]),
                         torch.tensor([50.0]), 64, 64)
    assert torch.allclose(cams.centers[0], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)
    # the origin projects to the image centre at depth 2
    u, v, d = _project(cams, torch.zeros(3))
    assert (u, v) == pytest.approx((32.0, 32.0), abs=1e-5) and d == pytest.approx(2.0)
    # +Y is up in the image (smaller v), +X is right (larger u) seen from the front
    assert _project(cams, torch.tensor([0.0, 0.5, 0.0]))[1] < 32
    assert _project(cams, torch.tensor([0.5, 0.0, 0.0]))[0] > 32


def test_azimuth_90_is_on_plus_x_and_elevation_is_above():
    cams = orbit_cameras(torch.tensor([30.0]), torch.tensor([90.0]), torch.tensor([2.0]),
                         torch.tensor([50.0]), 32, 32)
    c = cams.centers[0]
    assert c[0] == pytest.approx(2 * math.cos(math.radians(30)), abs=1e-5)
    assert c[1] == pytest.approx(1.0, abs=1e-5)
    assert abs(float(c[2])) < 1e-5


def test_focal_matches_fov():
    cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]),
                         torch.tensor([90.0]), 64, 64)
    assert float(cams.focal[0]) == pytest.approx(32.0, rel=1e-5)


def test_straight_down_camera_is_well_defined():
    cams = orbit_cameras(torch.tensor([90.0]), torch.tensor([0.0]), torch.tensor([2.0]),
                         torch.tensor([50.0]), 16, 16)
    assert torch.isfinite(cams.c2w).all()
    assert _project(cams, torch.zeros(3))[:2] == pytest.approx((8.0, 8.0), abs=1e-4)


def test_sampler_ranges_and_determinism():
    cfg = CameraSamplerConfig(batch_size=4)
    a = sample_orbit_cameras(cfg, 32, torch.Generator().manual_seed(3))
    b = sample_orbit_cameras(cfg, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a.c2w, b.c2w)
    for _ in range(20):
        cams = sample_orbit_cameras(cfg, 32, torch.Generator().manual_seed(_))
        assert ((cams.elevation_deg >= -10) & (cams.elevation_deg <= 45)).all()
        assert ((cams.distance >= 2.2) & (cams.distance <= 2.6)).all()
        assert ((cams.azimuth_deg > -180) & (cams.azimuth_deg <= 180)).all()
    # stratified: 4 azimuths 90 degrees apart
    az = torch.sort(torch.remainder(a.azimuth_deg, 360.0)).values
    assert torch.allclose(torch.diff(az), torch.full((3,), 90.0), atol=1e-3)


def test_sampler_rejects_impossible_ranges():
    with pytest.raises(ValueError, match="low <= high"):
        CameraSamplerConfig(distance=(3.0, 2.0)).validate()
    with pytest.raises(ValueError, match="positive"):
        CameraSamplerConfig(distance=(0.0, 2.0)).validate()


def test_evaluation_orbit_layout():
    cams = evaluation_orbit(64, num_azimuths=8, elevations_deg=(0.0, 30.0))
    assert len(cams) == 16
    assert cams.azimuth_deg[:8].tolist() == pytest.approx(
        wrap_azimuth(torch.arange(8) * 45.0).tolist()
    )
    assert cams.elevation_deg[8:].tolist() == [30.0] * 8


def test_schedules_are_pure_functions_of_progress():
    lin = schedules.Linear(0.98, 0.5, begin=0.25, finish=0.75)
    assert lin(0.0) == 0.98 and lin(0.5) == pytest.approx(0.74) and lin(1.0) == 0.5
    exp = schedules.Exponential(1e-3, 1e-5)
    assert exp(0.0) == pytest.approx(1e-3) and exp(0.5) == pytest.approx(1e-4) and exp(1.0) == pytest.approx(1e-5)
    pw = schedules.Piecewise((128, 256, 512), (0.3, 0.6))
    assert [pw(0.0), pw(0.3), pw(0.59), pw(1.0)] == [128, 256, 256, 512]
    sq = schedules.SqrtAnneal(1.0, 0.0)
    assert sq(0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lin(1.5)
    with pytest.raises(ValueError):
        schedules.Piecewise((1, 2), (0.5, 0.7))
