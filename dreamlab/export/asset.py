"""One-call exports: every format of one renderer into a folder, or one file chosen by extension."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dreamlab.export.gltf import write_glb
from dreamlab.export.mesh import ExtractedMesh, MeshExportConfig, extract_mesh, renderer_device
from dreamlab.export.obj import write_obj
from dreamlab.export.ply import write_splats_ply
from dreamlab.export.texture import TextureConfig, TexturedMesh, bake_texture
from dreamlab.export.video import VideoConfig, write_preview_grid, write_turntable
from dreamlab.renderers.base import Renderer

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("glb", "obj", "ply", "mp4", "png")
"""Formats :func:`export_asset` knows: model.glb, model.obj (+ .mtl + _albedo.png), splats.ply,
turntable.mp4, preview.png."""

FILE_NAMES: dict[str, str] = {
    "glb": "model.glb",
    "obj": "model.obj",
    "ply": "splats.ply",
    "mp4": "turntable.mp4",
    "png": "preview.png",
}


@dataclass
class ExportConfig:
    """Options of every exporter, composed (what a run config holds as its ``export`` field)."""

    mesh: MeshExportConfig = field(default_factory=MeshExportConfig)
    """Grid, threshold, face budget, size in metres (``mesh.faces``, ``mesh.size_m``)."""
    texture: TextureConfig = field(default_factory=TextureConfig)
    """UV atlas and texture bake (``texture.size`` is the texture resolution)."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Turntable video and preview grid."""
    name: str = "dreamlab_model"
    """Node / mesh name inside the .glb."""

    def with_overrides(
        self, faces: int | None = None, size_m: float | None = None, texture_size: int | None = None
    ) -> ExportConfig:
        """A copy with the headline knobs (CLI flags --faces, --size-m, --texture-size) replaced."""
        mesh = self.mesh if faces is None else replace(self.mesh, faces=faces)
        mesh = mesh if size_m is None else replace(mesh, size_m=size_m)
        texture = self.texture if texture_size is None else replace(self.texture, size=texture_size)
        return replace(self, mesh=mesh, texture=texture)

    def validate(self) -> None:
        self.mesh.validate()
        self.texture.validate()
        self.video.validate()
        if not self.name:
            raise ValueError("the export name must not be empty")


@dataclass
class ExportResult:
    """Files written by :func:`export_asset`; iterating yields every file written."""

    glb: Path | None = None
    obj: Path | None = None
    ply: Path | None = None
    mp4: Path | None = None
    png: Path | None = None
    files: list[Path] = field(default_factory=list)
    """Every file written, in order (the .obj's .mtl and texture included)."""
    skipped: list[str] = field(default_factory=list)
    """Formats requested but not applicable, with the reason (e.g. ply for a NeRF)."""

    def __iter__(self) -> Iterator[Path]:
        return iter(self.files)


def as_export_config(cfg: ExportConfig | MeshExportConfig | None) -> ExportConfig:
    """``None`` -> defaults; a bare :class:`MeshExportConfig` -> defaults with that mesh config."""
    if cfg is None:
        return ExportConfig()
    if isinstance(cfg, ExportConfig):
        return cfg
    if isinstance(cfg, MeshExportConfig):
        return ExportConfig(mesh=cfg)
    raise TypeError(f"expected an ExportConfig (or MeshExportConfig), got {type(cfg).__name__}")


def has_splats(renderer: Renderer) -> bool:
    """True when the renderer exposes Gaussian parameters through ``splat_arrays()``."""
    return callable(getattr(renderer, "splat_arrays", None))


def alpha_depth_fn(renderer: Renderer):
    """cameras -> (alpha [B, H, W], depth [B, H, W]) of ``renderer`` over a black background
    (what :func:`dreamlab.export.mesh.carve_occupancy` carves the solid from)."""

    def render(cams):
        background = torch.zeros(3, device=cams.device)
        out = renderer.render(cams, background)
        return out.alpha[..., 0], out.depth[..., 0]

    return render


