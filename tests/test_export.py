"""Export package tests on analytic density fields (torus, cube): CPU only, a few seconds each."""

from __future__ import annotations

import dataclasses

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from plyfile import PlyData

from dreamlab.export import (
    ExportConfig,
    MeshExportConfig,
    TextureConfig,
    VideoConfig,
    atomic_write,
    auto_threshold,
    bake_texture,
    export_asset,
    export_by_extension,
    extract_mesh,
    read_splats_ply,
    splat_property_names,
    write_glb,
    write_obj,
    write_preview_grid,
    write_splats_ply,
    write_turntable,
)

try:
    from export_fixtures import (
        FakeFieldRenderer,
        FakeSplatRenderer,
        gradient_color,
        random_splats,
        run_gltf_validator,
    )
except ImportError:  # tests/ imported as a package
    from tests.export_fixtures import (  # type: ignore[no-redef]
        FakeFieldRenderer,
        FakeSplatRenderer,
        gradient_color,
        random_splats,
        run_gltf_validator,
    )

FAST_MESH = MeshExportConfig(resolution=96, faces=3000)
FAST_TEX = TextureConfig(size=256)


def small_cfg() -> ExportConfig:
    return ExportConfig(
        mesh=MeshExportConfig(resolution=64, faces=1500),
        texture=TextureConfig(size=128),
        video=VideoConfig(
            num_frames=6, resolution=64, fps=10, grid_views=4, grid_columns=2, grid_resolution=32
        ),
    )


@pytest.fixture(scope="module")
def torus():
    r = FakeFieldRenderer("torus", color=None)
    return r, extract_mesh(r.density, r.color, FAST_MESH)


@pytest.fixture(scope="module")
def cube():
    r = FakeFieldRenderer("cube", color=(0.8, 0.3, 0.1), offset=(0.1, 0.2, -0.15))
    return r, extract_mesh(r.density, None, FAST_MESH)


@pytest.fixture(scope="module")
def textured_torus(torus):
    r, em = torus
    return r, em, bake_texture(em, r.color, FAST_TEX)


def _field_color(em, export_points: np.ndarray) -> np.ndarray:
    world = torch.tensor(em.export_to_world(export_points), dtype=torch.float32)
    return gradient_color(world).numpy()


# ---------------------------------------------------------------- mesh


def test_torus_mesh_has_one_hole(torus):
    _, em = torus
    mesh = em.mesh
    assert mesh.is_watertight
    assert len(mesh.split(only_watertight=False)) == 1
    assert mesh.euler_number == 0  # genus 1: V - E + F = 2 - 2g
    assert mesh.volume > 0  # outward winding


def test_cube_has_flat_axis_aligned_faces(cube):
    _, em = cube
    mesh = em.mesh
    assert mesh.is_watertight and mesh.euler_number == 2
    aligned = np.abs(mesh.face_normals).max(axis=1) > 0.98
    assert mesh.area_faces[aligned].sum() / mesh.area > 0.85
    # The six faces point both ways along every axis.
    for axis in range(3):
        n = mesh.face_normals[aligned]
        assert (n[:, axis] > 0.98).any() and (n[:, axis] < -0.98).any()


def test_normals_point_outwards(cube):
    _, em = cube
    mesh = em.mesh
    assert mesh.volume > 0
    centre = mesh.bounds.mean(axis=0)
    outward = np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices - centre)
    assert (outward > 0).mean() > 0.99
    assert np.allclose(np.linalg.norm(mesh.vertex_normals, axis=1), 1.0, atol=1e-5)


def test_mesh_rests_on_ground_with_base_centre_pivot_and_size(cube):
    r, em = cube
    lo, hi = em.mesh.bounds
    assert abs(lo[1]) < 1e-9
    assert abs(lo[0] + hi[0]) < 1e-9 and abs(lo[2] + hi[2]) < 1e-9
    assert np.isclose((hi - lo).max(), 1.0)
    big = extract_mesh(r.density, None, MeshExportConfig(resolution=64, faces=2000, size_m=2.5))
    assert np.isclose(big.mesh.extents.max(), 2.5)
    tall = extract_mesh(
        FakeFieldRenderer("torus").density,
        None,
        MeshExportConfig(resolution=64, faces=2000, size_m=0.3, size_axis="height"),
    )
    assert np.isclose(tall.mesh.extents[1], 0.3)
    assert tall.mesh.extents[0] > 0.3  # the torus is wider than tall


