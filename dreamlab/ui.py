"""The web UI (Gradio): type a prompt, watch the previews stream in, download the asset.

``generate_job`` runs one job in-process and yields :class:`JobUpdate`s, without Gradio;
``build_app`` is a thin Gradio layer over it, served by ``launch`` / ``run_app`` (``python app.py``).
Gradio is imported only here, inside functions, so the rest of dreamlab does not need it.
"""

import logging
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamlab.cli import GenerateArgs, UserError, prompt_slug
from dreamlab.renderers import RENDERERS as RENDERER_CONFIGS

log = logging.getLogger(__name__)

GUIDANCE_NAMES = ("sds", "vsd", "esd", "csm", "vpcsm", "ism", "tsm", "asd", "bsd", "dsd", "cds")
PRIOR_CHOICES = ("builtin", "sd15", "sd21-base", "sd21")
RENDERERS = tuple(RENDERER_CONFIGS)
EXAMPLE_PROMPTS = ("a red cube", "a blue torus", "a snowman", "a house", "a yellow cone")
DEFAULT_FORMATS = ("glb", "obj", "ply", "mp4", "png")
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_STEPS = 5000
PREVIEWS_PER_RUN = 50  # the UI renders about this many previews per job, besides the trainer's own
DOWNLOADS = ("glb", "obj_zip", "ply", "mp4")  # the download slots of the UI, in order

# Jobs open their runs one at a time, so that a prior two first jobs need is loaded once, not
# twice. Training itself runs concurrently.
_OPEN_RUN_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------- jobs


@dataclass
class JobUpdate:
    """One state of a job, as ``generate_job`` yields it (each update is complete on its own)."""

    status: str  # "loading", "training", "exporting", "done", "cancelled" or "error"
    message: str  # one readable line for the user (never a traceback)
    step: int = 0
    total: int = 0
    loss: float | None = None
    preview: Any = None  # [H, W, 3] uint8 numpy array of a fresh render, or None
    run_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # DOWNLOADS keys (+ "png") -> files
    result: Any = None  # dreamlab.generation.RunResult when finished or cancelled

    @property
    def finished(self) -> bool:
        return self.status in ("done", "cancelled", "error")

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total if self.total else 0.0


class PriorCache:
    """Loaded priors by (name, device), shared by jobs so that a second job does not reload.

    Priors are frozen: jobs only run them (VSD/ESD copy the U-Net before adding a LoRA)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._priors: dict[tuple[str, str], Any] = {}

    def get(self, key: tuple[str, str]):
        with self._lock:
            return self._priors.get(key)

    def put(self, key: tuple[str, str], prior) -> None:
        with self._lock:
            self._priors.setdefault(key, prior)

    def __len__(self) -> int:
        with self._lock:
            return len(self._priors)


def new_run_dir(out_root: Path, prompt: str) -> Path:
    """A fresh folder name for one job: ``<out_root>/<timestamp>-<uuid8>-<prompt-slug>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(out_root) / f"{stamp}-{uuid.uuid4().hex[:8]}-{prompt_slug(prompt)}"


