"""``dreamlab batch``: generate every prompt of a file, resumably, on this machine or as Ray tasks.

PROMPTS is ``.txt`` (one prompt a line; blank lines and ``#`` comments skipped), ``.jsonl`` (one
JSON object a line) or ``.csv`` (a header row). JSON objects and CSV columns may override, per
row: ``guidance, steps, seed, prior, renderer, name, negative_prompt, guidance_scale`` (an empty
CSV cell keeps the batch's value). ``--seeds 0,1,2`` makes one asset per seed of every row that
names no seed of its own.

Each asset goes to ``OUT/<name>/`` (name: the row's ``name``, else the prompt's slug; ``-seed<N>``
appended when several seeds apply), the same folder layout as ``dreamlab generate``
(``dreamlab.generation``): rerunning the command skips finished assets (``result.json``) and
resumes interrupted ones from their checkpoints. A bad row (unknown word, bad JSON, missing or
unknown column, bad value, duplicate name) is recorded with its reason and the others go on.
``OUT/manifest.json`` (rewritten atomically after every asset) and ``OUT/index.html`` (a gallery)
describe the batch; the exit code is 0 when every row succeeded, 1 otherwise.

With ``--ray [ADDRESS]`` the same jobs run as Ray tasks (``run_job`` in a worker; one task per
asset, ``--ray-cpus`` CPUs and ``--ray-gpus`` GPUs each). Workers write straight into OUT, so on
a cluster OUT must be storage every node shares (docs/batch.md).
"""

from __future__ import annotations

import csv
import html
import json
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import tyro

from dreamlab.cli import GenerateArgs, UserError, prompt_slug