def test_export_to_world_mapping_lands_on_the_surface(cube):
    r, em = cube
    pts = np.asarray(em.mesh.vertices)
    assert np.allclose(em.world_to_export(em.export_to_world(pts)), pts)
    world = em.export_to_world(pts)
    # The offset cube is centred at (0.1, 0.2, -0.15) with half-size 0.3 in world space.
    assert np.allclose((world.min(0) + world.max(0)) / 2, [0.1, 0.2, -0.15], atol=0.01)
    sdf = r.sdf(torch.tensor(world, dtype=torch.float32)).numpy()
    assert np.abs(sdf).mean() < 0.01


def test_face_budget_is_honoured():
    r = FakeFieldRenderer("torus")
    for budget in (500, 2000):
        em = extract_mesh(r.density, None, MeshExportConfig(resolution=64, faces=budget))
        assert 0.8 * budget <= len(em.mesh.faces) <= budget


def test_auto_threshold_is_scale_free():
    a = FakeFieldRenderer("torus", peak=1.0)
    b = FakeFieldRenderer("torus", peak=300.0)
    cfg = MeshExportConfig(resolution=64, faces=2000)
    ma, mb = extract_mesh(a.density, None, cfg), extract_mesh(b.density, None, cfg)
    assert np.isclose(ma.threshold * 300, mb.threshold, rtol=1e-3)
    assert np.isclose(ma.scale, mb.scale, rtol=1e-2)  # decimation may pick other collapses
    values = np.concatenate([np.zeros(1000), np.full(100, 0.01), np.full(300, 4.0)])
    assert 0.01 < auto_threshold(values) < 4.0


def test_floaters_are_dropped():
    class TwoBlobs(FakeFieldRenderer):
        def sdf(self, xyz):
            main = torch.linalg.norm(xyz, dim=-1) - 0.3
            speck = torch.linalg.norm(xyz - torch.tensor([0.7, 0.7, 0.7]), dim=-1) - 0.04
            return torch.minimum(main, speck)

    r = TwoBlobs("torus")
    kept = extract_mesh(r.density, None, MeshExportConfig(resolution=64, faces=3000))
    assert len(kept.mesh.split(only_watertight=False)) == 1
    both = extract_mesh(
        r.density,
        None,
        MeshExportConfig(resolution=64, faces=3000, min_component_fraction=0.0, min_component_volume_fraction=0.0),
    )
    assert len(both.mesh.split(only_watertight=False)) == 2


def test_thin_detached_pillars_are_dropped_but_a_second_body_is_kept():
    """The volume rule: a thin pillar (like the one SDS can leave in a torus's hole) has too many
    faces for the face rule but almost no volume; a detached head-sized body stays."""

    class BodyHeadPillar(FakeFieldRenderer):
        def sdf(self, xyz):
            body = torch.linalg.norm(xyz - torch.tensor([0.0, -0.2, 0.0]), dim=-1) - 0.3
            head = torch.linalg.norm(xyz - torch.tensor([0.0, 0.35, 0.0]), dim=-1) - 0.15
            radial = torch.linalg.norm(xyz[:, [0, 2]] - torch.tensor([0.6, 0.0]), dim=-1) - 0.03
            pillar = torch.maximum(radial, xyz[:, 1].abs() - 0.35)
            return torch.minimum(torch.minimum(body, head), pillar)

    r = BodyHeadPillar("torus")
    cfg = MeshExportConfig(resolution=96, faces=6000, solidify=False)
    parts = extract_mesh(r.density, None, cfg).mesh.split(only_watertight=False)
    assert len(parts) == 2
    assert all(p.bounds[1][0] < 0.45 for p in parts)  # the pillar at x = 0.6 is gone
    everything = extract_mesh(r.density, None, dataclasses.replace(cfg, min_component_volume_fraction=0.0))
    pieces = everything.mesh.split(only_watertight=False)
    assert len(pieces) == 3
    pillar = max(pieces, key=lambda p: p.bounds[1][0])
    assert len(pillar.faces) >= 0.02 * max(len(p.faces) for p in pieces)  # the face rule alone keeps it
    with pytest.raises(ValueError, match="min_component_volume_fraction"):
        MeshExportConfig(min_component_volume_fraction=1.5).validate()


