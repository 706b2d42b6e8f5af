"""One-call exports: every format of one renderer into a folder, or one file chosen by extension."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    """Options of every exporter, composed."""

    mesh: MeshExportConfig = field(default_factory=MeshExportConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    name: str = "dreamlab_model"
    """Node / mesh name inside the .glb."""


@dataclass
class ExportResult:
    """Paths written by :func:`export_asset` (None where a format was not requested or skipped)."""

    glb: Path | None = None
    obj: Path | None = None
    ply: Path | None = None
    mp4: Path | None = None
    png: Path | None = None
    skipped: list[str] = field(default_factory=list)
    """Formats requested but not applicable, with the reason (e.g. ply for a NeRF)."""


def has_splats(renderer: Renderer) -> bool:
    """True when the renderer exposes Gaussian parameters through ``splat_arrays()``."""
    return callable(getattr(renderer, "splat_arrays", None))


def textured_mesh(
    renderer: Renderer, cfg: ExportConfig | None = None
) -> tuple[ExtractedMesh, TexturedMesh]:
    """Marching-cubes mesh + baked texture of a renderer (what the .glb and .obj writers take)."""
    cfg = cfg or ExportConfig()
    device = renderer_device(renderer)
    extracted = extract_mesh(renderer.density, None, cfg.mesh, device=device)
    return extracted, bake_texture(extracted, renderer.color, cfg.texture, device=device)


def export_asset(
    renderer: Renderer,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = FORMATS,
    cfg: ExportConfig | None = None,
) -> ExportResult:
    """Writes the requested formats of ``renderer`` into ``out_dir`` (see :data:`FILE_NAMES`).

    The mesh is extracted and textured once and shared by .glb and .obj. "ply" is skipped (and
    noted in ``skipped``) when the renderer has no ``splat_arrays()``. Every file is written
    atomically, so an interrupted export never leaves a truncated file under a final name.
    """
    cfg = cfg or ExportConfig()
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
        if "obj" in formats:
            result.obj = write_obj(out / FILE_NAMES["obj"], textured)
    if "ply" in formats:
        if has_splats(renderer):
            result.ply = write_splats_ply(out / FILE_NAMES["ply"], renderer.splat_arrays())  # type: ignore[attr-defined]
        else:
            result.skipped.append(f"ply: {type(renderer).__name__} has no splat_arrays()")
            log.info("export: %s", result.skipped[-1])
    if "mp4" in formats:
        result.mp4 = write_turntable(out / FILE_NAMES["mp4"], renderer, cfg=cfg.video)
    if "png" in formats:
        result.png = write_preview_grid(out / FILE_NAMES["png"], renderer, cfg=cfg.video)
    return result


def export_by_extension(
    path: str | os.PathLike[str], renderer: Renderer, cfg: ExportConfig | None = None
) -> Path:
    """Writes one file whose format is chosen by ``path``'s extension.

    ``.glb`` textured mesh; ``.obj`` textured mesh (+ ``.mtl`` + ``_albedo.png`` beside it);
    ``.ply`` Gaussian splats (renderer must have ``splat_arrays()``); ``.mp4`` turntable video;
    ``.png`` preview grid.
    """
    cfg = cfg or ExportConfig()
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext in ("glb", "obj"):
        _, textured = textured_mesh(renderer, cfg)
        if ext == "glb":
            return write_glb(path, textured, cfg.name)
        return write_obj(path, textured)
    if ext == "ply":
        if not has_splats(renderer):
            raise ValueError(
                f"cannot write {path.name}: {type(renderer).__name__} has no Gaussian splats "
                "(splat_arrays()); export a mesh (.glb/.obj) instead"
            )
        return write_splats_ply(path, renderer.splat_arrays())  # type: ignore[attr-defined]
    if ext == "mp4":
        return write_turntable(path, renderer, cfg=cfg.video)
    if ext == "png":
        return write_preview_grid(path, renderer, cfg=cfg.video)
    raise ValueError(
        f"cannot tell the export format of {path.name!r}: use one of .glb .obj .ply .mp4 .png"
    )
