"""The web UI's handlers without a browser: streaming, results, readable errors, upload checks,
cancel, and concurrent jobs kept apart (tests/test_ui_browser.py drives the real page)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dreamlab.ui import MAX_UPLOAD_BYTES, RENDERERS, PriorCache, check_upload, generate_job

FAST = {"gaussians": 400, "resolution": 32, "faces": 1000, "texture_size": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def cache() -> PriorCache:
    return PriorCache()  # the builtin prior loads once for the whole module


def _job(out, cache, prompt="a red cube", steps=6, guidance="sds", image=None, cancel=None,
         formats=("glb",), seed=0):
    return generate_job(prompt, "", "builtin", "gaussians", guidance, steps, seed, None, image, out,
                        cancel, prior_cache=cache, formats=formats, overrides=FAST)


def _assert_readable(update) -> None:
    assert update.status == "error"
    assert update.message.startswith("Error: ")
    assert "Traceback" not in update.message and "\n" not in update.message
    assert 'File "' not in update.message


def test_job_streams_previews_and_progress_then_a_glb(tmp_path, cache):
    import trimesh

    updates = list(_job(tmp_path, cache, formats=("glb", "obj", "ply")))
    statuses = [u.status for u in updates]
    assert statuses[0] == "loading" and statuses[-1] == "done", [u.message for u in updates]
    training = [u for u in updates if u.status == "training"]
    assert [u.step for u in training] == list(range(7))
    assert all(u.total == 6 for u in training)
    assert training[-1].percent == 100.0 and training[-1].loss is not None
    previews = [u.preview for u in training if u.preview is not None]
    assert previews, "no preview was streamed"
    assert previews[-1].dtype == np.uint8 and previews[-1].ndim == 3 and previews[-1].shape[2] == 3
    assert "exporting" in statuses

    done = updates[-1]
    run_dir = done.run_dir
    assert run_dir.parent == tmp_path and run_dir.name.endswith("-a-red-cube")
    glb = done.files["glb"]
    assert glb == run_dir / "model.glb" and glb.read_bytes()[:4] == b"glTF"
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0
    assert done.files["ply"].is_file()
    with zipfile.ZipFile(done.files["obj_zip"]) as bundle:
        names = set(bundle.namelist())
    assert {"model.obj", "model.mtl"} <= names and any(n.endswith(".png") for n in names)
    assert "mp4" not in done.files  # only what was asked for
    result = json.loads((run_dir / "result.json").read_text())
    assert result["prompt"] == "a red cube" and result["steps"] == 6


def test_unknown_word_is_a_readable_error_and_leaves_no_folder(tmp_path, cache):
    updates = list(_job(tmp_path, cache, prompt="a red dragon"))
    last = updates[-1]
    _assert_readable(last)
    assert "dragon" in last.message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("guidance", "steps", "seed", "words"),
    [("nope", 6, 0, "unknown guidance"), ("sds", -3, 0, "steps"), ("sds", 6, "x", "seed"),
     ("sds", 10**7, 0, "limited"), ("vpcsm", 6, 0, "image prompt")],
)
def test_bad_settings_are_readable_errors(tmp_path, cache, guidance, steps, seed, words):
    updates = list(_job(tmp_path, cache, guidance=guidance, steps=steps, seed=seed))
    _assert_readable(updates[-1])
    assert words in updates[-1].message
    assert not any(tmp_path.iterdir())


def test_empty_prompt_is_refused(tmp_path, cache):
    updates = list(_job(tmp_path, cache, prompt="   "))
    assert len(updates) == 1
    _assert_readable(updates[0])


def _png(path: Path, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_bad_uploads_are_refused_before_use(tmp_path, cache):
    out = tmp_path / "out"
    fake = tmp_path / "notes.png"  # a text file renamed .png
    fake.write_text("this is not an image\n")
    text = tmp_path / "ref.txt"
    _png(tmp_path / "ok.png").rename(text)  # a real image with a wrong extension
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_BYTES))
    for bad, words in ((fake, "cannot read"), (text, "not an image"), (huge, "limit is 10 MB"),
                       (tmp_path / "gone.png", "missing")):
        updates = list(_job(out, cache, guidance="vpcsm", image=bad))
        assert len(updates) == 1, [u.message for u in updates]  # refused before anything started
        _assert_readable(updates[0])
        assert words in updates[0].message, updates[0].message
        assert str(tmp_path) not in updates[0].message  # names the file, not server paths
    assert not out.exists() or not any(out.iterdir())


def test_check_upload_accepts_a_real_image(tmp_path):
    good = _png(tmp_path / "ref.PNG")
    assert check_upload(good) == good


def test_vpcsm_uses_its_own_copy_of_the_upload(tmp_path, cache):
    upload = _png(tmp_path / "upload.png")
    last = list(_job(tmp_path / "out", cache, guidance="vpcsm", image=upload, formats=("ply",)))[-1]
    assert last.status == "done", last.message
    copy = last.run_dir / "image_prompt.png"
    assert copy.read_bytes() == upload.read_bytes()
    config = json.loads((last.run_dir / "config.json").read_text())
    assert Path(config["guidance"]["image_prompt"]) == copy.resolve()


def test_cancel_keeps_a_checkpoint_and_reports_the_step(tmp_path, cache):
    cancel = threading.Event()
    updates = []
    for update in _job(tmp_path, cache, steps=10, cancel=cancel, formats=("ply",)):
        updates.append(update)
        if update.status == "training" and update.step == 3:
            cancel.set()
    last = updates[-1]
    assert last.status == "cancelled", last.message
    assert "Cancelled at step 3 of 10" in last.message
    assert max(u.step for u in updates if u.status == "training") == 3
    assert (last.run_dir / "checkpoints" / "step_0000003.pt").is_file()
    assert last.files["ply"].is_file() and last.result.steps == 3


def test_cancel_before_the_first_step_keeps_nothing(tmp_path, cache):
    cancel = threading.Event()
    cancel.set()
    last = list(_job(tmp_path, cache, cancel=cancel))[-1]
    assert last.status == "cancelled" and "before the first step" in last.message
    assert not last.files and not any(tmp_path.iterdir())


def test_unexpected_failures_are_one_readable_line(tmp_path, cache, monkeypatch):
    import dreamlab.generation

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire\n  second line")

    monkeypatch.setattr(dreamlab.generation, "open_run", broken)
    last = list(_job(tmp_path, cache))[-1]
    _assert_readable(last)
    assert last.message == "Error: RuntimeError: disk on fire second line"
    assert not any(tmp_path.iterdir())


def test_abandoned_job_still_saves_a_checkpoint(tmp_path, cache):
    job = _job(tmp_path, cache, steps=10, formats=("ply",))
    for update in job:
        if update.status == "training" and update.step == 2:
            break
    job.close()  # what Gradio does when the browser goes away
    assert (update.run_dir / "checkpoints" / "step_0000002.pt").is_file()

    early = _job(tmp_path / "early", cache, steps=10, formats=("ply",))
    assert next(early).status == "loading"
    early.close()  # gone before training: no empty folder is left behind
    assert not (tmp_path / "early").exists() or not any((tmp_path / "early").iterdir())


def test_concurrent_jobs_write_to_their_own_folders(tmp_path, cache):
    finals: dict[str, object] = {}

    def run(prompt: str) -> None:
        finals[prompt] = list(_job(tmp_path, cache, prompt=prompt, formats=("ply", "png")))[-1]

    threads = [threading.Thread(target=run, args=(p,)) for p in ("a red cube", "a blue torus")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(finals) == {"a red cube", "a blue torus"}
    cube, torus = finals["a red cube"], finals["a blue torus"]
    assert cube.status == torus.status == "done", (cube.message, torus.message)
    assert cube.run_dir != torus.run_dir
    for final, slug in ((cube, "a-red-cube"), (torus, "a-blue-torus")):
        assert final.run_dir.name.endswith(slug)
        assert final.files and all(p.parent == final.run_dir and p.is_file() for p in final.files.values())
        assert final.result.prompt == slug.replace("-", " ")
        assert json.loads((final.run_dir / "result.json").read_text())["prompt"] == final.result.prompt
    assert len(cache) == 1


def test_dreamlab_does_not_import_gradio():
    code = ("import sys, dreamlab.cli, dreamlab.generation, dreamlab.train; "
            "sys.exit(1 if 'gradio' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=120).returncode == 0


def test_build_app_wires_the_queue(tmp_path):
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("gradio is missing: pip install gradio (the web UI's dependency)")
    from dreamlab.ui import build_app

    demo = build_app(tmp_path, concurrency=2)
    assert demo._queue.default_concurrency_limit == 2  # Gradio's queue; no public getter
    deps = {dep.get("api_name"): dep for dep in demo.config["dependencies"]}
    assert deps["generate"]["queue"] and deps["generate"]["show_progress"] == "full"
    assert deps["cancel"]["queue"] is False  # cancelling never waits behind the running job


def test_method_options_reach_the_run_and_bad_ones_are_readable(tmp_path, cache):
    updates = list(generate_job("a red cube", "", "builtin", "gaussians", "sds", 2, 0, None, None, tmp_path,
                                None, prior_cache=cache, formats=("png",), overrides=FAST,
                                method_options="guidance_scale=3.5, timesteps-t-max=0.9"))
    assert updates[-1].status == "done", updates[-1].message
    config = json.loads((updates[-1].run_dir / "config.json").read_text())
    assert config["guidance"]["guidance_scale"] == 3.5
    for bad, words in [("no_such=1", "has no option 'no_such'"), ("guidance_scale=high", "must be a number"),
                       ("guidance_scale", "name=value")]:
        last = list(generate_job("a red cube", "", "builtin", "gaussians", "sds", 2, 0, None, None, tmp_path,
                                 None, prior_cache=cache, overrides=FAST, method_options=bad))[-1]
        _assert_readable(last)
        assert words in last.message


def test_nerf_job_gives_a_glb_and_no_splats(tmp_path, cache):
    assert "nerf" in RENDERERS
    updates = list(generate_job("a red cube", "", "builtin", "nerf", "sds", 4, 0, None, None, tmp_path,
                                None, prior_cache=cache, formats=("glb", "ply"),
                                overrides={"resolution": 16, "faces": 800, "texture_size": 64}))
    done = updates[-1]
    assert done.status == "done", [u.message for u in updates]
    assert done.files["glb"].read_bytes()[:4] == b"glTF"
    assert "ply" not in done.files  # a NeRF has no splats: skipped, not an error
    assert json.loads((done.run_dir / "result.json").read_text())["settings"]["renderer"] == "nerf"
