"""Self-contained binary glTF 2.0 (.glb) writer, via pygltflib.

One scene -> one named node -> one mesh with one triangle primitive (POSITION, NORMAL,
TEXCOORD_0, uint32 indices) -> one PBR metallic-roughness material (metallic 0, roughness 1,
baseColorTexture = the baked texture embedded as PNG). Written to pass the Khronos
glTF-Validator with no errors, warnings, infos or hints: every bufferView is 4-byte aligned and
tightly packed (no byteStride), vertex/index views carry their ``target``, POSITION has min/max,
normals are unit length, texture coordinates lie in [0, 1], nothing is left unused.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pygltflib
from PIL import Image

from dreamlab.export.atomic import atomic_write_bytes
from dreamlab.export.texture import TexturedMesh

GENERATOR = "dreamlab"

_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_REPEAT = 10497


def encode_png(image: np.ndarray) -> bytes:
    """[H, W, 3|4] uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _generator() -> str:
    try:
        from importlib.metadata import version

        return f"{GENERATOR} {version('dreamlab')}"
    except Exception:  # noqa: BLE001 - metadata missing in a source checkout
        return GENERATOR


def glb_bytes(mesh: TexturedMesh, name: str = "dreamlab_model") -> bytes:
    """Encodes a textured mesh as a .glb file's bytes."""
    positions = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    normals = np.asarray(mesh.normals, dtype=np.float64)
    normals = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    normals = np.ascontiguousarray(normals, dtype=np.float32)
    uvs = np.ascontiguousarray(np.clip(mesh.uvs, 0.0, 1.0), dtype=np.float32)
    indices = np.ascontiguousarray(mesh.faces, dtype=np.uint32).reshape(-1)
    n = positions.shape[0]
    assert positions.shape == (n, 3) and normals.shape == (n, 3) and uvs.shape == (n, 2)
    assert indices.size and indices.max() < n, "face indices out of range"
    png = encode_png(mesh.texture)

    blob = bytearray()
    views: list[pygltflib.BufferView] = []

    def add_view(data: bytes, target: int | None) -> int:
        while len(blob) % 4:
            blob.append(0)
        views.append(
            pygltflib.BufferView(
                buffer=0, byteOffset=len(blob), byteLength=len(data), target=target
            )
        )
        blob.extend(data)
        return len(views) - 1

    accessors = [
        pygltflib.Accessor(
            bufferView=add_view(positions.tobytes(), _ARRAY_BUFFER),
            componentType=pygltflib.FLOAT,
            count=n,
            type=pygltflib.VEC3,
            min=[float(v) for v in positions.min(axis=0)],
            max=[float(v) for v in positions.max(axis=0)],
        ),
        pygltflib.Accessor(
            bufferView=add_view(normals.tobytes(), _ARRAY_BUFFER),
            componentType=pygltflib.FLOAT,
            count=n,
            type=pygltflib.VEC3,
        ),
        pygltflib.Accessor(
            bufferView=add_view(uvs.tobytes(), _ARRAY_BUFFER),
            componentType=pygltflib.FLOAT,
            count=n,
            type=pygltflib.VEC2,
        ),
        pygltflib.Accessor(
            bufferView=add_view(indices.tobytes(), _ELEMENT_ARRAY_BUFFER),
            componentType=pygltflib.UNSIGNED_INT,
            count=int(indices.size),
            type=pygltflib.SCALAR,
        ),
    ]
    image_view = add_view(png, None)
    while len(blob) % 4:
        blob.append(0)

    gltf = pygltflib.GLTF2(
        asset=pygltflib.Asset(version="2.0", generator=_generator()),
        scene=0,
        scenes=[pygltflib.Scene(name=name, nodes=[0])],
        nodes=[pygltflib.Node(name=name, mesh=0)],
        meshes=[
            pygltflib.Mesh(
                name=name,
                primitives=[
                    pygltflib.Primitive(
                        attributes=pygltflib.Attributes(POSITION=0, NORMAL=1, TEXCOORD_0=2),
                        indices=3,
                        material=0,
                        mode=pygltflib.TRIANGLES,
                    )
                ],
            )
        ],
        materials=[
            pygltflib.Material(
                name=f"{name}_material",
                pbrMetallicRoughness=pygltflib.PbrMetallicRoughness(
                    baseColorTexture=pygltflib.TextureInfo(index=0, texCoord=0),
                    metallicFactor=0.0,
                    roughnessFactor=1.0,
                ),
                doubleSided=False,
            )
        ],
        textures=[pygltflib.Texture(sampler=0, source=0, name=f"{name}_basecolor")],
        samplers=[
            pygltflib.Sampler(
                magFilter=_LINEAR, minFilter=_LINEAR_MIPMAP_LINEAR, wrapS=_REPEAT, wrapT=_REPEAT
            )
        ],
        images=[
            pygltflib.Image(bufferView=image_view, mimeType="image/png", name=f"{name}_basecolor")
        ],
        accessors=accessors,
        bufferViews=views,
        buffers=[pygltflib.Buffer(byteLength=len(blob))],
    )
    gltf.set_binary_blob(bytes(blob))
    return b"".join(gltf.save_to_bytes())


def write_glb(
    path: str | os.PathLike[str], mesh: TexturedMesh, name: str = "dreamlab_model"
) -> Path:
    """Writes ``mesh`` as a self-contained .glb (atomically). Returns the path."""
    return atomic_write_bytes(path, glb_bytes(mesh, name))