def check_upload(path: str | Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Validates an uploaded image prompt before anything uses it: a file with an image
    extension, at most ``max_bytes``, that decodes as a usable image. Raises UserError."""
    from dreamlab.image_prompt import ImagePromptError, load_image_prompt

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise UserError(f"the uploaded image {name} is missing; upload it again")
    if path.suffix.lower() not in UPLOAD_SUFFIXES:
        raise UserError(f"the uploaded file {name} is not an image; use one of {' '.join(UPLOAD_SUFFIXES)}")
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"the uploaded image {name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    try:
        load_image_prompt(path)
    except ImagePromptError as err:
        raise UserError(str(err).replace(str(path), name)) from None
    return path


def _number(value, name: str, kind=int, allow_none: bool = False):
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_none:
            return None
        raise UserError(f"{name} is empty")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise UserError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def _job_args(prompt, negative, prior, renderer, guidance, steps, seed, guidance_scale,
              overrides: Mapping[str, Any], max_steps: int, method_options: str = "") -> GenerateArgs:
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("type a prompt first, e.g. \"a red cube\"")
    guidance = (guidance or "sds").strip().lower()
    if guidance not in GUIDANCE_NAMES:
        raise UserError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE_NAMES)}")
    steps = _number(steps, "steps", allow_none=True)
    if steps is not None and steps < 0:
        raise UserError(f"steps must be at least 1, got {steps}")
    if steps is not None and steps > max_steps:
        raise UserError(f"steps is limited to {max_steps} here, got {steps}")
    prior = (prior or "builtin").strip() or "builtin"
    args = GenerateArgs(
        prompt=prompt,
        prior=prior,
        guidance=guidance,
        renderer=(renderer or "gaussians").strip(),
        steps=steps or None,  # 0 or empty: the prior's default
        seed=_number(seed if seed is not None else 0, "seed"),
        negative_prompt=(negative or "").strip(),
        guidance_scale=_number(guidance_scale, "guidance scale", kind=float, allow_none=True) or None,
        quiet=True,
        **dict(overrides),
    )
    if (method_options or "").strip():  # the CLI's --<method>.<name> options, as name=value pairs
        from dreamlab.guidance import GUIDANCES
        from dreamlab.guidance.options import options_from_text

        try:
            setattr(args, guidance, options_from_text(guidance, GUIDANCES[guidance], method_options))
        except ValueError as err:
            raise UserError(str(err)) from None
    return args


def _to_image(tensor):
    """[H, W, 3] float tensor in [0, 1] -> uint8 numpy array."""
    return (tensor.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()


def obj_bundle(run_dir: Path, obj_name: str = "model.obj") -> Path | None:
    """Zips the OBJ with its material library and the textures it names -> ``model_obj.zip``."""
    from dreamlab.export.atomic import atomic_write

    obj = run_dir / obj_name
    if not obj.is_file():
        return None
    members = [obj]
    for line in obj.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("mtllib "):
            mtl = run_dir / line.split(None, 1)[1].strip()
            if mtl.is_file():
                members.append(mtl)
                for mline in mtl.read_text(encoding="utf-8", errors="replace").splitlines():
                    if mline.strip().startswith("map_"):
                        texture = run_dir / mline.split()[-1]
                        if texture.is_file():
                            members.append(texture)
    target = run_dir / "model_obj.zip"
    with atomic_write(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for member in dict.fromkeys(members):
            bundle.write(member, arcname=member.name)
    return target


def _downloads(run_dir: Path, written: Sequence[str]) -> dict[str, Path]:
    """The files of a finished run, by download slot (only files this run wrote)."""
    written = set(written)
    files: dict[str, Path] = {}
    for key, name in (("glb", "model.glb"), ("ply", "splats.ply"), ("mp4", "turntable.mp4"),
                      ("png", "preview.png")):
        if name in written:
            files[key] = run_dir / name
    if "model.obj" in written:
        bundle = obj_bundle(run_dir)
        if bundle is not None:
            files["obj_zip"] = bundle
    return files


def generate_job(
    prompt: str,
    negative: str,
    prior: str | None,
    renderer: str,
    guidance: str,
    steps: float | None,
    seed: float | None,
    guidance_scale: float | None,
    image_path: str | Path | None,
    out_root: str | Path,
    cancel_event: threading.Event | None = None,
    *,
    prior_cache: PriorCache | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    overrides: Mapping[str, Any] | None = None,
    max_steps: int = MAX_STEPS,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    method_options: str = "",
) -> Iterator[JobUpdate]:
    """Runs one generation job in a fresh folder under ``out_root`` and yields its progress.

    Yields a "loading" update, a "training" update per step (with a preview every so often, and
    one before the first step), an "exporting" update, then one last update: "done" or
    "cancelled" (``cancel_event`` set: a checkpoint is saved and what exists is exported), or
    "error" with a one-line message. ``steps`` and ``guidance_scale`` 0 or None mean the
    defaults. ``method_options``: the guidance method's own options as ``name=value`` pairs
    (``lora_lr=1e-3 num_particles=2``; the CLI's ``--<method>.<name>``). ``overrides`` are further GenerateArgs fields (gaussians, resolution, faces,
    texture_size, checkpoint_every, device). The image is checked whenever one is given and
    used only by vpcsm. If the caller stops iterating mid-run, a checkpoint is still written.
    """
    from dreamlab.generation import export_run, open_run

    overrides = dict(overrides or {})
    run_dir: Path | None = None
    trainer = None
    state = {"saved": False}
    try:
        args = _job_args(prompt, negative, prior, renderer, guidance, steps, seed,
                         guidance_scale, overrides, max_steps, method_options)
        image = check_upload(image_path, max_upload_bytes) if image_path else None
        run_dir = new_run_dir(Path(out_root), args.prompt)
        note = ""
        if image is not None and args.guidance == "vpcsm":
            run_dir.mkdir(parents=True, exist_ok=False)
            args.image_prompt = run_dir / f"image_prompt{image.suffix.lower()}"
            shutil.copyfile(image, args.image_prompt)  # the job's own copy: uploads are temporary
        elif image is not None:
            note = f" (the image prompt is ignored: only vpcsm uses it, not {args.guidance})"
        elif args.guidance == "vpcsm":
            raise UserError("vpcsm needs an image prompt: upload a reference image")
        yield JobUpdate("loading", f"Loading the {args.prior} prior and setting up{note}...",
                        run_dir=run_dir)

        key = (args.prior, str(args.device))
        with _OPEN_RUN_LOCK:
            cached = prior_cache.get(key) if prior_cache is not None else None
            opened = open_run(args, run_dir, prior=cached, resume=True)
            if prior_cache is not None and cached is None:
                prior_cache.put(key, opened.prior)
        trainer = opened.trainer
        total = trainer.cfg.train.steps
        every = max(1, total // PREVIEWS_PER_RUN)
        yield JobUpdate("training", f"Step 0 / {total}{note}", 0, total,
                        preview=_to_image(trainer.preview()), run_dir=run_dir)

        started = time.perf_counter()
        steps_iter = iter(trainer)
        cancelled = False
        while True:
            if cancel_event is not None and cancel_event.is_set():
                cancelled = True
                break
            report = next(steps_iter, None)
            if report is None:
                break
            preview = report.preview
            if preview is None and report.step % every == 0:
                preview = trainer.preview()
            text = f"Step {report.step} / {report.total_steps} · loss {report.loss:.4g}"
            if report.message:
                text += f" · warning: {report.message}"
            yield JobUpdate("training", text, report.step, report.total_steps, report.loss,
                            preview=None if preview is None else _to_image(preview), run_dir=run_dir)
        train_seconds = time.perf_counter() - started

        if cancelled and trainer.step == 0:
            state["saved"] = True
            shutil.rmtree(run_dir, ignore_errors=True)
            yield JobUpdate("cancelled", f"Cancelled before the first step of {total}: nothing to keep",
                            0, total)
            return
        if cancelled:
            trainer.save()
            state["saved"] = True
        yield JobUpdate("exporting", "Exporting " + ", ".join(formats) + "...", trainer.step, total,
                        run_dir=run_dir)
        state["saved"] = True  # training is over: export_run's result.json records it
        result = export_run(trainer, run_dir, formats, train_seconds)
        files = _downloads(run_dir, result.files)
        if cancelled:
            status, text = "cancelled", (
                f"Cancelled at step {trainer.step} of {total}: checkpoint saved and what was made "
                f"exported to {run_dir.name}"
            )
        else:
            status, text = "done", (
                f"Done: {trainer.step} steps in {train_seconds:.1f} s, export {result.export_seconds:.1f} s; "
                f"files in {run_dir.name}"
            )
        yield JobUpdate(status, text, trainer.step, total, run_dir=run_dir, files=files, result=result)
    except (UserError, ValueError) as err:  # ImagePromptError is a ValueError
        yield JobUpdate("error", f"Error: {_one_line(err)}", run_dir=_keep(run_dir, trainer))
    except MemoryError:
        yield JobUpdate("error", "Error: out of memory: use fewer steps, a lower resolution or fewer Gaussians",
                        run_dir=_keep(run_dir, trainer))
    except Exception as err:  # the user sees one line; the server log has the traceback
        log.exception("UI job failed")
        yield JobUpdate("error", f"Error: {type(err).__name__}: {_one_line(err)}", run_dir=_keep(run_dir, trainer))
    finally:  # also when closed mid-run (client gone): keep what was made, drop empty folders
        if not state["saved"] and trainer is not None and trainer.step > 0:
            try:
                trainer.save()
            except Exception:  # best effort while shutting down
                log.exception("could not save a checkpoint of an abandoned UI job")
        elif not state["saved"] and run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _keep(run_dir: Path | None, trainer) -> Path | None:
    """After an error: removes the job's folder when nothing was trained in it."""
    if run_dir is None:
        return None
    if trainer is None or trainer.step == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        return None
    return run_dir


# ---------------------------------------------------------------------------------------- Gradio


def _require_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError("the web UI needs gradio: pip install gradio") from None
    return gradio


def build_app(
    out_root: Path,
    concurrency: int = 1,
    *,
    prior_cache: PriorCache | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    overrides: Mapping[str, Any] | None = None,
    allow_custom_prior: bool = True,
    max_steps: int = MAX_STEPS,
):
    """The Gradio app (queued, at most ``concurrency`` jobs at once; every job writes to its own
    folder under ``out_root``). ``formats`` and ``overrides`` are passed on to every job;
    ``allow_custom_prior`` lets users type a hub id or a local folder as the prior."""
    gr = _require_gradio()
    if int(concurrency) < 1:
        raise UserError(f"concurrency must be at least 1, got {concurrency}")
    out_root = Path(out_root)
    prior_cache = prior_cache if prior_cache is not None else PriorCache()
    cancels: dict[str, set[threading.Event]] = {}  # per browser session, for this app only
    cancels_lock = threading.Lock()

    def session_key(request) -> str:
        return getattr(request, "session_hash", None) or "anonymous"

    def on_generate(prompt, negative, prior, renderer, guidance, steps, seed, guidance_scale,
                    image, method_options, request: gr.Request):
        event = threading.Event()
        key = session_key(request)
        with cancels_lock:
            cancels.setdefault(key, set()).add(event)
        try:
            first = True
            for update in generate_job(prompt, negative, prior, renderer, guidance, steps, seed,
                                       guidance_scale, image, out_root, event,
                                       prior_cache=prior_cache, formats=formats,
                                       overrides=overrides, max_steps=max_steps,
                                       method_options=method_options):
                if update.status == "error":
                    gr.Warning(update.message)
                yield _outputs(gr, update, clear=first)
                first = False
        finally:
            with cancels_lock:
                events = cancels.get(key, set())
                events.discard(event)
                if not events:
                    cancels.pop(key, None)

    def on_cancel(request: gr.Request):
        with cancels_lock:
            events = list(cancels.get(session_key(request), ()))
        for event in events:
            event.set()
        return "Cancelling: saving a checkpoint and exporting what was made..." if events else "Nothing to cancel."

    with gr.Blocks(title="dreamlab", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# dreamlab\nType a prompt, watch the Gaussians train, download the asset "
                    "(GLB, OBJ, splat PLY, turntable video).")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="a red cube", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                prior = gr.Dropdown(
                    list(PRIOR_CHOICES), value="builtin", label="Prior", elem_id="prior",
                    allow_custom_value=allow_custom_prior,
                    info="builtin (offline, closed vocabulary), a Stable Diffusion name"
                    + (", a hub id or a local diffusers folder" if allow_custom_prior else ""),
                )
                with gr.Row():
                    renderer = gr.Dropdown(list(RENDERERS), value="gaussians", label="Renderer")
                    guidance = gr.Dropdown(list(GUIDANCE_NAMES), value="sds", label="Guidance",
                                           elem_id="guidance")
                with gr.Row():
                    steps = gr.Number(0, label="Steps", precision=0, minimum=0, maximum=max_steps,
                                      info="0: the prior's default", elem_id="steps")
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    guidance_scale = gr.Number(0, label="Guidance scale", minimum=0,
                                               info="0: the method's default", elem_id="guidance-scale")
                method_options = gr.Textbox(
                    label="Method options", elem_id="method-options",
                    placeholder="name=value ..., e.g. lora_lr=1e-3 num_particles=2 (vsd)",
                    info="The chosen method's own options (the CLI's --<method>.<name>); empty: its preset")
                with gr.Accordion("Options of the chosen method", open=False):
                    options_doc = gr.Markdown(_method_options_doc("sds"))
                image = gr.File(label="Image prompt (vpcsm only; PNG/JPEG/WebP..., at most "
                                f"{MAX_UPLOAD_BYTES // 2**20} MB)", file_types=list(UPLOAD_SUFFIXES),
                                type="filepath", elem_id="image-prompt")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                # The cancel click answers here, not in the status: the job's own stream owns the
                # status, and a late "Cancelling..." must not overwrite its final "Cancelled at step".
                cancel_note = gr.Markdown("", elem_id="cancel-note")
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Examples (builtin prior)")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", elem_id="status")
                progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False,
                                     elem_id="progress")
                preview = gr.Image(label="Preview", type="numpy", format="png", interactive=False,
                                   height=320, elem_id="preview")
                model = gr.Model3D(label="Result (GLB)", height=360, elem_id="model3d")
                with gr.Row():
                    glb_file = gr.File(label="GLB", elem_id="file-glb", interactive=False)
                    obj_file = gr.File(label="OBJ + MTL + texture (zip)", elem_id="file-obj", interactive=False)
                with gr.Row():
                    ply_file = gr.File(label="Splats PLY", elem_id="file-ply", interactive=False)
                    mp4_file = gr.File(label="Turntable MP4", elem_id="file-mp4", interactive=False)
        result_glb = gr.State(None)  # this session's last result, for the viewer

        generate_btn.click(
            on_generate,
            inputs=[prompt, negative, prior, renderer, guidance, steps, seed, guidance_scale, image,
                    method_options],
            outputs=[status, progress, preview, model, result_glb, glb_file, obj_file, ply_file, mp4_file],
            show_progress="full",  # shows the place in the queue while waiting
            api_name="generate",
        ).then(lambda glb: glb, inputs=[result_glb], outputs=[model], queue=False,
               show_progress="hidden", api_visibility="private")
        generate_btn.click(lambda: "", outputs=[cancel_note], queue=False, show_progress="hidden",
                           api_visibility="private")
        cancel_btn.click(on_cancel, outputs=[cancel_note], queue=False, api_name="cancel")
        guidance.change(_method_options_doc, inputs=[guidance], outputs=[options_doc], queue=False,
                        api_visibility="private")
    demo.queue(default_concurrency_limit=int(concurrency))
    return demo


