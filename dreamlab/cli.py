"""The ``dreamlab`` command line: ``generate`` a 3D asset from a prompt, ``export`` a checkpoint.

A thin front end over ``dreamlab.train.Trainer`` and ``dreamlab.export``. Bad input ends with a
one-line ``dreamlab: error: ...`` on stderr and exit code 2 (1 for failures during a run), never a
traceback; an interrupted run (Ctrl-C, SIGTERM) writes a checkpoint first and says how to resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

log = logging.getLogger("dreamlab")


class UserError(Exception):
    """Bad input or an impossible request: reported as one line, exit code 2."""


@dataclass
class GenerateArgs:
    """Generate a 3D asset (GLB, OBJ, splat PLY, turntable video) from a text prompt."""

    prompt: tyro.conf.Positional[str]
    """What to generate, e.g. "a red cube"."""
    prior: str | None = None
    """Diffusion prior: builtin (default: offline, closed vocabulary such as "a red cube",
    "a snowman"), a Stable Diffusion short name (sd15, sd21-base, sd21), a Hugging Face hub id,
    or a local diffusers folder (works offline)."""
    guidance: str = "sds"
    """Score-distillation rule (see docs/guidance.md)."""
    renderer: str = "gaussians"
    """3D representation."""
    steps: int | None = None
    """Optimisation steps (default: the prior's preset, 500 for Stable Diffusion)."""
    seed: int = 0
    """Random seed; the same seed and settings give the same asset."""
    out: Path = Path("outputs")
    """Output folder; the run goes to OUT/<prompt-slug>/."""
    resume: bool = False
    """Continue the run in OUT/<prompt-slug>/ from its newest checkpoint."""
    negative_prompt: str = ""
    """What the asset should not look like."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (diffusers convention); default: the guidance's own."""
    image_prompt: Path | None = None
    """Reference image for --guidance vpcsm (PNG/JPEG/WebP..., alpha composited on white)."""
    faces: int | None = None
    """Face budget of the exported mesh."""
    size_m: float | None = None
    """Size of the exported asset in metres (its largest dimension)."""
    texture_size: int | None = None
    """Texture resolution in pixels."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps."""
    gaussians: int | None = None
    """Initial number of Gaussians (default: the renderer's own)."""
    resolution: int | None = None
    """Render at this fixed resolution (pixels) instead of the default 64 -> 128 schedule."""
    rasterizer: Literal["auto", "torch", "cuda", "gsplat"] | None = None
    """Gaussian rasterizer backend: auto (dreamlab's CUDA kernels on a GPU when they build, else
    gsplat if installed, else torch), torch, cuda or gsplat (docs/renderer.md). Default: auto."""
    init_from: Path | None = None
    """Coarse-to-fine: start the Gaussians from a finished run's density field (a run folder or
    checkpoint, e.g. of a --renderer nerf run) instead of a random ball (docs/nerf.md)."""
    formats: tuple[Literal["glb", "obj", "ply", "mp4", "png"], ...] = ("glb", "obj", "ply", "mp4", "png")
    """Outputs to write after training: glb, obj, ply (splats), mp4 (turntable), png (preview)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    quiet: bool = False
    """No progress bar."""


@dataclass
class ExportArgs:
    """Re-export an asset from a training checkpoint."""

    checkpoint: tyro.conf.Positional[Path]
    """A checkpoint file (OUT/<slug>/checkpoints/step_*.pt)."""
    format: Literal["glb", "obj", "ply"] = "glb"
    """Output format."""
    particle: int = 0
    """Which particle of a multi-particle run (VSD/ESD --<method>.num-particles N): 0 .. N-1."""
    out: Path | None = None
    """Output file (default: model.<format> or splats.ply in the run folder; particle_K/ for K > 0)."""
    faces: int | None = None
    """Face budget of the exported mesh."""
    size_m: float | None = None
    """Size of the exported asset in metres (its largest dimension)."""
    texture_size: int | None = None
    """Texture resolution in pixels."""


@dataclass
class TrainBuiltinArgs:
    """Train the builtin offline prior on renders of the procedural world (CPU: under an hour)."""

    steps: int = 6500
    """Optimisation steps (batch 32; the shipped weights used 6,500)."""
    seed: int = 0
    """Seeds the world's views, the initial weights and every batch."""
    num_views: int | None = None
    """Size of the rendered view cache (default: the world's own)."""
    view_word_probability: float | None = None
    """Probability that a caption names its view (default: the world's own, 0.5)."""
    composite_fraction: float | None = None
    """Share of the rendered views given to the objects with a front (default: the world's own,
    0.5, used by the shipped v6 weights; v5 used 0.4; docs/world.md)."""
    fronted_view_word_probability: tuple[float, float] | None = (0.3, 0.9)
    """For objects with a front: the view-word probability of front views and of other views,
    replacing --view-word-probability for them (the world's default, used by the v5 and the shipped v6
    weights; None: --view-word-probability for every view, as v4; docs/world.md)."""
    view_caption_loss_weight: float = 3.0
    """Loss weight of captions that name a view of an object with a front (1 = plain mean). The
    shipped v6 weights use 3; v4 and v5 used 2; v2, trained at 1, did not learn the view words
    (docs/builtin-prior.md)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Arithmetic of training: auto = bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU runs it
    natively, else fp32. bf16 ran a step 1.15x faster on such a CPU and trained a prior as good as
    fp32's (docs/builtin-prior.md, the v8 trial); it is emulated and slow elsewhere."""
    device: str = "auto"
    """auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N. The data is drawn on
    the CPU either way, so a seed gives the same batches on both."""
    out: Path | None = None
    """Folder for the trained prior (default: assets/builtin-prior, the shipped default)."""
    work_dir: Path = Path("builtin-prior-work")
    """Folder for the view cache and training checkpoints."""
    resume: bool = False
    """Continue from the newest checkpoint in --work-dir."""
    quiet: bool = False
    """No progress bar."""


@dataclass
class TrainImageAdapterArgs:
    """Train the builtin prior's image-prompt adapter (IP-Adapter style; VPCSM needs it) on the
    world's renders, with the prior frozen (CPU: ~20 minutes on 2 cores)."""

    steps: int = 2000
    """Optimisation steps (batch 32)."""
    seed: int = 0
    """Seeds the adapter's initial weights and every batch."""
    text_dropout: float = 0.5
    """Probability of training on the empty caption: high, so that the image has to carry the
    object's identity (at 0.1 the adapter learned almost nothing the caption did not already say)."""
    prior: Path | None = None
    """Folder of the builtin prior to adapt; the adapter is saved inside it, in image-adapter/
    (default: the shipped assets/builtin-prior)."""
    work_dir: Path = Path("builtin-prior-work")
    """Folder for the view cache (shared with train-builtin) and the adapter's checkpoints."""
    device: str = "auto"
    """auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N."""
    resume: bool = False
    """Continue from the newest adapter checkpoint in --work-dir."""
    quiet: bool = False
    """No progress bar."""


@dataclass
class AppArgs:
    """Serve the web UI (Gradio): prompt to 3D in a browser, with a queue and downloads."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 7860
    """Port to listen on."""
    share: bool = False
    """Also open a public Gradio share link."""
    out: Path = Path("outputs/ui")
    """Folder for the jobs' run folders (one per job)."""
    concurrency: int = 1
    """Jobs that run at once; the others wait in the queue (their place in line is shown)."""


def prompt_slug(prompt: str, max_chars: int = 48) -> str:
    """A folder name for a prompt: lowercase ASCII words joined by '-', never a path."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.strip().lower()).strip("-")
    digest = hashlib.sha1(prompt.strip().encode("utf-8")).hexdigest()[:8]
    if not slug:
        return f"prompt-{digest}"
    if len(slug) > max_chars:
        return f"{slug[:max_chars].rstrip('-')}-{digest}"
    return slug


def _check_writable(directory: Path) -> None:
    from dreamlab.generation import check_writable

    check_writable(directory)


def build_run_config(args: GenerateArgs):
    """GenerateArgs -> validated RunConfig. Raises UserError for bad input."""
    from dreamlab.config import make_run_config

    if args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    try:
        cfg = make_run_config(
            args.prompt,
            prior=args.prior,
            guidance=args.guidance,
            renderer=args.renderer,
            steps=args.steps,
            seed=args.seed,
            guidance_scale=args.guidance_scale,
            gaussians=args.gaussians,
            resolution=args.resolution,
            rasterizer=args.rasterizer,
            init_from=None if args.init_from is None else str(args.init_from),
            negative_prompt=args.negative_prompt,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            image_prompt=None if args.image_prompt is None else str(Path(args.image_prompt).resolve()),
        )
        if getattr(cfg.guidance, "image_prompt", None) is not None:
            from dreamlab.image_prompt import load_image_prompt

            load_image_prompt(cfg.guidance.image_prompt)  # a bad image fails before the prior loads
        cfg.export = cfg.export.with_overrides(args.faces, args.size_m, args.texture_size)
        cfg.export.validate()
        options = getattr(args, args.guidance, None)
        if options is not None:
            from dreamlab.guidance.options import apply_options

            cfg.guidance = apply_options(cfg.guidance, options)
            cfg.validate()
        options = renderer_options(args)
        if options is not None:
            from dreamlab.guidance.options import apply_options

            cfg.renderer = apply_options(cfg.renderer, options)
            cfg.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    return cfg


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):  # signal handler signature
    raise _Interrupted()


def _setup_run_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def generate(args: GenerateArgs) -> int:
    from dreamlab.generation import export_run, open_run

    run_dir = args.out / prompt_slug(args.prompt)  # open_run validates args before touching it
    _quiet_library_progress_bars()
    opened = open_run(args, run_dir)
    trainer = opened.trainer
    cfg = trainer.cfg
    handler = _setup_run_logging(run_dir)
    try:
        _say(f"dreamlab: generating {cfg.prompt!r} into {run_dir}")
        if args.resume:
            _say(f"dreamlab: resumed from {opened.resumed_from} (step {trainer.step})" if opened.resumed_from
                 else "dreamlab: no checkpoint found, starting from scratch")
        started = time.perf_counter()
        code = _run_loop(trainer, quiet=args.quiet)
        if code != 0:
            return code
        result = export_run(trainer, run_dir, args.formats, time.perf_counter() - started)
        log.info("export took %.1f s", result.export_seconds)
        for name in result.files:
            _say(f"  wrote {run_dir / name}")
        return 0
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _quiet_library_progress_bars() -> None:
    """diffusers/transformers print weight-loading bars; dreamlab shows its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _drive(trainer, total: int, desc: str, quiet: bool, on_report, save) -> int:
    """Iterates a trainer under a progress bar; Ctrl-C / SIGTERM writes a checkpoint via ``save``.

    Returns 0 when training finished, EXIT_INTERRUPTED after an interruption.
    """
    from tqdm import tqdm

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    bar = tqdm(total=total, initial=trainer.step, desc=desc, unit="step", disable=quiet,
               dynamic_ncols=True)
    try:
        for report in trainer:
            bar.update(1)
            on_report(bar, report)
    except (KeyboardInterrupt, _Interrupted):
        bar.close()
        path = save()
        _say(f"dreamlab: interrupted at step {trainer.step}; checkpoint {path}; rerun with --resume to continue")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    return 0


def _run_loop(trainer, quiet: bool) -> int:
    def on_report(bar, report) -> None:
        bar.set_postfix(loss=f"{report.loss:.4g}", n=report.num_gaussians, res=report.resolution)
        if report.message:
            bar.write(f"dreamlab: warning: {report.message}")
        if report.step % 10 == 0 or report.step == report.total_steps:
            log.info(
                "step %d/%d loss %.5g size %d res %d t %s %.3fs",
                report.step, report.total_steps, report.loss, report.num_gaussians,
                report.resolution, report.timesteps, report.seconds,
            )

    return _drive(trainer, trainer.cfg.train.steps, "training", quiet, on_report, trainer.save)


def export(args: ExportArgs) -> int:
    import torch

    from dreamlab.checkpoint import CheckpointError, load_checkpoint
    from dreamlab.config import config_from_json
    from dreamlab.export import export_by_extension
    from dreamlab.train import build_renderer

    try:
        state = load_checkpoint(args.checkpoint)
        cfg = config_from_json(state["config_json"])
    except (CheckpointError, ValueError) as err:
        raise UserError(str(err)) from None
    cfg.export = cfg.export.with_overrides(args.faces, args.size_m, args.texture_size)
    try:
        cfg.export.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    particles = [state["renderer"], *state.get("particles", [])]
    if not 0 <= args.particle < len(particles):
        raise UserError(f"--particle {args.particle}: the checkpoint holds {len(particles)} particle(s), "
                        f"numbered 0 to {len(particles) - 1}")
    renderer = build_renderer(cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    renderer.load_checkpoint_state(particles[args.particle])
    run_dir = args.checkpoint.resolve().parent.parent
    if args.particle:
        run_dir = run_dir / f"particle_{args.particle}"
    default_name = "splats.ply" if args.format == "ply" else f"model.{args.format}"
    target = args.out if args.out is not None else run_dir / default_name
    if target.suffix.lower().lstrip(".") != args.format:
        raise UserError(f"--out {target} does not end in .{args.format}")
    _check_writable(target.parent)
    written = export_by_extension(renderer, target, cfg.export)
    for path in written:
        _say(f"  wrote {path}")
    return 0


def _train_and_export(trainer, args, total: int, desc: str, out: Path, what: str) -> int:
    """Resumes (with ``args.resume``), trains under a progress bar, exports to ``out``."""
    from dreamlab.checkpoint import CheckpointError

    if args.resume:
        try:
            used = trainer.resume()
        except CheckpointError as err:
            raise UserError(str(err)) from None
        _say(f"dreamlab: resumed from {used} (step {trainer.step})" if used else "dreamlab: no checkpoint, starting fresh")
    started = time.perf_counter()
    code = _drive(trainer, total, desc, args.quiet,
                  lambda bar, report: bar.set_postfix(loss=f"{report.loss:.4f}"), trainer.save_checkpoint)
    if code != 0:
        return code
    written = trainer.export(out, training_seconds=time.perf_counter() - started)
    _say(f"dreamlab: {what} written to {written}")
    return 0


def train_builtin_config(args: TrainBuiltinArgs):
    """The validated BuiltinTrainConfig for the command's flags (UserError when impossible)."""
    from dreamlab.priors.train_builtin import BuiltinTrainConfig

    cfg = BuiltinTrainConfig(steps=args.steps, seed=args.seed, view_caption_loss_weight=args.view_caption_loss_weight,
                             precision=args.precision)
    data_overrides = {
        name: getattr(args, name) for name in ("num_views", "view_word_probability", "composite_fraction")
        if getattr(args, name) is not None
    }
    cfg.data = dataclasses.replace(
        cfg.data, fronted_view_word_probability=args.fronted_view_word_probability, **data_overrides
    )
    try:
        cfg.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    return cfg


def _training_device(name: str):
    """The torch device for --device (UserError when it is unknown or absent)."""
    from dreamlab.train import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        raise UserError(str(err)) from None


def train_builtin(args: TrainBuiltinArgs) -> int:
    from dreamlab.checkpoint import find_latest_checkpoint
    from dreamlab.priors.builtin import ASSET_DIR
    from dreamlab.priors.train_builtin import (
        BuiltinPriorTrainer,
        autocast_supported,
        cpu_has_native_bf16,
        resolve_precision,
    )

    cfg = train_builtin_config(args)
    device = _training_device(args.device)
    if (reason := autocast_supported(cfg.precision, device)) is not None:
        raise UserError(reason)
    if cfg.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _say("dreamlab: warning: this CPU has no native bf16 (AVX512-BF16 or AMX); --precision bf16 "
             "will be emulated and slower than fp32")
    elif cfg.precision == "auto":
        arithmetic = resolve_precision("auto", device)
        why = "it runs bf16 natively" if arithmetic == "bf16" else "it has no native bf16"
        _say(f"dreamlab: training in {arithmetic} on {device.type} ({why}; --precision fp32|bf16 to choose)")
    _check_writable(args.work_dir)
    out = args.out or ASSET_DIR
    _check_writable(out)
    if find_latest_checkpoint(args.work_dir / "checkpoints") is not None and not args.resume:
        raise UserError(f"{args.work_dir} already holds training checkpoints: pass --resume, or use another --work-dir")
    _say("dreamlab: rendering the world's training views (cached in --work-dir)")
    trainer = BuiltinPriorTrainer(cfg, args.work_dir, device=device)
    return _train_and_export(trainer, args, cfg.steps, "training prior", out, "builtin prior")


def train_image_adapter(args: TrainImageAdapterArgs) -> int:
    from dreamlab.checkpoint import find_latest_checkpoint
    from dreamlab.priors import PriorLoadError
    from dreamlab.priors.builtin import ASSET_DIR, BuiltinPrior
    from dreamlab.priors.train_image_adapter import ImageAdapterTrainConfig, ImageAdapterTrainer

    cfg = ImageAdapterTrainConfig(steps=args.steps, seed=args.seed, text_dropout=args.text_dropout)
    try:
        cfg.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    folder = args.prior or ASSET_DIR
    device = _training_device(args.device)
    try:
        prior = BuiltinPrior.from_pretrained(folder, device=device)
    except PriorLoadError as err:
        raise UserError(str(err)) from None
    _check_writable(args.work_dir)
    _check_writable(folder)
    if find_latest_checkpoint(args.work_dir / "image-adapter-checkpoints") is not None and not args.resume:
        raise UserError(f"{args.work_dir} already holds image-adapter checkpoints: pass --resume, or use another --work-dir")
    _say("dreamlab: loading the world's training views (cached in --work-dir)")
    trainer = ImageAdapterTrainer(cfg, args.work_dir, prior)
    return _train_and_export(trainer, args, cfg.steps, "training image adapter", folder, "image-prompt adapter")


COMMAND_GROUPS = {
    "prior": {"train-builtin": "TrainBuiltinArgs", "train-image-adapter": "TrainImageAdapterArgs"},
    "bench": {"prior": "BenchPriorArgs", "quality": "BenchQualityArgs"},
}


def _flag_value(argv: list[str], flag: str, default: str) -> str:
    """The value of ``flag`` in ``argv`` (``default`` when absent), before tyro parses it."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def guidance_from_argv(argv: list[str], default: str | None = None) -> str:
    """The value of ``--guidance`` in ``argv`` (the default, sds, when absent), before tyro parses it."""
    return _flag_value(argv, "--guidance", GenerateArgs.guidance if default is None else default)


def renderer_from_argv(argv: list[str], default: str | None = None) -> str:
    """The value of ``--renderer`` in ``argv`` (the default, gaussians, when absent)."""
    return _flag_value(argv, "--renderer", GenerateArgs.renderer if default is None else default)


RENDERERS_WITH_OPTIONS = ("nerf",)
"""Renderers whose config fields are command-line options ``--<renderer>.<field>`` (the Gaussians
keep their two flags, ``--gaussians`` and ``--rasterizer``; their other fields are in config files)."""


def args_with_guidance_options(base: type, method: str, renderer: str | None = None) -> type:
    """``base`` (a command's dataclass) plus ``--<method>.<field>`` options of the chosen guidance
    (its own help text) and, for a renderer in ``RENDERERS_WITH_OPTIONS``, its
    ``--<renderer>.<field>`` options. An unknown method or renderer adds nothing; the command then
    names the known ones.
    """
    from dreamlab.guidance import GUIDANCES
    from dreamlab.guidance.options import options_type
    from dreamlab.renderers import RENDERERS

    extra = []
    if method in GUIDANCES:
        options = options_type(method, GUIDANCES[method])
        extra.append((method, options, dataclasses.field(default_factory=options)))
    if renderer in RENDERERS_WITH_OPTIONS and renderer in RENDERERS:
        options = options_type(renderer, RENDERERS[renderer])
        extra.append((renderer, options, dataclasses.field(default_factory=options)))
    if not extra:
        return base
    made = dataclasses.make_dataclass(base.__name__, extra, bases=(base,))
    made.__doc__ = base.__doc__
    return made


def generate_args_with_guidance_options(method: str, renderer: str | None = None) -> type:
    """GenerateArgs plus the chosen guidance's ``--<method>.<field>`` options (and the renderer's)."""
    return args_with_guidance_options(GenerateArgs, method, renderer)


def renderer_options(args) -> object | None:
    """The ``--<renderer>.<field>`` options parsed for ``args.renderer``, if it has any."""
    if args.renderer not in RENDERERS_WITH_OPTIONS:
        return None
    options = getattr(args, args.renderer, None)
    return options if dataclasses.is_dataclass(options) else None


def _parse(argv: list[str]):
    """Top-level commands (generate, export) and command groups (prior ..., bench ...)."""
    if argv and argv[0] in COMMAND_GROUPS:
        from dreamlab.bench.cli import BenchPriorArgs, BenchQualityArgs

        types_by_name = {"TrainBuiltinArgs": TrainBuiltinArgs, "TrainImageAdapterArgs": TrainImageAdapterArgs,
                         "BenchPriorArgs": BenchPriorArgs,
                         "BenchQualityArgs": BenchQualityArgs}
        group = {name: types_by_name[t] for name, t in COMMAND_GROUPS[argv[0]].items()}
        if argv[0] == "bench" and len(argv) > 1 and argv[1] == "quality":  # + the method's options
            group["quality"] = args_with_guidance_options(
                BenchQualityArgs,
                guidance_from_argv(argv[2:], BenchQualityArgs.guidance),
                renderer_from_argv(argv[2:], BenchQualityArgs.renderer),
            )
        return tyro.extras.subcommand_cli_from_dict(group, args=argv[1:], prog=f"dreamlab {argv[0]}")
    from dreamlab.batch import BatchArgs, batch_args_type, ray_flag_default

    generate_type, batch_type = GenerateArgs, BatchArgs
    if argv and argv[0] == "generate":
        generate_type = generate_args_with_guidance_options(
            guidance_from_argv(argv[1:]), renderer_from_argv(argv[1:])
        )
    if argv and argv[0] == "batch":
        argv = ray_flag_default(argv)
        batch_type = batch_args_type(
            guidance_from_argv(argv[1:], BatchArgs.guidance),
            renderer_from_argv(argv[1:], BatchArgs.renderer),
        )
    return tyro.extras.subcommand_cli_from_dict(
        {"generate": generate_type, "batch": batch_type, "export": ExportArgs, "app": AppArgs},
        args=argv,
        prog="dreamlab",
        description="dreamlab: text to game-ready 3D assets. More commands: "
        "`dreamlab prior train-builtin`, `dreamlab prior train-image-adapter`, `dreamlab bench prior`, `dreamlab bench quality`.",
    )


def _dispatch(args) -> int:
    if isinstance(args, GenerateArgs):
        return generate(args)
    if isinstance(args, ExportArgs):
        return export(args)
    from dreamlab.batch import BatchArgs, run_batch

    if isinstance(args, BatchArgs):
        return run_batch(args)
    if isinstance(args, AppArgs):
        if args.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {args.concurrency}")
        try:
            from dreamlab.ui import run_app
        except ImportError as err:
            raise UserError(f"the web UI needs gradio: pip install -e '.[ui]' ({err})") from None
        return run_app(args.host, args.port, args.share, args.out, args.concurrency)
    if isinstance(args, TrainBuiltinArgs):
        return train_builtin(args)
    if isinstance(args, TrainImageAdapterArgs):
        return train_image_adapter(args)
    from dreamlab.bench.cli import BenchPriorArgs, bench_prior, bench_quality
    from dreamlab.priors import PriorLoadError

    try:
        return bench_prior(args) if isinstance(args, BenchPriorArgs) else bench_quality(args)
    except (ValueError, PriorLoadError) as err:
        raise UserError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    root = logging.getLogger()
    if not any(getattr(h, "_dreamlab_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)  # the run log file gets INFO; the terminal only warnings
        console.setFormatter(logging.Formatter("dreamlab: %(levelname)s: %(message)s"))
        console._dreamlab_console = True
        root.addHandler(console)
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"dreamlab: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dreamlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("dreamlab: error: out of memory: lower --steps resolution or the Gaussian count", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # last line of defence: one line, log has details
        log.debug("unexpected failure", exc_info=True)
        print(f"dreamlab: error: {type(err).__name__}: {err}", file=sys.stderr)
        if os.environ.get("DREAMLAB_DEBUG"):
            raise
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
