"""Score-distillation guidance methods (installed as ``dreamlab.guidance``).

``GUIDANCES`` maps a method name to its config dataclass. Every config has
``build(prior, prompt=None)`` returning a callable
``(rgb [B, H, W, 3] in [0, 1], cams, embeds, progress, generator) -> GuidanceOutput``.
See docs/guidance.md for the conventions and how to add a method.
"""

from __future__ import annotations

from typing import Any

from dreamlab.guidance.asd import ASD, ASDConfig
from dreamlab.guidance.bsd import BSD, BSDConfig
from dreamlab.guidance.cds import CDS, CDSConfig
from dreamlab.guidance.csm import CSM, CSMConfig
from dreamlab.guidance.dsd import DSD, DSDConfig
from dreamlab.guidance.esd import ESD, ESDConfig
from dreamlab.guidance.ism import ISM, ISMConfig
from dreamlab.guidance.sds import SDS, SDSConfig
from dreamlab.guidance.tsm import TSM, TSMConfig
from dreamlab.guidance.vpcsm import VPCSM, VPCSMConfig
from dreamlab.guidance.vsd import VSD, VSDConfig
from dreamlab.schedules import Constant

GUIDANCES: dict[str, type] = {
    "sds": SDSConfig,
    "vsd": VSDConfig,
    "esd": ESDConfig,
    "csm": CSMConfig,
    "vpcsm": VPCSMConfig,
    "ism": ISMConfig,
    "tsm": TSMConfig,
    "asd": ASDConfig,
    "bsd": BSDConfig,
    "dsd": DSDConfig,
    "cds": CDSConfig,
}
"""Method name (``dreamlab generate --guidance NAME``) -> config dataclass with the paper's defaults."""

GuidanceConfig = SDSConfig | VSDConfig | ESDConfig | CSMConfig | VPCSMConfig | ISMConfig | TSMConfig | ASDConfig | BSDConfig | DSDConfig | CDSConfig
"""Union of every guidance config type."""

BUILTIN_PRIOR_GUIDANCE_PRESETS: dict[str, dict[str, Any]] = {
    # The builtin prior is a small 32 px model: a paper's CFG of 100 over-saturates it into noise
    # (builtin-prior feasibility study: 5-7.5 beat 15-30), and the measured optimum is lower still.
    # SDS (docs/builtin-prior.md, primitives, seed 0, mean IoU): 0.825 at 7.5, 0.850 at 5, 0.874
    # at 3, 0.891 at 2, with better colour and PSNR too. The other methods with one CFG scale were
    # measured at 2 against 7.5 on the four composites with the v4 prior (docs/benchmarks.md,
    # "Guidance zoo on the full benchmark set"): IoU +0.02 to +0.08 at 2 for all but TSM.
    "sds": {"guidance_scale": 2.0},
    "asd": {"guidance_scale": 2.0},
    # BSD's classifier/denoise scales are relative (15 : 1); the auto variant's weight divides a
    # global norm that scales with image size and batch: 50 at 512 px SD latents ~ 22 at 32 px.
    "bsd": {"auto_weight_divisor": 22.0},
    # λ_cfg + λ_var = 2 (the paper's 6.5 + 1 equals CFG 7.5): composites IoU 0.705 vs 0.689.
    "dsd": {"cfg_weight": Constant(1.0)},
    # CSD's scale 1 with gradient normalisation is tuned for DeepFloyd IF at 64 px; on the builtin
    # prior use CFG-like magnitudes and SDS's weighting, and 2 inversion steps to keep the cost low.
    "csm": {"guidance_scale": 7.5, "grad_normalize": False, "weighting": "sds", "inversion_steps": 2},
    "vpcsm": {"guidance_scale": 7.5, "grad_normalize": False, "weighting": "sds", "inversion_steps": 2},
    # CDS's persistent-noise ODE step breaks down at CFG 2 (IoU 0.63, Janus 0.48): it keeps 7.5.
    "cds": {"guidance_scale": 7.5},
    "vsd": {"guidance_scale": 2.0},
    "esd": {"guidance_scale": 2.0},
    "ism": {"guidance_scale": 2.0},
    # TSM alone kept more shape at 7.5 (composites IoU 0.698 vs 0.688 at 2; Janus 0.162 vs 0.090).
    "tsm": {},
}
"""Per-method overrides applied when the prior is the builtin one (``config._apply_prior_preset``)."""

__all__ = [
    "ASD",
    "ASDConfig",
    "BSD",
    "BSDConfig",
    "BUILTIN_PRIOR_GUIDANCE_PRESETS",
    "CDS",
    "CDSConfig",
    "CSM",
    "CSMConfig",
    "DSD",
    "DSDConfig",
    "ESD",
    "ESDConfig",
    "GUIDANCES",
    "ISM",
    "ISMConfig",
    "TSM",
    "VPCSM",
    "VPCSMConfig",
    "TSMConfig",
    "VSD",
    "VSDConfig",
    "GuidanceConfig",
    "SDS",
    "SDSConfig",
]