ROW_FIELDS: dict[str, type] = {
    "prompt": str,
    "name": str,
    "guidance": str,
    "steps": int,
    "seed": int,
    "prior": str,
    "renderer": str,
    "negative_prompt": str,
    "guidance_scale": float,
}
"""Fields a row may set, and their types."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
MANIFEST = "manifest.json"
INDEX = "index.html"
EXIT_SOME_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass
class BatchArgs:
    """Generate every prompt of a .txt / .jsonl / .csv file into one folder; rerun to resume."""

    prompts: tyro.conf.Positional[Path]
    """Prompt file: .txt (one prompt a line), .jsonl or .csv (per-row overrides: guidance, steps,
    seed, prior, renderer, name, negative_prompt, guidance_scale)."""
    out: Path = Path("outputs/batch")
    """Output folder: one sub-folder per asset, plus manifest.json and index.html."""
    seeds: str = "0"
    """Comma-separated seeds, e.g. 0,1,2: one asset per seed for rows without their own seed."""
    guidance: str = "sds"
    """Score-distillation rule for rows that do not name one."""
    steps: int | None = None
    """Optimisation steps for rows that do not name them (default: the prior's preset)."""
    prior: str | None = None
    """Prior for rows that do not name one (default: builtin)."""
    renderer: str = "gaussians"
    """3D representation for rows that do not name one."""
    negative_prompt: str = ""
    """Negative prompt for rows that do not name one."""
    guidance_scale: float | None = None
    """CFG scale for rows that do not name one (default: the guidance's own)."""
    gaussians: int | None = None
    """Initial number of Gaussians (default: the renderer's own)."""
    resolution: int | None = None
    """Fixed render resolution in pixels (default: the 64 -> 128 schedule)."""
    faces: int | None = None
    """Face budget of each exported mesh."""
    texture_size: int | None = None
    """Texture resolution in pixels."""
    formats: tuple[Literal["glb", "obj", "ply", "mp4", "png"], ...] = ("glb", "obj", "ply", "mp4", "png")
    """Outputs per asset."""
    checkpoint_every: int = 100
    """Checkpoint every N steps (what an interrupted asset resumes from)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    ray: str | None = None
    """Run the assets as Ray tasks: "local" starts Ray on this machine, "auto" joins the running
    cluster, or a head address (ray://host:10001). A bare --ray means local."""
    ray_cpus: float = 1.0
    """CPUs per Ray task (also its torch thread count)."""
    ray_gpus: float = 0.0
    """GPUs per Ray task (1 on a GPU cluster)."""
    quiet: bool = False
    """No progress bars (the summary table is still printed)."""


# --------------------------------------------------------------------------- prompt files


@dataclass
class Row:
    """One line or record of the prompt file."""

    number: int  # 1-based line (txt/jsonl) or record (csv) number
    values: dict = field(default_factory=dict)
    error: str | None = None


def read_rows(path: Path) -> list[Row]:
    """Parses the prompt file into rows; a bad row carries its ``error`` instead of failing the
    file. UserError when the file itself is unusable (missing, unknown type, no prompt column)."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".txt", ".jsonl", ".csv"):
        raise UserError(f"prompt file {path} must end in .txt, .jsonl or .csv")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read prompt file {path}: {err}") from None
    if kind == ".csv":
        rows = _csv_rows(text, path)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            rows.append(Row(number, {"prompt": line.strip()}) if kind == ".txt" else _jsonl_row(number, line))
    if not rows:
        raise UserError(f"prompt file {path} holds no prompts")
    return rows


def _jsonl_row(number: int, line: str) -> Row:
    try:
        value = json.loads(line)
    except ValueError as err:
        return Row(number, error=f"bad JSON: {err}")
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        return Row(number, error="each line must be a JSON object such as {\"prompt\": \"a red cube\"}")
    return _typed_row(number, {str(k): v for k, v in value.items()})


def _csv_rows(text: str, path: Path) -> list[Row]:
    reader = csv.reader(text.splitlines())
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"prompt file {path} is empty") from None
    except csv.Error as err:
        raise UserError(f"prompt file {path}: {err}") from None
    if "prompt" not in header:
        raise UserError(f"prompt file {path} has no 'prompt' column (header: {', '.join(header)})")
    unknown = [h for h in header if h not in ROW_FIELDS]
    if unknown:
        raise UserError(f"prompt file {path}: unknown column(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}")
    rows = []
    number = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            rows.append(Row(number + 1, error=f"bad CSV: {err}"))
            number += 1
            continue
        number += 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            missing = header[len(cells):]
            what = f"missing column(s) {', '.join(missing)}" if missing else f"{len(cells)} cells for {len(header)} columns"
            rows.append(Row(number, error=what))
            continue
        values = {h: c for h, c in zip(header, cells) if c.strip() != ""}
        rows.append(_typed_row(number, values))
    return rows


def _typed_row(number: int, values: dict) -> Row:
    unknown = [k for k in values if k not in ROW_FIELDS]
    if unknown:
        return Row(number, error=f"unknown field(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}")
    if not isinstance(values.get("prompt"), str) or not values["prompt"].strip():
        return Row(number, error="missing column 'prompt' (or it is empty)")
    typed = {}
    for key, value in values.items():
        kind = ROW_FIELDS[key]
        try:
            if kind is str:
                if not isinstance(value, str):
                    raise ValueError
                typed[key] = value.strip()
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                typed[key] = int(value)
            else:
                if isinstance(value, bool):
                    raise ValueError
                typed[key] = float(value)
        except (TypeError, ValueError):
            return Row(number, error=f"{key} must be {kind.__name__}, got {value!r}")
    return Row(number, typed)


# --------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One asset to make: a row at one seed."""

    name: str
    row: int
    prompt: str
    seed: int | None
    overrides: dict
    error: str | None = None


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds:
        raise UserError("--seeds names no seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed: {text}")
    return seeds


def plan_jobs(rows: list[Row], seeds: list[int]) -> list[Job]:
    """Rows × seeds -> named jobs; bad rows and duplicate names become jobs with an error."""
    jobs: list[Job] = []
    taken: dict[str, int] = {}
    for row in rows:
        if row.error is not None:
            jobs.append(Job(name=f"row-{row.number}", row=row.number, prompt="", seed=None, overrides={}, error=row.error))
            continue
        values = dict(row.values)
        prompt = values.pop("prompt")
        base = values.pop("name", None)
        if base is not None and not NAME_PATTERN.fullmatch(base):
            jobs.append(Job(f"row-{row.number}", row.number, prompt, None, {}, error=(
                f"name {base!r} is not a plain folder name: use up to 80 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit")))
            continue
        base = base or prompt_slug(prompt)
        own_seed = values.pop("seed", None)
        row_seeds = [own_seed] if own_seed is not None else seeds
        for seed in row_seeds:
            name = base if len(row_seeds) == 1 else f"{base}-seed{seed}"
            job = Job(name, row.number, prompt, seed, values)
            if name in taken:
                job.error = f"duplicate name {name!r} (row {taken[name]} has it)"
            else:
                taken[name] = row.number
            jobs.append(job)
    return jobs


def job_generate_args(job: Job, batch: BatchArgs) -> GenerateArgs:
    """The ``dreamlab generate`` settings of one job: the batch's, then the row's overrides."""
    o = job.overrides
    args = GenerateArgs(
        prompt=job.prompt,
        prior=o.get("prior", batch.prior),
        guidance=o.get("guidance", batch.guidance),
        renderer=o.get("renderer", batch.renderer),
        steps=o.get("steps", batch.steps),
        seed=job.seed if job.seed is not None else 0,
        out=batch.out,
        resume=True,
        negative_prompt=o.get("negative_prompt", batch.negative_prompt),
        guidance_scale=o.get("guidance_scale", batch.guidance_scale),
        faces=batch.faces,
        texture_size=batch.texture_size,
        checkpoint_every=batch.checkpoint_every,
        gaussians=batch.gaussians,
        resolution=batch.resolution,
        formats=batch.formats,
        device=batch.device,
        quiet=True,
    )
    method_options = getattr(batch, args.guidance, None)  # --<method>.<field> of the batch's method
    if method_options is not None and args.guidance == batch.guidance:
        setattr(args, args.guidance, method_options)
    from dreamlab.cli import renderer_options

    options = renderer_options(batch)  # --<renderer>.<field> of the batch's renderer
    if options is not None and args.renderer == batch.renderer:
        setattr(args, args.renderer, options)
    return args


def job_settings(args: GenerateArgs) -> dict:
    """The settings that define an asset: a finished folder made with others is not reused."""
    from dreamlab.cli import build_run_config
    from dreamlab.generation import run_settings

    return run_settings(build_run_config(args))


def run_job(job: Job, batch: BatchArgs, prior_cache: dict | None = None, on_step=None,
            stop=None, threads: int | None = None) -> dict:
    """Makes (or finds finished) one asset; returns its manifest record. Never raises for a
    problem of this job: it is recorded. ``on_step(report)`` sees every step; ``stop()`` -> True
    interrupts after the current step (checkpoint written, status "interrupted"). Also the body
    of a Ray task."""
    from dreamlab.generation import export_run, open_run, read_result

    record = {"name": job.name, "row": job.row, "prompt": job.prompt, "seed": job.seed,
              "status": "failed", "reason": None, "files": [], "settings": {}}
    if job.error is not None:
        record["reason"] = job.error
        return record
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    run_dir = Path(batch.out) / job.name
    started = time.perf_counter()
    try:
        args = job_generate_args(job, batch)
        record["seed"] = args.seed
        settings = job_settings(args)
        record["settings"] = settings
        finished = read_result(run_dir)
        if finished is not None:
            if finished.get("settings") != settings:
                raise UserError(
                    f"{run_dir} holds a finished asset made with other settings "
                    f"({_settings_diff(finished.get('settings') or {}, settings)}); remove it or give the row another name")
            record.update(status="done", reused=True, files=finished["files"],
                          train_seconds=finished.get("train_seconds"), export_seconds=finished.get("export_seconds"))
            return record
        cache_key = settings["prior"]
        opened = open_run(args, run_dir, prior=(prior_cache or {}).get(cache_key), resume=True)
        if prior_cache is not None:
            prior_cache[cache_key] = opened.prior
        trainer = opened.trainer
        if opened.resumed_from is not None:
            record["resumed_from_step"] = trainer.step
        for report in trainer:
            if on_step is not None:
                on_step(report)
            if stop is not None and stop():
                trainer.save()
                record.update(status="interrupted", reason=f"stopped at step {trainer.step}; rerun to resume")
                return record
        result = export_run(trainer, run_dir, args.formats, time.perf_counter() - started)
        record.update(status="done", files=result.files, train_seconds=result.train_seconds,
                      export_seconds=result.export_seconds)
    except UserError as err:
        record["reason"] = str(err)
    except (ValueError, OSError) as err:
        record["reason"] = str(err) or type(err).__name__
    except MemoryError:
        record["reason"] = "out of memory: lower --steps, --resolution or --gaussians"
    except Exception as err:  # noqa: BLE001 - one asset's failure must not stop the batch
        record["reason"] = f"{type(err).__name__}: {err}"
    return record


def _settings_diff(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in keys) or "unknown difference"


# --------------------------------------------------------------------------- manifest, gallery


def write_manifest(out: Path, prompts: Path, records: list[dict]) -> None:
    from dreamlab.export.atomic import atomic_write_text

    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "failed", "interrupted", "pending")}
    manifest = {
        "prompts_file": str(prompts),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": counts,
        "assets": records,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    atomic_write_text(out / INDEX, gallery_html(records))


def gallery_html(records: list[dict]) -> str:
    """index.html: one card per asset (preview, prompt, status, links to its files)."""
    cards = []
    for r in records:
        name = r["name"]
        files = r.get("files") or []
        preview = next((f for f in files if f.endswith("preview.png")), None)
        image = (f'<img src="{quote(name)}/{quote(preview)}" alt="preview of {html.escape(name)}">'
                 if preview else '<div class="none">no preview</div>')
        links = " ".join(
            f'<a href="{quote(name)}/{quote(f)}">{html.escape(Path(f).name)}</a>'
            for f in files if "/" not in f and not f.endswith(".png") and not f.endswith(".mtl")
        )
        reason = f'<p class="reason">{html.escape(str(r["reason"]))}</p>' if r.get("reason") else ""
        cards.append(
            f'<div class="card {html.escape(r["status"])}"><h3>{html.escape(name)}</h3>{image}'
            f'<p>{html.escape(r.get("prompt") or "")}</p><p class="status">{html.escape(r["status"])}'
            f' (row {r["row"]})</p>{reason}<p>{links}</p></div>'
        )
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>dreamlab batch</title><style>"
        "body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:1em}"
        ".card{border:1px solid #ccc;border-radius:6px;padding:.5em;width:220px}"
        ".card img{width:200px;height:200px;object-fit:contain;background:#fff}"
        ".failed{border-color:#c33}.interrupted,.pending{border-color:#c90}.reason{color:#c33;font-size:90%}"
        ".none{width:200px;height:200px;background:#eee}</style></head><body>"
        f"<h1>dreamlab batch</h1><p>{sum(r['status'] == 'done' for r in records)} of {len(records)} assets done.</p>"
        f"<div class=\"grid\">{''.join(cards)}</div></body></html>\n"
    )


