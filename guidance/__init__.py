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
from dreamlab.guidance.tsm import TSM, TSMConfig
from dreamlab.guidance.vpcsm import VPCSM, VPCSMConfig
from dreamlab.guidance.vsd import VSD, VSDConfig
from dreamlab.guidance.sds import SDS, SDSConfig

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
    # (builtin-prior feasibility study: 5-7.5 beat 15-30), so methods with one CFG scale use 7.5.
    # SDS was measured lower still (docs/builtin-prior.md, primitives, seed 0, mean IoU): 0.825
    # at 7.5, 0.850 at 5, 0.874 at 3, 0.891 at 2, with better colour and PSNR too.
    "sds": {"guidance_scale": 2.0},
    "asd": {"guidance_scale": 7.5},  # ScaleDreamer's own default
    # BSD's classifier/denoise scales are relative (15 : 1); the auto variant's weight divides a
    # global norm that scales with image size and batch: 50 at 512 px SD latents ~ 22 at 32 px.
    "bsd": {"auto_weight_divisor": 22.0},
    "dsd": {},  # its λ_cfg 6.5 + λ_var 1 already equal CFG 7.5
    # CSD's scale 1 with gradient normalisation is tuned for DeepFloyd IF at 64 px; on the builtin
    # prior use CFG-like magnitudes and SDS's weighting, and 2 inversion steps to keep the cost low.
    "csm": {"guidance_scale": 7.5, "grad_normalize": False, "weighting": "sds", "inversion_steps": 2},
    "vpcsm": {"guidance_scale": 7.5, "grad_normalize": False, "weighting": "sds", "inversion_steps": 2},
    "cds": {"guidance_scale": 7.5},
    # ProlificDreamer's CFG 7.5 already; the small prior's LoRA learns fast enough at 1e-4.
    "vsd": {},
    "esd": {},
    "ism": {},  # LucidDreamer's CFG 7.5 is already SDS's builtin-prior scale
    "tsm": {},  # Consistent3D anneals 101 -> 51 (convention A) for SD
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
