"""Wavefront .obj + .mtl + base-colour .png writer.

Writes three files next to each other, each atomically, texture and material first and the .obj
last (so a complete .obj never points at a missing texture). Texture coordinates are flipped to
OBJ's convention (origin at the bottom-left of the image: ``vt = (u, 1 - v_gltf)``); positions and
normals are the export-space ones (Y-up metres, base centre at the origin), faces are
counter-clockwise seen from outside, indices 1-based ``v/vt/vn``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from dreamlab.export.atomic import atomic_write_bytes, atomic_write_text
from dreamlab.export.gltf import encode_png
from dreamlab.export.texture import TexturedMesh


def _rows(fmt: str, array: np.ndarray) -> str:
    buf = io.StringIO()
    np.savetxt(buf, array, fmt=fmt)
    return buf.getvalue()


def write_obj(
    path: str | os.PathLike[str], mesh: TexturedMesh, material_name: str = "dreamlab_material"
) -> Path:
    """Writes ``path`` (.obj), ``path.with_suffix('.mtl')`` and ``<stem>_albedo.png``. Returns the .obj path."""
    obj_path = Path(path)
    mtl_path = obj_path.with_suffix(".mtl")
    png_path = obj_path.with_name(f"{obj_path.stem}_albedo.png")

    atomic_write_bytes(png_path, encode_png(mesh.texture))
    atomic_write_text(
        mtl_path,
        "# dreamlab\n"
        f"newmtl {material_name}\n"
        "Ka 1.000000 1.000000 1.000000\n"
        "Kd 1.000000 1.000000 1.000000\n"
        "Ks 0.000000 0.000000 0.000000\n"
        "Ns 0.000000\n"
        "d 1.000000\n"
        "illum 1\n"
        f"map_Kd {png_path.name}\n",
    )

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    normals = np.asarray(mesh.normals, dtype=np.float64)
    uvs = np.asarray(mesh.uvs, dtype=np.float64)
    vt = np.stack(
        [uvs[:, 0], 1.0 - uvs[:, 1]], axis=1
    )  # glTF (top-left origin) -> OBJ (bottom-left)
    f = np.asarray(mesh.faces, dtype=np.int64) + 1
    face_cols = np.repeat(f, 3, axis=1)  # v/vt/vn share the index: one vertex = one (v, vt, vn)
    text = "# dreamlab\n" f"mtllib {mtl_path.name}\n" "o dreamlab_model\n" + _rows(
        "v %.6f %.6f %.6f", vertices
    ) + _rows("vt %.6f %.6f", vt) + _rows(
        "vn %.6f %.6f %.6f", normals
    ) + f"usemtl {material_name}\n" + "s 1\n" + _rows("f %d/%d/%d %d/%d/%d %d/%d/%d", face_cols)
    atomic_write_text(obj_path, text)
    return obj_path
