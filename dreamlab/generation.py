"""One generation job, shared by every front end: ``dreamlab generate``, ``dreamlab batch`` (local
or on Ray workers) and the web UI.

The training logic lives in :class:`dreamlab.train.Trainer`; this module only opens a run folder
for it (validation, prior, resume) and exports what it made, so that no front end keeps a second
copy of either. A front end drives the trainer itself (progress bar, streaming previews, cancel).

Run-folder contract (what ``batch`` resume and the UI rely on):

- ``config.json`` is written when the run starts, checkpoints under ``checkpoints/`` while it
  trains, the outputs after it, and ``result.json`` last of all: a run folder with a
  ``result.json`` is finished; one with checkpoints and no ``result.json`` was interrupted and
  resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreamlab.cli import GenerateArgs, UserError, build_run_config

RESULT_FILE = "result.json"


@dataclass
class OpenedRun:
    """A trainer ready to iterate, and how it was opened."""

    trainer: object  # dreamlab.train.Trainer
    run_dir: Path
    resumed_from: Path | None  # the checkpoint it continues from, None for a fresh start
    prior: object  # the loaded prior (reuse it for the next job with the same --prior)


@dataclass
class RunResult:
    """What a finished run wrote; also stored as ``result.json`` in its folder."""

    prompt: str
    files: list[str]  # paths relative to the run folder
    steps: int
    train_seconds: float
    export_seconds: float
    settings: dict = field(default_factory=dict)


def open_run(
    args: GenerateArgs,
    run_dir: Path,
    prior=None,
    resume: bool | None = None,
) -> OpenedRun:
    """Validates ``args``, loads the prior (or reuses ``prior``), checks the prompt against it,
    creates ``run_dir`` and builds the trainer, resumed from the newest checkpoint when asked.

    ``resume``: None follows ``args.resume`` and refuses a folder holding checkpoints without it
    (the CLI's rule); True continues from a checkpoint when there is one and starts fresh when
    there is none (batch and UI jobs). Raises UserError for anything the user can fix.
    """
    from dreamlab.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint
    from dreamlab.config import config_to_json
    from dreamlab.export.atomic import atomic_write_text
    from dreamlab.priors import PriorLoadError, load_prior
    from dreamlab.train import Trainer, prior_dtype, resolve_device

    cfg = build_run_config(args)
    may_resume = args.resume if resume is None else resume
    check_writable(run_dir.parent)
    latest = find_latest_checkpoint(run_dir / "checkpoints")
    if latest is not None and not may_resume:
        raise UserError(
            f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, "
            "or choose another --out"
        )
    if latest is not None:  # fail fast on an unusable checkpoint, before loading the prior
        try:
            load_checkpoint(latest)
        except CheckpointError as err:
            raise UserError(str(err)) from None
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise UserError(str(err)) from None
    if prior is None:
        try:
            prior = load_prior(cfg.prior, device=device, dtype=prior_dtype(cfg, device))
        except PriorLoadError as err:
            raise UserError(str(err)) from None
    try:  # a closed-vocabulary prior refuses unknown words here, before anything is written
        prior.encode_prompt([cfg.prompt.strip(), cfg.prompt_processing.negative_prompt])
    except ValueError as err:
        raise UserError(str(err)) from None
    check_writable(run_dir)
    try:
        trainer = Trainer(cfg, prior=prior, run_dir=run_dir)
        used = trainer.resume() if may_resume else None
    except CheckpointError as err:
        raise UserError(str(err)) from None
    atomic_write_text(run_dir / "config.json", config_to_json(cfg))
    return OpenedRun(trainer=trainer, run_dir=run_dir, resumed_from=used, prior=prior)


def export_run(trainer, run_dir: Path, formats, train_seconds: float = 0.0) -> RunResult:
    """Writes the outputs of a trained run (every particle of VSD/ESD's ``num_particles``) and
    then ``result.json``, which marks the folder finished."""
    from dreamlab.export import export_asset
    from dreamlab.export.atomic import atomic_write_text

    cfg = trainer.cfg
    started = time.perf_counter()
    written = list(export_asset(trainer.renderer, run_dir, cfg.export, formats=formats))
    for k, particle in enumerate(trainer.renderers[1:], start=1):
        written += export_asset(particle, run_dir / f"particle_{k}", cfg.export, formats=formats)
    result = RunResult(
        prompt=cfg.prompt,
        files=[str(Path(p).resolve().relative_to(run_dir.resolve())) for p in written],
        steps=trainer.step,
        train_seconds=round(float(train_seconds), 2),
        export_seconds=round(time.perf_counter() - started, 2),
        settings=run_settings(cfg),
    )
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(result.__dict__, indent=2) + "\n")
    return result


def run_settings(cfg) -> dict:
    """The settings a user would name to reproduce a run (shown in manifests and the UI)."""
    from dreamlab.guidance import GUIDANCES
    from dreamlab.renderers import renderer_name

    guidance = next((name for name, kind in GUIDANCES.items() if isinstance(cfg.guidance, kind)), "?")
    return {
        "prompt": cfg.prompt,
        "negative_prompt": cfg.prompt_processing.negative_prompt,
        "prior": str(cfg.prior),
        "guidance": guidance,
        "renderer": renderer_name(cfg.renderer),
        "steps": cfg.train.steps,
        "seed": cfg.train.seed,
    }


def read_result(run_dir: Path) -> dict | None:
    """The finished run's ``result.json``, or None when the run is not finished: no file, an
    unreadable one, or one written for a run stopped before its last step (a cancelled UI job
    exports what it has)."""
    path = Path(run_dir) / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    try:
        complete = int(data["steps"]) >= int(data["settings"]["steps"])
    except (KeyError, TypeError, ValueError):
        return None
    return data if complete else None


def check_writable(directory: Path) -> None:
    """Creates ``directory`` and proves a file can be written there; UserError if not."""
    import os
    import uuid

    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique per thread too
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output folder {directory}: {err.strerror or err}") from None
