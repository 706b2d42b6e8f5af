"""Every guidance method end to end, with every renderer (Gaussians, hash-grid NeRF): a few steps
on the builtin prior -> a valid GLB, and a resumed run that matches an uninterrupted one bit for
bit (guidance state included)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import pygltflib
import pytest
import torch
import trimesh

from dreamlab.config import make_run_config
from dreamlab.export import ExportConfig, MeshExportConfig, TextureConfig, export_by_extension
from dreamlab.guidance import GUIDANCES
from dreamlab.priors.builtin import BuiltinPrior
from dreamlab.train import Trainer

try:
    from export_fixtures import run_gltf_validator
except ImportError:  # tests/ imported as a package
    from tests.export_fixtures import run_gltf_validator  # type: ignore[no-redef]

STEPS = 4


@pytest.fixture(scope="module")
def prior() -> BuiltinPrior:
    return BuiltinPrior.from_pretrained()


@pytest.fixture(scope="module", autouse=True)
def reference_png(tmp_path_factory):
    """VPCSM's image prompt: the world's exact front render of the red cube (as the benchmark)."""
    global REFERENCE
    from dreamlab.bench.quality import write_reference_image
    from dreamlab.world.catalog import parse_prompt

    REFERENCE = str(write_reference_image(parse_prompt("a red cube"), tmp_path_factory.mktemp("ref") / "ref.png"))
    return REFERENCE


REFERENCE: str | None = None


RENDERERS = ("gaussians", "nerf")
SMALL_NERF = dict(num_levels=8, log2_hashmap_size=12, max_resolution=64, num_samples=24, hidden=32)
"""A NeRF small enough for a few CPU steps per method in CI (the builtin preset's is larger)."""


def _cfg(name: str, steps: int = STEPS, renderer: str = "gaussians"):
    cfg = make_run_config("a red cube", guidance=name, steps=steps, renderer=renderer,
                          gaussians=400 if renderer == "gaussians" else None, resolution=32,
                          checkpoint_every=2, device="cpu",
                          image_prompt=REFERENCE if name == "vpcsm" else None)
    if renderer == "nerf":
        cfg.renderer = dataclasses.replace(cfg.renderer, **SMALL_NERF)
    cfg.train = dataclasses.replace(cfg.train, preview_every=0)
    return cfg


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.renderer.named_parameters()}


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("name", list(GUIDANCES))
def test_method_trains_and_exports_a_valid_glb(prior, name, renderer, tmp_path):
    trainer = Trainer(_cfg(name, renderer=renderer), prior=prior)
    before = _params(trainer)
    reports = list(trainer)
    assert len(reports) == STEPS and all(not r.skipped for r in reports), name
    after = _params(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} moved no parameter"
    mesh = MeshExportConfig(resolution=48, faces=1500, carve_image_size=48)
    export = ExportConfig(mesh=mesh, texture=TextureConfig(size=64))
    (path,) = export_by_extension(trainer.renderer, tmp_path / "model.glb", export)
    gltf = pygltflib.GLTF2().load(str(path))
    assert len(gltf.meshes) == 1 and gltf.images
    assert len(trimesh.load(path, force="mesh").faces) > 0
    report = run_gltf_validator(path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"][:3]


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("name", list(GUIDANCES))
def test_resume_is_bit_exact_for_every_method(prior, name, renderer, tmp_path):
    straight = Trainer(_cfg(name, renderer=renderer), prior=prior, run_dir=tmp_path / "a")
    list(straight)
    first = Trainer(_cfg(name, renderer=renderer), prior=prior, run_dir=tmp_path / "b")
    for report in first:
        if report.step == STEPS // 2:
            first.save()
            break
    resumed = Trainer(_cfg(name, renderer=renderer), prior=prior, run_dir=tmp_path / "b")
    assert resumed.resume() is not None
    list(resumed)
    for key, value in _params(straight).items():
        assert torch.equal(value, _params(resumed)[key]), f"{name}: {key} differs after resume"
