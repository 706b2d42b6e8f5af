"""Command-line front ends of the benchmarks: ``dreamlab bench prior`` / ``dreamlab bench quality``.

The argument dataclasses are tyro-friendly (attribute docstrings become ``--help``); the
functions print the result table and where the files went, and return an exit code. Bad input
(a word outside the builtin world, an impossible setting) raises ValueError with a one-line
message before any work starts; the ``dreamlab`` CLI turns it into ``dreamlab: error: ...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchPriorArgs:
    """Sample the 2D prior for every benchmark prompt (and view word) and score the samples
    against the procedural world's ground truth (docs/metrics.md)."""

    prior: str = "builtin"
    """Prior under test: "builtin" or a folder holding a saved builtin prior."""
    prompts: tuple[str, ...] | None = None
    """Prompts of the builtin world (default: the fixed benchmark set)."""
    samples: int = 8
    """Samples per prompt (and per view word for objects with a front)."""
    steps: int = 50
    """DDIM steps per sample."""
    guidance_scale: float = 1.25
    """Classifier-free guidance scale of the sampler (1.25 measured best for the shipped builtin
    prior: prompt accuracy 0.79 vs 0.74 at 1, 0.78 at 1.4, 0.32 at 2; docs/builtin-prior.md)."""
    stop_at_t: int = 100
    """Return the predicted clean image once the timestep is <= this (0: run every DDIM step)."""
    view_guidance_scale: float = 1.0
    """Separate guidance weight w for the view phrase of objects with a front:
    ε̂ = ε_∅ + s(ε_y − ε_∅) + w(ε_y − ε_prompt without the view) (composable guidance). 0 = off.
    Measured on the shipped v6 prior (docs/builtin-prior.md): view accuracy 0.70 / 0.76 / 0.75 /
    0.63 at w = 0 / 1 / 1.5 / 3, prompt accuracy among the benchmark prompts 0.994 / 0.994 / 0.988
    / 0.956 (a prior that knows its view words needs less push; v5 was best at w = 3)."""
    other_view_scale: float = 0.0
    """Weight u of a negation of the other view words for objects with a front (composable
    guidance's NOT): ε̂ −= u · mean over the other views v' of (ε_{prompt, v' view} − ε_prompt).
    0 = off (two more U-Net branches per step when on)."""
    seed: int = 0
    """Base seed; the same seed gives the same samples."""
    out: Path = Path("bench-results/prior")
    """Folder for prior_bench.md, prior_bench.csv and prior_bench.png."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N."""


@dataclass
class BenchQualityArgs:
    """Generate 3D objects of the procedural world on the CPU and score them against the ground
    truth: silhouette IoU, PSNR, colour error, Janus, mesh genus, timings (docs/metrics.md)."""

    prompts: tuple[str, ...] | None = None
    """Prompts of the builtin world (default: the fixed benchmark set)."""
    guidance: str = "sds"
    """Score-distillation rule."""
    renderer: str = "gaussians"
    """3D representation."""
    steps: int | None = None
    """Optimisation steps per object (default: the prior's preset)."""
    seeds: tuple[int, ...] = (0,)
    """One run per seed and prompt."""
    prior: str = "builtin"
    """Prior: "builtin" or a folder holding a saved builtin prior."""
    out: Path = Path("bench-results/quality")
    """Folder for quality.md, quality.csv and quality.png."""
    no_mesh: bool = False
    """Skip the mesh extraction and its checks (genus, texture colour, export time)."""
    # `--<guidance>.<field> VALUE` options of the chosen method are added at parse time
    # (dreamlab.cli.args_with_guidance_options), as for `dreamlab generate`.


def _check_prompts(prompts: tuple[str, ...] | None) -> list[str]:
    """The prompts to run, each parsed (a ValueError naming the bad word before any work)."""
    from dreamlab.world.catalog import benchmark_prompts, parse_prompt

    chosen = list(benchmark_prompts() if prompts is None else prompts)
    if not chosen:
        raise ValueError("no prompts given: pass at least one, or none for the benchmark set")
    for prompt in chosen:
        parse_prompt(prompt)
    return chosen


def bench_prior(args: BenchPriorArgs) -> int:
    """Runs the prior benchmark, prints its table and where the files went; returns 0."""
    from dreamlab.bench.prior_quality import run_prior_bench, summary_table
    from dreamlab.priors import load_prior
    from dreamlab.train import resolve_device

    prompts = _check_prompts(args.prompts)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if args.stop_at_t < 0:
        raise ValueError(f"--stop-at-t must be >= 0, got {args.stop_at_t}")
    if args.view_guidance_scale < 0:
        raise ValueError(f"--view-guidance-scale must be >= 0, got {args.view_guidance_scale}")
    if args.other_view_scale < 0:
        raise ValueError(f"--other-view-scale must be >= 0, got {args.other_view_scale}")
    device = resolve_device(args.device)
    prior = load_prior(args.prior, device=device)
    result = run_prior_bench(
        prior,
        prompts,
        samples_per=args.samples,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        stop_at_t=args.stop_at_t,
        view_guidance_scale=args.view_guidance_scale,
        other_view_scale=args.other_view_scale,
        seed=args.seed,
        out_dir=args.out,
    )
    print(summary_table(result))
    print(
        f"\nprompt accuracy {result.accuracy:.3f} (among the benchmark prompts' objects: "
        f"{result.accuracy_among_prompts:.3f}) over {len(result.samples)} samples "
        f"({result.seconds:.1f} s sampling)"
    )
    print(f"wrote {result.markdown}, {result.csv}, {result.png}")
    return 0


def bench_quality(args: BenchQualityArgs) -> int:
    """Runs the quality benchmark, prints its table and where the files went; returns 0."""
    from dreamlab.bench.quality import run_quality_bench, summary_table
    from dreamlab.cli import renderer_options

    prompts = _check_prompts(args.prompts)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    result = run_quality_bench(
        prompts,
        guidance=args.guidance,
        guidance_options=getattr(args, args.guidance, None),
        renderer=args.renderer,
        renderer_options=renderer_options(args),
        steps=args.steps,
        seeds=args.seeds,
        prior=args.prior,
        out_dir=args.out,
        export_mesh=not args.no_mesh,
    )
    print(summary_table(result))
    print(f"\nwrote {result.markdown}, {result.csv}, {result.png}")
    return 0