def test_volume_rule_drops_closed_parts_under_five_percent_of_the_largest():
    """The default volume rule at its edge: a closed part holding 4.4 % of the main body's volume
    (the v6 torus's pillar, docs/export.md) goes; one holding 6 % stays."""
    from dreamlab.export.mesh import _remove_floaters

    body = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    height = 1.0

    def column(volume_fraction: float, x: float) -> trimesh.Trimesh:
        radius = float(np.sqrt(volume_fraction * body.volume / (np.pi * height)))
        part = trimesh.creation.cylinder(radius=radius, height=height, sections=64)
        part.apply_translation([x, 0.0, 0.0])
        return part

    small, large = column(0.044, 3.0), column(0.06, -3.0)
    assert small.is_watertight and large.is_watertight
    # Every part has enough faces that the face rule alone keeps them all.
    scene = trimesh.util.concatenate([body, small, large])
    face_fraction = min(len(small.faces), len(large.faces)) / len(body.faces)
    assert len(_remove_floaters(scene, face_fraction, 0.0).split(only_watertight=False)) == 3

    kept = _remove_floaters(scene, face_fraction, MeshExportConfig().min_component_volume_fraction)
    parts = kept.split(only_watertight=False)
    assert len(parts) == 2
    assert all(p.bounds[0][0] < 2.0 for p in parts)  # the 4.4 % column at x = 3 is gone
    assert any(p.bounds[1][0] < -2.0 for p in parts)  # the 6 % column at x = -3 stays


def test_empty_density_gives_a_clear_error():
    r = FakeFieldRenderer("empty")
    with pytest.raises(ValueError, match="nothing to mesh"):
        extract_mesh(r.density, None, MeshExportConfig(resolution=32, coarse_resolution=16))
    zero = lambda xyz: torch.zeros(xyz.shape[0])  # noqa: E731
    with pytest.raises(ValueError, match="nothing to mesh.*threshold"):
        extract_mesh(zero, None, MeshExportConfig(resolution=32, threshold=1.0))
    torus = FakeFieldRenderer("torus", peak=5.0)
    with pytest.raises(ValueError, match="lower MeshExportConfig.threshold"):
        extract_mesh(torus.density, None, MeshExportConfig(resolution=32, threshold=50.0))


# ---------------------------------------------------------------- texture


def test_texture_mean_colour_matches_a_constant_field(cube):
    r, em = cube
    tm = bake_texture(em, r.color, TextureConfig(size=128))
    assert tm.texture.shape == (128, 128, 3) and tm.texture.dtype == np.uint8
    assert 0.2 < tm.coverage < 1.0
    mean = tm.texture.reshape(-1, 3).mean(axis=0) / 255.0
    assert np.allclose(mean, [0.8, 0.3, 0.1], atol=2 / 255)