def textured_mesh(
    renderer: Renderer, cfg: ExportConfig | MeshExportConfig | None = None
) -> tuple[ExtractedMesh, TexturedMesh]:
    """Marching-cubes mesh + baked texture of a renderer (what the .glb and .obj writers take)."""
    cfg = as_export_config(cfg)
    device = renderer_device(renderer)
    extracted = extract_mesh(
        renderer.density, None, cfg.mesh, device=device, render_fn=alpha_depth_fn(renderer)
    )
    return extracted, bake_texture(extracted, renderer.color, cfg.texture, device=device)


def _obj_files(obj_path: Path) -> list[Path]:
    return [
        obj_path.with_name(f"{obj_path.stem}_albedo.png"),
        obj_path.with_suffix(".mtl"),
        obj_path,
    ]


def export_asset(
    renderer: Renderer,
    out_dir: str | os.PathLike[str],
    cfg: ExportConfig | MeshExportConfig | None = None,
    formats: Sequence[str] = FORMATS,
) -> ExportResult:
    """Writes the requested formats of ``renderer`` into ``out_dir`` (see :data:`FILE_NAMES`).

    The mesh is extracted and textured once and shared by .glb and .obj. "ply" is skipped (and
    noted in ``skipped``) when the renderer has no ``splat_arrays()``. Every file is written
    atomically, so an interrupted export never leaves a truncated file under a final name.
    """
    cfg = as_export_config(cfg)
    cfg.validate()
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult()
    if "glb" in formats or "obj" in formats:
        _, textured = textured_mesh(renderer, cfg)
        if "glb" in formats:
            result.glb = write_glb(out / FILE_NAMES["glb"], textured, cfg.name)
            result.files.append(result.glb)
        if "obj" in formats:
            result.obj = write_obj(out / FILE_NAMES["obj"], textured)
            result.files.extend(_obj_files(result.obj))
    if "ply" in formats:
        if has_splats(renderer):
            result.ply = write_splats_ply(out / FILE_NAMES["ply"], renderer.splat_arrays())  # type: ignore[attr-defined]
            result.files.append(result.ply)
        else:
            result.skipped.append(f"ply: {type(renderer).__name__} has no splat_arrays()")
            log.info("export: %s", result.skipped[-1])
    if "mp4" in formats:
        result.mp4 = write_turntable(out / FILE_NAMES["mp4"], renderer, cfg=cfg.video)
        result.files.append(result.mp4)
    if "png" in formats:
        result.png = write_preview_grid(out / FILE_NAMES["png"], renderer, cfg=cfg.video)
        result.files.append(result.png)
    return result


def export_by_extension(
    renderer: Renderer,
    path: str | os.PathLike[str],
    cfg: ExportConfig | MeshExportConfig | None = None,
) -> list[Path]:
    """Writes one asset whose format is chosen by ``path``'s extension; returns the files written.

    ``.glb`` textured mesh; ``.obj`` textured mesh (+ ``.mtl`` + ``<stem>_albedo.png`` beside it);
    ``.ply`` Gaussian splats (renderer must have ``splat_arrays()``); ``.mp4`` turntable video;
    ``.png`` preview grid.
    """
    cfg = as_export_config(cfg)
    cfg.validate()
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(
            f"cannot tell the export format of {path.name!r}: use one of .glb .obj .ply .mp4 .png"
        )
    if ext == "ply" and not has_splats(renderer):
        raise ValueError(
            f"cannot write {path.name}: {type(renderer).__name__} has no Gaussian splats "
            "(splat_arrays()); export a mesh (.glb/.obj) instead"
        )
    if ext in ("glb", "obj"):
        _, textured = textured_mesh(renderer, cfg)
        if ext == "glb":
            return [write_glb(path, textured, cfg.name)]
        return _obj_files(write_obj(path, textured))
    if ext == "ply":
        return [write_splats_ply(path, renderer.splat_arrays())]  # type: ignore[attr-defined]
    if ext == "mp4":
        return [write_turntable(path, renderer, cfg=cfg.video)]
    return [write_preview_grid(path, renderer, cfg=cfg.video)]
