"""Score-distillation guidance methods (installed as ``dreamlab.guidance``).

``GUIDANCES`` maps a method name to its config dataclass. Every config has
``build(prior, prompt=None)`` returning a callable
``(rgb [B, H, W, 3] in [0, 1], cams, embeds, progress, generator) -> GuidanceOutput``.
See docs/guidance.md for the conventions and how to add a method.
"""

from __future__ import annotations

from dreamlab.guidance.sds import SDS, SDSConfig

GUIDANCES: dict[str, type] = {
    "sds": SDSConfig,
}

__all__ = ["GUIDANCES", "SDS", "SDSConfig"]
