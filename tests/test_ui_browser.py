"""The web UI in a real browser: headless Chromium (the system's, Debian package ``chromium``)
driven by Playwright types a prompt, generates with the builtin prior, watches the previews
stream, sees the 3D viewer load the GLB and downloads it. Screenshots go to $DREAMLAB_ARTIFACTS
(default tests/artifacts/, which ignores itself in git).

Needs: ``apt-get install -y chromium`` and ``pip install playwright gradio`` (no ``playwright
install``: the system Chromium is used; DREAMLAB_CHROMIUM=/path/to/chromium overrides it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FAST = {"gaussians": 400, "resolution": 32, "faces": 1000, "texture_size": 64, "device": "cpu"}
STEPS = 8


def _chromium() -> str:
    override = os.environ.get("DREAMLAB_CHROMIUM")
    if override:
        if not Path(override).is_file():
            pytest.fail(f"DREAMLAB_CHROMIUM={override} is not a file")
        return override
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is missing: install it with `apt-get install -y chromium` (Debian/Ubuntu), "
                "or point DREAMLAB_CHROMIUM at a Chromium/Chrome binary")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: `pip install playwright` (do not run `playwright install`; "
                    "the test drives the system Chromium from `apt-get install -y chromium`)")
    return sync_playwright


def _artifacts() -> Path:
    folder = Path(os.environ.get("DREAMLAB_ARTIFACTS") or REPO / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if folder == REPO / "tests" / "artifacts" and not ignore.exists():
        ignore.write_text("*\n")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drawn_fraction(png: bytes) -> float:
    """Fraction of pixels that are not (near) white or transparent in a screenshot."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return float((rgb.min(axis=2) < 225).mean())


@contextlib.contextmanager
def _serve(out: Path, formats: tuple[str, ...]):
    """The app as ``dreamlab app`` serves it (concurrency 1), on a free local port."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("gradio is missing: pip install gradio (the web UI's dependency)")
    from dreamlab.ui import launch

    port = _free_port()
    demo = launch("127.0.0.1", port, False, out, 1, block=False, formats=formats, overrides=FAST)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextlib.contextmanager
def _browser():
    executable = _chromium()
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable, headless=True,
            # containers: no user namespaces for the sandbox; WebGL through SwiftShader (no GPU)
            args=["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"],
        )
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, url: str, errors: list[str]):
    page = browser.new_context(viewport={"width": 1280, "height": 1400}, accept_downloads=True).new_page()
    local = url.rstrip("/")
    # hermetic: the page may fetch only from the app itself
    page.route("**/*", lambda route: route.continue_()
               if route.request.url.startswith((local, "data:", "blob:")) else route.abort())
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    return page


def _wait_status(page, prefix: str, timeout_ms: int = 240_000) -> str:
    page.wait_for_function(
        f"document.querySelector('#status').innerText.includes({prefix!r})", timeout=timeout_ms)
    return page.inner_text("#status")


def test_generate_in_a_real_browser(tmp_path):
    import trimesh

    artifacts = _artifacts()
    errors: list[str] = []
    with _browser() as browser, _serve(tmp_path / "ui-out", ("glb", "obj", "ply")) as url:
        page = _open(browser, url, errors)
        page.fill("#prompt textarea", "a red cube")
        page.click("#prior input")
        page.get_by_role("option", name="builtin", exact=True).click()
        assert page.input_value("#prior input") == "builtin"
        page.fill("#steps input", str(STEPS))
        page.evaluate("""() => {  // remember every preview the page shows
            window.__previews = [];
            new MutationObserver(() => {
                const img = document.querySelector('#preview img');
                if (img && img.src && !window.__previews.includes(img.src)) window.__previews.push(img.src);
            }).observe(document.querySelector('#preview'), {subtree: true, childList: true, attributes: true});
        }""")
        page.click("#generate")

        status = _wait_status(page, "Done:")
        assert f"{STEPS} steps" in status and "a-red-cube" in status, status
        previews = page.evaluate("window.__previews")
        assert len(previews) >= 2, f"the preview did not update while training: {previews}"
        assert float(page.input_value("#progress input[type=number]")) == 100

        # the 3D viewer loads the GLB: its canvas appears and draws something
        page.wait_for_selector("#model3d canvas[data-engine]", timeout=60_000)
        href = page.get_attribute("#model3d [data-testid=model3d-download-link]", "href")
        assert href and href.endswith("/model.glb"), href
        canvas = page.locator("#model3d canvas")
        deadline = time.monotonic() + 30
        while _drawn_fraction(canvas.screenshot()) < 0.01:
            assert time.monotonic() < deadline, "the 3D viewer drew nothing"
            time.sleep(0.5)
        for slot, name in (("#file-obj", "model_obj.zip"), ("#file-ply", "splats.ply")):
            assert page.locator(f"{slot} a[download]").get_attribute("download") == name

        with page.expect_download() as download_info:
            page.click("#file-glb a[download]")
        glb = artifacts / "ui-model.glb"
        download_info.value.save_as(glb)
        page.screenshot(path=str(artifacts / "ui.png"), full_page=True)
    assert not errors, errors

    data = glb.read_bytes()
    assert data[:4] == b"glTF" and int.from_bytes(data[8:12], "little") == len(data)
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0


def test_two_users_queue_cancel_and_separate_results(tmp_path):
    """Concurrency 1: the second user sees their place in the queue; the first cancels (and keeps
    a checkpoint); each page shows only its own job's files."""
    errors: list[str] = []
    out = tmp_path / "ui-out"
    with _browser() as browser, _serve(out, ("ply",)) as url:
        first, second = _open(browser, url, errors), _open(browser, url, errors)
        for page, prompt, steps in ((first, "a red cube", 400), (second, "a blue torus", STEPS)):
            page.fill("#prompt textarea", prompt)
            page.fill("#steps input", str(steps))
        first.click("#generate")
        first.wait_for_function(  # training (statuses can be coalesced: no exact step)
            "/^Step [1-9]/.test(document.querySelector('#status').innerText)", timeout=120_000)
        second.click("#generate")
        second.wait_for_function(
            "document.querySelector('#status [data-testid=status-tracker]').innerText.includes('queue')",
            timeout=30_000)
        second.screenshot(path=str(_artifacts() / "ui-queued.png"))
        assert "Step" in first.inner_text("#status")  # still training

        first.click("#cancel")
        first.wait_for_function(
            "document.querySelector('#cancel-note').innerText.includes('Cancelling')", timeout=30_000)
        cancelled = _wait_status(first, "Cancelled at step", 120_000)
        first.wait_for_timeout(1000)  # the final status stays: nothing overwrites it afterwards
        assert first.inner_text("#status") == cancelled
        done = _wait_status(second, "Done:")
        assert "a-red-cube" in cancelled and "a-blue-torus" in done, (cancelled, done)
        links = [page.get_attribute("#file-ply a[download]", "href") for page in (first, second)]
        assert links[0] != links[1]
        assert first.locator("#file-glb a[download]").count() == 0  # only what was exported
    assert not errors, errors

    run_dirs = {p.name.split("-", 3)[-1]: p for p in out.iterdir()}
    assert set(run_dirs) == {"a-red-cube", "a-blue-torus"}
    step = int(cancelled.split("Cancelled at step ")[1].split()[0])
    assert (run_dirs["a-red-cube"] / "checkpoints" / f"step_{step:07d}.pt").is_file()
    assert (run_dirs["a-blue-torus"] / "splats.ply").is_file()