def _method_options_doc(method: str) -> str:
    """Markdown help of a guidance method's options, for the UI's options panel."""
    from dreamlab.guidance import GUIDANCES
    from dreamlab.guidance.options import options_help

    if method not in GUIDANCES:
        return ""
    return f"**{method}** options (`name=value`):\n\n" + options_help(method, GUIDANCES[method])


def _outputs(gr, update: JobUpdate, clear: bool) -> tuple:
    """A JobUpdate -> the values of (status, progress, preview, model, result GLB state, and the
    glb, obj, ply, mp4 downloads). The viewer is only cleared here; a follow-up event shows the
    result (Gradio 6's Model3D loses a model that is set twice in quick succession, as a
    generator's last yield and its completion are)."""
    keep = gr.skip()
    status = f"**Error.** {update.message[len('Error: '):]}" if update.status == "error" else update.message
    progress = round(update.percent, 1) if update.total else (0 if clear else keep)
    preview = update.preview if update.preview is not None else (None if clear else keep)
    if update.status in ("done", "cancelled"):
        paths = {key: str(path) for key, path in update.files.items()}  # Gradio takes str paths
        glb = paths.get("glb")
        downloads = tuple(paths.get(k) for k in DOWNLOADS)
        return (status, 100 if update.status == "done" else progress, preview, keep, glb, *downloads)
    rest = (None,) * 6 if clear else (keep,) * 6
    return (status, progress, preview, *rest)


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    out_root: Path = Path("outputs/ui"),
    concurrency: int = 1,
    *,
    block: bool = True,
    **app_options,
):
    """Builds the app and serves it; with ``block=False`` returns the running app (close() it)."""
    out_root = Path(out_root)
    if not 0 <= int(port) <= 65535:
        raise UserError(f"port must be in 0..65535, got {port}")
    from dreamlab.generation import check_writable

    check_writable(out_root)
    demo = build_app(out_root, concurrency, **app_options)
    demo.launch(
        server_name=host,
        server_port=int(port) or None,
        share=share,
        allowed_paths=[str(out_root.resolve())],  # results are served from there
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=False,
        ssr_mode=False,
        quiet=not block,
        prevent_thread_lock=not block,
    )
    return demo


def run_app(host: str, port: int, share: bool, out: Path, concurrency: int) -> int:
    """``dreamlab app``: serves the UI until interrupted; returns the exit code."""
    launch(host, port, share, Path(out), concurrency)
    return 0
