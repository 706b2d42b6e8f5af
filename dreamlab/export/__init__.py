"""Export: mesh extraction, UV unwrap + texture bake, .glb/.obj/.ply writers, turntable video.

Plain functions over the Renderer verbs ``density`` / ``color`` / ``render`` (and
``splat_arrays()`` where a renderer has one), so one exporter serves every representation.
Exported meshes are glTF-style: Y-up, metres, +Z front, resting on y = 0 with the pivot at the
base centre. See docs/export.md.
"""

from dreamlab.export.asset import (
    FILE_NAMES,
    FORMATS,
    ExportConfig,
    ExportResult,
    as_export_config,
    export_asset,
    export_by_extension,
    textured_mesh,
)
from dreamlab.export.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from dreamlab.export.gltf import glb_bytes, write_glb
from dreamlab.export.mesh import ExtractedMesh, MeshExportConfig, auto_threshold, extract_mesh
from dreamlab.export.obj import write_obj
from dreamlab.export.ply import SplatArrays, read_splats_ply, splat_property_names, write_splats_ply
from dreamlab.export.texture import TextureConfig, TexturedMesh, bake_texture
from dreamlab.export.video import VideoConfig, preview_grid, write_preview_grid, write_turntable

__all__ = [
    "FILE_NAMES",
    "FORMATS",
    "ExportConfig",
    "ExportResult",
    "ExtractedMesh",
    "MeshExportConfig",
    "SplatArrays",
    "TextureConfig",
    "TexturedMesh",
    "VideoConfig",
    "as_export_config",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "auto_threshold",
    "bake_texture",
    "export_asset",
    "export_by_extension",
    "extract_mesh",
    "glb_bytes",
    "preview_grid",
    "read_splats_ply",
    "splat_property_names",
    "textured_mesh",
    "write_glb",
    "write_obj",
    "write_preview_grid",
    "write_splats_ply",
    "write_turntable",
]
