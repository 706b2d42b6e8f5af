"""End to end through the command line: generate with a tiny random prior folder, read every
output back with independent readers, resume after SIGKILL, and refuse bad input cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamlab.cli import main, prompt_slug
from dreamlab.priors.testing import make_tiny_sd_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--gaussians", "600", "--resolution", "32", "--faces", "1500", "--texture-size", "128",
        "--quiet"]


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prior") / "tiny-sd"
    make_tiny_sd_folder(folder)
    return folder


def _partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.is_file()]


@pytest.fixture(scope="module")
def finished_run(tiny_prior, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    code = main(["generate", "a red cube", "--prior", str(tiny_prior), "--steps", "24",
                 "--checkpoint-every", "8", "--out", str(out), *FAST])
    assert code == 0
    return out / "a-red-cube"


def test_generate_writes_every_output(finished_run: Path):
    for name in ("model.glb", "model.obj", "model.mtl", "splats.ply", "turntable.mp4",
                 "preview.png", "config.json", "run.log"):
        assert (finished_run / name).is_file(), name
        assert (finished_run / name).stat().st_size > 0, name
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == [
        "step_0000016.pt", "step_0000024.pt"]
    assert not _partial_files(finished_run)
    config = json.loads((finished_run / "config.json").read_text())
    assert config["prompt"] == "a red cube" and config["train"]["steps"] == 24


def test_glb_is_read_by_independent_readers(finished_run: Path):
    import pygltflib
    import trimesh

    scene = trimesh.load(finished_run / "model.glb")
    mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
    assert len(mesh.faces) > 0 and len(mesh.faces) <= 1500
    assert mesh.bounds[0][1] == pytest.approx(0.0, abs=1e-4)  # rests on the ground plane
    gltf = pygltflib.GLTF2().load(str(finished_run / "model.glb"))
    assert gltf.materials[0].pbrMetallicRoughness.baseColorTexture is not None
    assert len(gltf.images) == 1


def test_glb_passes_khronos_validator(finished_run: Path):
    from tests.export_fixtures import validate_glb

    report = validate_glb(finished_run / "model.glb")
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]


def test_ply_and_video_are_readable(finished_run: Path):
    import imageio.v3 as iio
    from plyfile import PlyData

    ply = PlyData.read(str(finished_run / "splats.ply"))
    names = [p.name for p in ply["vertex"].properties]
    assert names[:3] == ["x", "y", "z"] and "opacity" in names and "rot_3" in names
    frames = iio.imread(finished_run / "turntable.mp4", plugin="pyav" if _has_pyav() else None)
    assert frames.ndim == 4 and frames.shape[0] > 1


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_export_command_reexports(finished_run: Path, tmp_path: Path):
    target = tmp_path / "again.ply"
    code = main(["export", str(finished_run / "checkpoints" / "step_0000024.pt"), "--format", "ply",
                 "--out", str(target)])
    assert code == 0 and target.is_file()
    from plyfile import PlyData

    assert len(PlyData.read(str(target))["vertex"]) > 0


# ----------------------------------------------------------------------------- resume


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dreamlab", *args]


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "step_0000030.pt", weights_only=True)
    return state["renderer"]


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_prior, tmp_path: Path):
    common = ["a blue ball", "--prior", str(tiny_prior), "--steps", "30", "--checkpoint-every", "10",
              "--formats", "ply", *FAST]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    straight = tmp_path / "straight"
    subprocess.run(_cli(["generate", *common, "--out", str(straight)]), check=True, env=env,
                   capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(["generate", *common, "--out", str(killed)]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "a-blue-ball" / "checkpoints" / "step_0000010.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run never wrote its first checkpoint"
    assert not (killed / "a-blue-ball" / "checkpoints" / "step_0000030.pt").exists()

    resumed = subprocess.run(_cli(["generate", *common, "--out", str(killed), "--resume"]),
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    a, b = _final_params(straight / "a-blue-ball"), _final_params(killed / "a-blue-ball")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def test_rerun_without_resume_is_refused(finished_run: Path, tiny_prior, capsys):
    code = main(["generate", "a red cube", "--prior", str(tiny_prior), "--steps", "24",
                 "--out", str(finished_run.parent), *FAST])
    assert code == 2
    assert "--resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def _assert_one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamlab: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "prompt, expected",
    [("", "empty"), ("   ", "empty"), ("a/b cube", "path separator"), ("..\\evil", "path separator"),
     ("x" * 10_000, "characters")],
)
def test_bad_prompts_are_refused(prompt, expected, tiny_prior, tmp_path, capsys):
    code = main(["generate", prompt, "--prior", str(tiny_prior), "--out", str(tmp_path), *FAST])
    line = _assert_one_line_error(capsys, code)
    assert expected in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_bad_step_counts_are_refused(steps, tiny_prior, tmp_path, capsys):
    code = main(["generate", "a cube", "--prior", str(tiny_prior), "--steps", steps,
                 "--out", str(tmp_path), *FAST])
    assert "--steps" in _assert_one_line_error(capsys, code)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_refused(tiny_prior, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["generate", "a cube", "--prior", str(tiny_prior), "--out", str(blocker / "sub"), *FAST])
    assert "cannot write" in _assert_one_line_error(capsys, code)


def test_non_diffusers_prior_folder_is_refused(tmp_path, capsys):
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    code = main(["generate", "a cube", "--prior", str(bogus), "--out", str(out), *FAST])
    line = _assert_one_line_error(capsys, code)
    assert "model_index.json" in line or "diffusers" in line
    leftovers = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not {"model.glb", "splats.ply"} & set(leftovers)
    assert not _partial_files(out) if out.exists() else True


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_refused(finished_run: Path, tmp_path, damage, capsys):
    source = (finished_run / "checkpoints" / "step_0000024.pt").read_bytes()
    broken = tmp_path / "step_0000024.pt"
    if damage == "truncate":
        broken.write_bytes(source[: len(source) // 2])
    elif damage == "garbage":
        broken.write_bytes(os.urandom(4096))
    else:
        broken.write_bytes(b"")
    target = tmp_path / "model.glb"
    code = main(["export", str(broken), "--format", "glb", "--out", str(target)])
    assert "corrupt" in _assert_one_line_error(capsys, code)
    assert not target.exists() and not _partial_files(tmp_path)


def test_resume_from_corrupt_checkpoint_is_refused(tiny_prior, tmp_path, capsys):
    run_dir = tmp_path / "a-cube" / "checkpoints"
    run_dir.mkdir(parents=True)
    (run_dir / "step_0000010.pt").write_bytes(b"\x80\x02garbage")
    code = main(["generate", "a cube", "--prior", str(tiny_prior), "--steps", "20",
                 "--out", str(tmp_path), "--resume", *FAST])
    assert "corrupt" in _assert_one_line_error(capsys, code)


def test_prompt_slug_is_a_plain_folder_name():
    assert prompt_slug("A Red Cube!") == "a-red-cube"
    assert "/" not in prompt_slug("../../etc") and prompt_slug("../../etc") == "etc"
    assert prompt_slug("日本").startswith("prompt-")
    long = prompt_slug("word " * 100)
    assert len(long) <= 48 + 9