def test_texels_hold_the_colour_of_their_surface_point(textured_torus):
    _, em, tm = textured_torus
    size = tm.texture.shape[0]
    centroids = tm.vertices[tm.faces].mean(axis=1)
    uv = tm.uvs[tm.faces].mean(axis=1)
    ij = np.clip((uv * size).astype(int), 0, size - 1)
    got = tm.texture[ij[:, 1], ij[:, 0]] / 255.0  # glTF convention: v down = image rows
    want = _field_color(em, centroids)
    err = np.abs(got - want)
    assert err.mean() < 0.01 and np.percentile(err, 99) < 0.05
    assert tm.uvs.min() >= 0 and tm.uvs.max() <= 1
    assert np.allclose(np.linalg.norm(tm.normals, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- glb / obj


def test_glb_reads_back_with_texture(tmp_path, textured_torus):
    _, em, tm = textured_torus
    path = write_glb(tmp_path / "model.glb", tm, name="torus")
    gltf = pygltflib.GLTF2().load(str(path))
    assert gltf.asset.generator.startswith("dreamlab")
    assert gltf.nodes[0].name == "torus"
    material = gltf.materials[0].pbrMetallicRoughness
    assert material.metallicFactor == 0.0 and material.roughnessFactor == 1.0
    assert material.baseColorTexture.index == 0 and gltf.images[0].mimeType == "image/png"
    assert gltf.accessors[0].count == len(tm.vertices)

    scene = trimesh.load(path, process=False)
    (mesh,) = scene.geometry.values()
    assert len(mesh.vertices) == len(tm.vertices) and len(mesh.faces) == len(tm.faces)
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    image = mesh.visual.material.baseColorTexture
    assert image is not None and image.size == (256, 256)
    # trimesh samples the texture at the uvs in its own convention: the colours must match the field.
    rgb = trimesh.visual.color.uv_to_color(mesh.visual.uv, image)[:, :3] / 255.0
    assert np.abs(rgb - _field_color(em, mesh.vertices)).mean() < 0.02
    assert np.isclose(mesh.bounds[0][1], 0.0, atol=1e-6)


def test_glb_passes_khronos_validator(tmp_path, textured_torus):
    _, _, tm = textured_torus
    path = write_glb(tmp_path / "model.glb", tm)
    report = run_gltf_validator(path)
    issues = report["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]
    assert issues["numInfos"] == 0, issues["messages"]
    assert report["info"]["hasTextures"] and report["info"]["totalTriangleCount"] == len(tm.faces)


def test_obj_reads_back_with_texture(tmp_path, textured_torus):
    _, em, tm = textured_torus
    path = write_obj(tmp_path / "model.obj", tm)
    assert (tmp_path / "model.mtl").exists() and (tmp_path / "model_albedo.png").exists()
    assert "map_Kd model_albedo.png" in (tmp_path / "model.mtl").read_text()
    mesh = trimesh.load(path, process=False, maintain_order=True)
    assert len(mesh.vertices) == len(tm.vertices) and len(mesh.faces) == len(tm.faces)
    image = mesh.visual.material.image
    assert image is not None and image.size == (256, 256)
    rgb = trimesh.visual.color.uv_to_color(mesh.visual.uv, image)[:, :3] / 255.0
    assert np.abs(rgb - _field_color(em, mesh.vertices)).mean() < 0.02
    assert mesh.volume > 0


# ---------------------------------------------------------------- ply


def test_ply_round_trip_in_the_3dgs_layout(tmp_path):
    splats = random_splats(20, sh_degree=2, seed=3)  # K = 8
    path = write_splats_ply(tmp_path / "splats.ply", splats)
    ply = PlyData.read(str(path))
    names = [p.name for p in ply["vertex"].properties]
    expected = (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(24)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )
    assert names == expected == splat_property_names(8)
    assert all(p.val_dtype in ("f4", "float32", "float") for p in ply["vertex"].properties)
    assert not ply.text and ply.byte_order == "<"
    v = ply["vertex"].data
    # Channel-major f_rest: coefficient k of channel c is f_rest_{c * K + k}.
    assert np.array_equal(v["f_rest_9"], splats.sh_rest[:, 1, 1])
    assert np.array_equal(v["f_rest_16"], splats.sh_rest[:, 0, 2])
    assert np.array_equal(v["rot_0"], splats.quats[:, 0])  # w first
    back = read_splats_ply(path)
    for name in ("means", "sh_dc", "sh_rest", "opacity_logits", "log_scales", "quats"):
        assert np.array_equal(getattr(back, name), getattr(splats, name)), name


def test_ply_degree_zero_and_bad_shapes(tmp_path):
    splats = random_splats(5, sh_degree=0)
    back = read_splats_ply(write_splats_ply(tmp_path / "s.ply", splats))
    assert back.sh_rest.shape == (5, 0, 3)
    splats.quats = splats.quats[:, :3]
    with pytest.raises(ValueError, match="quats"):
        write_splats_ply(tmp_path / "bad.ply", splats)
    assert not (tmp_path / "bad.ply").exists()


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    target = tmp_path / "out" / "model.glb"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []

    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"new but broken")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list((tmp_path / "out").iterdir()) == [target]

    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".glb"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_failing_writer_leaves_no_video(tmp_path):
    class Broken(FakeFieldRenderer):
        def render(self, cams, background):
            raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_turntable(tmp_path / "turntable.mp4", Broken(), num_frames=4, resolution=32)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- video and one-call exports


def test_turntable_and_preview_grid(tmp_path):
    import imageio.v2 as imageio

    r = FakeFieldRenderer("torus")
    path = write_turntable(tmp_path / "turntable.mp4", r, num_frames=8, resolution=48, fps=8)
    reader = imageio.get_reader(str(path), format="FFMPEG")
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 8 and frames[0].shape == (48, 48, 3)
    assert not np.array_equal(frames[0], frames[4])  # the camera moved
    with pytest.raises(ValueError, match="even"):
        write_turntable(tmp_path / "odd.mp4", r, num_frames=2, resolution=33)
    grid = imageio.imread(
        str(write_preview_grid(tmp_path / "preview.png", r, num_views=6, resolution=32, columns=3))
    )
    assert grid.shape[:2] == (64, 96)


def test_export_asset_writes_every_format(tmp_path):
    result = export_asset(FakeSplatRenderer("torus"), tmp_path / "a", small_cfg())
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(
        [
            "model.glb",
            "model.obj",
            "model.mtl",
            "model_albedo.png",
            "splats.ply",
            "turntable.mp4",
            "preview.png",
        ]
    )
    assert (
        result.glb
        and result.obj
        and result.ply
        and result.mp4
        and result.png
        and not result.skipped
    )
    assert sorted(p.name for p in result) == names  # iterating yields every file written

    nerf_like = FakeFieldRenderer("cube")
    result = export_asset(nerf_like, tmp_path / "b", small_cfg(), formats=("glb", "ply"))
    assert result.glb is not None and result.ply is None and result.skipped
    assert [p.name for p in result] == ["model.glb"]
    with pytest.raises(ValueError, match="unknown export format"):
        export_asset(nerf_like, tmp_path / "c", formats=("fbx",))
    # A bare MeshExportConfig is accepted as the mesh part of the defaults.
    result = export_asset(
        nerf_like, tmp_path / "d", MeshExportConfig(resolution=48, faces=800), formats=("glb",)
    )
    assert len(trimesh.load(result.glb).geometry["dreamlab_model"].faces) <= 800


def test_export_config_overrides_and_validation():
    cfg = ExportConfig().with_overrides(faces=1234, size_m=2.0, texture_size=512)
    assert (cfg.mesh.faces, cfg.mesh.size_m, cfg.texture.size) == (1234, 2.0, 512)
    assert ExportConfig().with_overrides() == ExportConfig()
    with pytest.raises(ValueError, match="face budget"):
        ExportConfig().with_overrides(faces=0).validate()
    with pytest.raises(ValueError, match="texture size"):
        ExportConfig().with_overrides(texture_size=3).validate()


def test_export_by_extension(tmp_path):
    cfg = small_cfg()
    splat = FakeSplatRenderer("torus")
    (glb,) = export_by_extension(splat, tmp_path / "m.glb", cfg)
    assert glb.read_bytes()[:4] == b"glTF"
    written = export_by_extension(splat, tmp_path / "m.OBJ", cfg)
    assert sorted(p.name for p in written) == ["m.OBJ", "m.mtl", "m_albedo.png"]
    assert all(p.exists() for p in written)
    (ply,) = export_by_extension(splat, tmp_path / "s.ply", cfg)
    assert PlyData.read(str(ply))["vertex"].count == 50
    with pytest.raises(ValueError, match="no Gaussian splats"):
        export_by_extension(FakeFieldRenderer("cube"), tmp_path / "n.ply", cfg)
    with pytest.raises(ValueError, match="cannot tell the export format"):
        export_by_extension(splat, tmp_path / "m.fbx", cfg)
    assert not (tmp_path / "n.ply").exists() and not (tmp_path / "m.fbx").exists()


# ---------------------------------------------------------------- topology


def _topology(mesh: trimesh.Trimesh) -> tuple[int, int, bool]:
    return len(mesh.split(only_watertight=False)), int(mesh.euler_number), bool(mesh.is_watertight)


@pytest.mark.parametrize("shape, genus", [("cube", 0), ("cone", 0), ("torus", 1), ("mug", 1), ("snowman", 0)])
def test_world_objects_mesh_with_their_true_genus(shape, genus):
    from dreamlab.world.sdf import get_object

    obj = get_object(shape)
    density = lambda xyz: 5.0 * torch.sigmoid(-obj.sdf_points(xyz) / 0.01)  # noqa: E731
    em = extract_mesh(density, None, MeshExportConfig(resolution=80, faces=4000))
    assert _topology(em.mesh) == (1, 2 - 2 * genus, True)


def _spongy_ball(xyz: torch.Tensor) -> torch.Tensor:
    """A ball of radius 0.4 drilled through by three thin tunnels, with a hollow inside: the kind of
    density a score-distilled splat cloud leaves (genus 3 and a cavity as a raw isosurface)."""
    ball = torch.linalg.norm(xyz, dim=-1) - 0.4
    tunnels = []
    for axis, (a, b) in enumerate([(0.12, 0.05), (-0.1, 0.15), (0.08, -0.13)]):
        others = [i for i in range(3) if i != axis]
        radial = torch.sqrt((xyz[:, others[0]] - a) ** 2 + (xyz[:, others[1]] - b) ** 2)
        tunnels.append(0.012 - radial)  # inside a tunnel -> positive: carved out
    cavity = 0.15 - torch.linalg.norm(xyz - torch.tensor([0.0, -0.05, 0.02]), dim=-1)
    sdf = torch.maximum(ball, torch.stack(tunnels + [cavity]).max(dim=0).values)
    return 5.0 * torch.sigmoid(-sdf / 0.004)


def test_solidify_seals_tunnels_and_cavities_of_a_spongy_density():
    cfg = MeshExportConfig(resolution=96, faces=6000)
    raw = extract_mesh(_spongy_ball, None, MeshExportConfig(resolution=96, faces=6000, solidify=False,
                                                             min_component_fraction=0.0,
                                                             min_component_volume_fraction=0.0))
    components, euler, _ = _topology(raw.mesh)
    assert (2 * components - euler) // 2 >= 3  # the raw isosurface keeps the tunnels (and the cavity)
    solid = extract_mesh(_spongy_ball, None, cfg)
    assert _topology(solid.mesh) == (1, 2, True)  # one closed genus-0 surface
    assert np.isclose(solid.mesh.extents.max(), 1.0)


def test_decimation_keeps_the_topology():
    from dreamlab.export.mesh import decimate, topology_signature

    r = FakeFieldRenderer("torus")
    dense = extract_mesh(r.density, None, MeshExportConfig(resolution=96, faces=10**6)).mesh
    assert len(dense.faces) > 10000
    for budget in (3000, 600):
        small = decimate(dense, budget)
        assert len(small.faces) <= budget
        assert topology_signature(small) == topology_signature(dense) == (1, 0, True)


def test_solidify_settings_are_validated():
    with pytest.raises(ValueError, match="close_fraction"):
        MeshExportConfig(close_fraction=0.5).validate()
    with pytest.raises(ValueError, match="smooth_cells"):
        MeshExportConfig(smooth_cells=-1.0).validate()


# ---------------------------------------------------------------- carving the solid from renders

SMALL_CARVE = dict(carve_azimuths=8, carve_elevations_deg=(-40.0, 0.0, 40.0, 89.0), carve_image_size=64)


def _sphere_renders(radius: float):
    """Exact alpha and depth of a solid ball at the origin (analytic ray casting)."""

    def render(cams):
        from dreamlab.world.render import pixel_directions

        dirs = pixel_directions(cams).reshape(len(cams), cams.height, cams.width, 3)  # world rays
        origin = cams.centers[:, None, None, :]
        b = (origin * dirs).sum(-1)
        c = (origin * origin).sum(-1) - radius**2
        disc = b * b - c
        hit = disc > 0
        t = -b - torch.sqrt(disc.clamp_min(0))
        forward = -cams.c2w[:, None, None, :3, 2]
        depth = torch.where(hit, t * (dirs * forward).sum(-1), torch.zeros_like(t))
        return hit.float(), depth

    return render


def _drilled_ball(xyz: torch.Tensor) -> torch.Tensor:
    """A ball of radius 0.4 with three crossing tunnels too wide for the closing to seal (genus 5
    as a density solid) — what carving from renders of the intact ball must repair."""
    sdf = torch.linalg.norm(xyz, dim=-1) - 0.4
    for axis in range(3):
        others = [i for i in range(3) if i != axis]
        radial = torch.sqrt(xyz[:, others[0]] ** 2 + xyz[:, others[1]] ** 2)
        sdf = torch.maximum(sdf, 0.06 - radial)
    return 5.0 * torch.sigmoid(-sdf / 0.004)


def test_carving_from_renders_repairs_tunnels_the_closing_cannot_seal():
    cfg = MeshExportConfig(resolution=64, faces=4000, **SMALL_CARVE)
    density_only = extract_mesh(_drilled_ball, None, cfg)
    components, euler, _ = _topology(density_only.mesh)
    assert (2 * components - euler) // 2 >= 3  # tunnels 0.12 wide survive the 2-cell closing
    carved = extract_mesh(_drilled_ball, None, cfg, render_fn=_sphere_renders(0.4))
    assert _topology(carved.mesh) == (1, 2, True)
    world_extent = carved.mesh.extents / carved.scale
    assert np.allclose(world_extent, 0.8, atol=0.04)  # the ball's true size, not the hull's box


@pytest.mark.parametrize("shape, genus", [("torus", 1), ("mug", 1)])
def test_carving_keeps_holes_that_views_see_through(shape, genus):
    from dreamlab.world.render import render_geometry
    from dreamlab.world.sdf import get_object

    obj = get_object(shape)
    density = lambda xyz: 5.0 * torch.sigmoid(-obj.sdf_points(xyz) / 0.01)  # noqa: E731

    def render(cams):
        geo = render_geometry(shape, cams)
        return geo.hit.float(), geo.depth

    em = extract_mesh(density, None, MeshExportConfig(resolution=64, faces=4000, **SMALL_CARVE), render_fn=render)
    assert _topology(em.mesh) == (1, 2 - 2 * genus, True)


def test_carving_uses_the_renderer_in_export(tmp_path):
    calls = []
    renderer = FakeSplatRenderer("torus")
    original = renderer.render

    def counting_render(cams, background):
        calls.append(len(cams))
        return original(cams, background)

    renderer.render = counting_render
    cfg = small_cfg()
    cfg.mesh.carve_azimuths, cfg.mesh.carve_elevations_deg = 4, (0.0, 60.0)
    export_asset(renderer, tmp_path, cfg, formats=("glb",))
    assert sum(calls) == 8  # every carving view rendered once
    calls.clear()
    cfg.mesh.carve = False
    export_asset(renderer, tmp_path, cfg, formats=("glb",))
    assert calls == []


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("carve_azimuths", 0, "at least one azimuth"),
        ("carve_elevations_deg", (95.0,), "elevations"),
        ("carve_image_size", 8, "carve_image_size"),
        ("carve_alpha", 1.0, "carve_alpha"),
        ("carve_depth_margin", -0.1, "carve_depth_margin"),
        ("carve_min_votes", 1000, "carve_min_votes"),
        ("carve_grid", 4, "carve_grid"),
        ("carve_support_cells", -2, "carve_support_cells"),
    ],
)
def test_carving_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        MeshExportConfig(**{field: value}).validate()