def summary_table(records: list[dict]) -> str:
    header = ("name", "status", "seconds", "reason")
    rows = []
    for r in records:
        seconds = (r.get("train_seconds") or 0) + (r.get("export_seconds") or 0)
        status = r["status"] + (" (reused)" if r.get("reused") else "")
        rows.append((r["name"], status, f"{seconds:.0f}" if seconds else "-", r.get("reason") or ""))
    widths = [max(len(h), *(len(str(row[i])) for row in rows)) for i, h in enumerate(header[:3])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  reason"]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return "\n".join(lines)


# --------------------------------------------------------------------------- drivers


class _Stop(Exception):
    pass


def run_batch(batch: BatchArgs) -> int:
    """Plans, runs (locally or on Ray) and reports the batch; returns the exit code."""
    from dreamlab.generation import check_writable

    rows = read_rows(batch.prompts)
    jobs = plan_jobs(rows, parse_seeds(batch.seeds))
    check_writable(batch.out)
    records = [{"name": j.name, "row": j.row, "prompt": j.prompt, "seed": j.seed, "status": "pending",
                "reason": j.error, "files": [], "settings": {}} for j in jobs]
    write_manifest(batch.out, batch.prompts, records)
    if batch.ray is not None:
        code = _run_on_ray(batch, jobs, records)
    else:
        code = _run_locally(batch, jobs, records)
    print(summary_table(records), file=sys.stderr)
    done = sum(r["status"] == "done" for r in records)
    print(f"dreamlab: {done} of {len(records)} assets done; manifest {batch.out / MANIFEST}, "
          f"gallery {batch.out / INDEX}", file=sys.stderr)
    if code:
        return code
    return 0 if done == len(records) else EXIT_SOME_FAILED


def _run_locally(batch: BatchArgs, jobs: list[Job], records: list[dict]) -> int:
    from tqdm import tqdm

    from dreamlab.cli import _quiet_library_progress_bars

    _quiet_library_progress_bars()
    stopping = {"flag": False}

    def on_signal(signum, frame):  # noqa: ARG001 - finish the step, checkpoint, then stop
        if stopping["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step
        stopping["flag"] = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    previous_int = signal.signal(signal.SIGINT, on_signal)
    prior_cache: dict = {}
    overall = tqdm(total=len(jobs), desc="batch", unit="asset", disable=batch.quiet, position=0, dynamic_ncols=True)
    try:
        for index, job in enumerate(jobs):
            overall.set_postfix_str(job.name[:40])
            bar = tqdm(desc=job.name[:30], unit="step", disable=batch.quiet, position=1, leave=False,
                       dynamic_ncols=True)

            def on_step(report, bar=bar):
                bar.total = report.total_steps
                bar.n = report.step
                bar.set_postfix(loss=f"{report.loss:.4g}")

            try:
                records[index] = run_job(job, batch, prior_cache, on_step, stop=lambda: stopping["flag"])
            except KeyboardInterrupt:
                stopping["flag"] = True
                records[index].update(status="interrupted", reason="interrupted; rerun to resume")
            finally:
                bar.close()
            overall.update(1)
            write_manifest(batch.out, batch.prompts, records)
            if stopping["flag"]:
                print(f"dreamlab: batch interrupted at {job.name}; rerun the same command to resume",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
    finally:
        overall.close()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return 0


def _run_on_ray(batch: BatchArgs, jobs: list[Job], records: list[dict]) -> int:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs the ray package: pip install 'dreamlab[ray]'") from None
    from tqdm import tqdm

    started_here = not ray.is_initialized()
    if started_here:
        address = None if batch.ray in ("", "local") else batch.ray
        try:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     configure_logging=False)
        except Exception as err:  # noqa: BLE001 - connection problems are the user's to fix
            raise UserError(f"cannot start or reach Ray at {batch.ray!r}: {err}") from None
    task = ray.remote(num_cpus=batch.ray_cpus, num_gpus=batch.ray_gpus, max_retries=0)(run_job)
    threads = max(1, int(batch.ray_cpus))
    pending = {}
    for index, job in enumerate(jobs):
        if job.error is not None:
            records[index] = run_job(job, batch)
        else:
            pending[task.remote(job, batch, None, None, None, threads)] = index
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="batch (ray)", unit="asset",
               disable=batch.quiet, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                records[index] = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - a lost worker fails its asset only
                records[index].update(status="failed", reason=f"Ray task failed: {type(err).__name__}: {err}")
            bar.update(1)
            write_manifest(batch.out, batch.prompts, records)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        for index in pending.values():
            records[index].update(status="interrupted", reason="interrupted; rerun to resume")
        write_manifest(batch.out, batch.prompts, records)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
        if started_here:
            ray.shutdown()
    return 0


def ray_flag_default(argv: list[str]) -> list[str]:
    """``--ray`` with no address (last, or followed by another option) means ``--ray local``."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("local")
    return out


def batch_args_type(method: str, renderer: str | None = None) -> type:
    """BatchArgs plus the batch guidance's ``--<method>.<field>`` options (and the batch
    renderer's ``--<renderer>.<field>``)."""
    from dreamlab.cli import args_with_guidance_options

    return args_with_guidance_options(BatchArgs, method, renderer)

